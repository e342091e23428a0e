"""Model-card rendering and batch-prediction input/output handling (no model needed)."""

from __future__ import annotations

import pytest

from headswap.backbones.registry import BUNDLED_LICENSE
from headswap.modelcard import DESCRIPTION_LIMIT, as_description, render_model_card
from headswap.predict import PredictError, _escapes, _safe_cell, collect_images

METRICS = {
    "accuracy": 0.9,
    "balanced_accuracy": 0.88,
    "f1_macro": 0.87,
    "roc_auc": 0.95,
    "pr_auc": 0.9,
    "ece": 0.03,
    "ece_uncalibrated": 0.08,
    "temperature": 1.7,
    "threshold": 0.5,
    "n": 100,
    "classes": ["functional", "defective"],
    "confusion_matrix": [[60, 5], [5, 30]],
    "ci95": {"accuracy": [0.84, 0.95], "roc_auc": [0.91, 0.98]},
    "per_class": {
        "functional": {"precision": 0.92, "recall": 0.92, "f1": 0.92, "support": 65},
        "defective": {"precision": 0.86, "recall": 0.86, "f1": 0.86, "support": 35},
    },
    "slices": {
        "cell_type": {
            "mono": {"n": 40, "accuracy": 0.9, "balanced_accuracy": 0.9, "roc_auc": 0.96},
            "poly": {"n": 60, "accuracy": 0.9, "balanced_accuracy": None, "roc_auc": None},
        }
    },
}
VALIDATION = {
    "classes": ["functional", "defective"],
    "images": 400,
    "skipped": [],
    "counts": {
        "train": {"functional": 200, "defective": 100},
        "test": {"functional": 65, "defective": 35},
    },
}
LINEAGE = {
    "data_md5": "abc123.dir",
    "test_fingerprint": "f" * 64,
    "backbone": "efficientnet_lite0",
    "weights_sha256": "9" * 64,
    "git_commit": "1234567890abcdef",
    "git_dirty": "true",
    "dvc_experiment": "train-1",
    "feature_cache_key": "k",
    "prefect_flow_run_id": "",
}


def test_model_card_carries_lineage_metrics_slices_calibration_licence_and_use():
    card = render_model_card(
        "elpv", "3", "run9", LINEAGE, METRICS, VALIDATION, {"type": "logistic", "C": 1.0}
    )
    for expected in (
        "# elpv v3",
        "abc123.dir",
        "| test | 65 | 35 |",
        "| accuracy | 0.9000 | [0.8400, 0.9500] |",
        "| cell_type=mono | 40 |",
        "| true defective | 5 | 30 |",
        "ECE 0.0300",
        "T = 1.700",
        BUNDLED_LICENSE,
        "## Intended use",
        "## Limitations",
        "(uncommitted changes)",
    ):
        assert expected in card, expected
    assert len(card) < DESCRIPTION_LIMIT


def test_an_overlong_card_is_shortened_for_the_description_with_a_pointer():
    text = as_description("x" * (DESCRIPTION_LIMIT + 100), "model_card.md")
    assert len(text) == DESCRIPTION_LIMIT and text.endswith("in the run's artifacts)")


def test_folders_are_searched_recursively_and_reported_relative(tmp_path):
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    for name in ("a/x.png", "a/y.JPG", "a/notes.txt", "a/.hidden/z.png", "a/.w.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    found = collect_images([tmp_path / "a", tmp_path / "b.png"])
    assert [shown for _, shown in found] == ["x.png", "y.JPG", str(tmp_path / "b.png")]
    with pytest.raises(PredictError, match="no such file"):
        collect_images([tmp_path / "missing"])


def test_a_symlink_leaving_the_input_folder_is_flagged(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "secret.png").write_bytes(b"")
    (tmp_path / "in" / "inside.png").write_bytes(b"")
    (tmp_path / "in" / "out.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "in" / "ok.png").symlink_to(tmp_path / "in" / "inside.png")
    roots = [tmp_path / "in"]
    assert _escapes(tmp_path / "in" / "out.png", roots)
    assert not _escapes(tmp_path / "in" / "ok.png", roots)
    assert not _escapes(tmp_path / "in" / "inside.png", roots)


@pytest.mark.parametrize("name", ["=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)"])
def test_cells_that_a_spreadsheet_would_run_are_defused(name):
    assert _safe_cell(name) == "'" + name
    assert _safe_cell("defective/cell0001.png") == "defective/cell0001.png"
