"""The pipeline's files, relative to the workspace root: one name for each path in dvc.yaml.

dvc.yaml is the source of truth for what each stage reads and writes; this module mirrors it so
Python code never spells a path itself (``tests/unit/test_paths.py`` checks that every output
named in dvc.yaml is here).
"""

from __future__ import annotations

from pathlib import Path

DVC_YAML = Path("dvc.yaml")
DVC_LOCK = Path("dvc.lock")
PARAMS = Path("params.yaml")

MODELS_DIR, REPORTS_DIR = Path("models"), Path("reports")
PREPARED_DIR, FEATURES_DIR = Path("data/prepared"), Path("data/features")

# Each stage's outputs, in dvc.yaml's order.
RAW_DIR = Path("data/raw")  # ingest
RAW_DVC = Path("data/raw.dvc")  # before the ingest stage existed, data/raw was `dvc add`-ed
MANIFEST, VALIDATION = PREPARED_DIR / "manifest.csv", PREPARED_DIR / "validation.json"
FEATURES, FEATURES_INFO = FEATURES_DIR / "features.npz", FEATURES_DIR / "features_info.json"
HEAD_WEIGHTS, HEAD_META = MODELS_DIR / "head.pt", MODELS_DIR / "head.json"  # train
PREDICTIONS = REPORTS_DIR / "predictions.csv"  # evaluate, with the next two
METRICS = REPORTS_DIR / "metrics.json"
PLOTS_DIR = REPORTS_DIR / "plots"
MODEL, PARITY = MODELS_DIR / "model.onnx", REPORTS_DIR / "export_parity.json"  # export
REGISTRATION = MODELS_DIR / "registry.json"  # register

# Not DVC outputs: per-workspace state of the operator tools (kept out of git).
STATE_DIR = Path(".headswap")
RUN_LOCK = STATE_DIR / "run.lock"
UI_LOG_DIR = STATE_DIR / "ui"
UI_AUTH_DIR = STATE_DIR / "auth"
EMBEDDED_TRACKING_DB = Path("mlflow.db")
