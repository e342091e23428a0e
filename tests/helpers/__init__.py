"""Helpers the tests import, always as ``from tests.helpers.<module> import ...``.

- ``workspace``: throwaway git + DVC workspaces, generated image folders, the one ``run``.
- ``servers``: real MLflow servers on loopback ports, started and stopped by the caller.
- ``prefect_stack``: a real Prefect server and served deployments for the flow tests.
- ``synthetic``: feature matrices with a known answer for the head and gate tests.

A package rather than conftest.py: ``from conftest import`` resolves to whichever conftest.py
pytest loaded last.
"""
