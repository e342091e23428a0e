"""Prefect flows: thin orchestration over headswap's stage functions and the DVC DAG."""
