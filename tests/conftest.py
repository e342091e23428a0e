"""Shared fixtures: throwaway headswap workspaces (git + DVC) on small real ELPV subsets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.workspace import create_workspace


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
