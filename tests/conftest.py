"""Shared fixtures: throwaway headswap workspaces (git + DVC) on small real ELPV subsets."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.workspace import create_workspace


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture
def make_workspace(tmp_path_factory, feature_cache) -> Callable[..., Path]:
    """Factory fixture around ``create_workspace`` for tests that need a fresh workspace."""

    def factory(max_per_class: int = 20, **overrides: dict) -> Path:
        return create_workspace(
            tmp_path_factory.mktemp("workspace"), feature_cache, max_per_class, **overrides
        )

    return factory


@pytest.fixture(autouse=True)
def _tracking_uri_restored() -> Iterator[None]:
    """Put MLflow's process-wide tracking URI back after each test.

    Tests that log through MLflow's fluent API call ``mlflow.set_tracking_uri``, which sets
    ``MLFLOW_TRACKING_URI`` in ``os.environ`` and a process-wide value that outranks it; a later
    test would talk to a server that is gone, and its subprocesses would inherit that store
    instead of their workspace's own.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:  # nothing to undo in a test that never imported MLflow
        from headswap.tracking import restore_tracking_uri_variable

        restore_tracking_uri_variable(before)
