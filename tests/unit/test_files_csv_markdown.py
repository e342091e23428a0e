"""Outputs survive hostile names: CSV cells a spreadsheet would run are defused in every CSV the
project writes (and read back exactly), and class names cannot break the model card."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from PIL import Image

from headswap.config import DataConfig
from headswap.evaluate import _write_predictions
from headswap.io import FORMULA_PREFIXES, csv_text, defuse_cell, parse_csv, restore_cell
from headswap.learning_curve import CurvePoint, write_table
from headswap.manifest import read_manifest
from headswap.modelcard import md_code, md_text, render_model_card
from headswap.prepare import prepare
from tests.helpers.workspace import noise_image

HOSTILE = ["=1+2", "+ve", "-cmd", "@SUM(A1)", "\tx", "\rx", " =HYPERLINK(1)", "'quoted"]


def runs_in_a_spreadsheet(cell: str) -> bool:
    return cell.lstrip(" \u00a0").startswith(FORMULA_PREFIXES)


def cells(path) -> list[str]:
    with open(path, newline="") as handle:
        return [cell for row in csv.reader(handle) for cell in row]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_cell_that_would_run_is_defused_and_restored_exactly(value):
    cell = defuse_cell(value)
    assert cell.startswith("'") and not runs_in_a_spreadsheet(cell)
    assert restore_cell(cell) == value


@pytest.mark.parametrize("value", ["-0.25", "+1", "1e-05", "-3.5E+2", "cat/0.png", "", "a=b"])
def test_plain_numbers_and_ordinary_text_pass_unchanged(value):
    assert defuse_cell(value) == value and restore_cell(value) == value


def test_csv_text_round_trips_every_hostile_cell():
    rows = [[value, f"{value}/x.png", 3] for value in HOSTILE]
    text = csv_text(["label", "path", "n"], rows)
    assert parse_csv(text) == [{"label": v, "path": f"{v}/x.png", "n": "3"} for v in HOSTILE]


def test_the_manifest_defuses_class_names_and_paths_and_reads_back_as_written(tmp_path):
    raw = tmp_path / "raw"
    labels = ["=1+2", "@SUM(A1)", "-cmd"]
    for offset, label in enumerate(labels):
        (raw / label).mkdir(parents=True)
        for index in range(4):
            noise_image(offset * 10 + index).save(raw / label / f"+{index}.png")
    result = prepare(DataConfig(source="elpv", positive_class=None), raw, tmp_path / "out")
    assert not any(runs_in_a_spreadsheet(cell) for cell in cells(result.manifest))
    rows = read_manifest(result.manifest)
    assert {row["label"] for row in rows} == set(labels)
    assert all((raw / row["path"]).is_file() for row in rows)  # features find every image


def test_evaluate_predictions_defuse_paths_labels_and_class_names(tmp_path):
    classes = ["=1+2", "@bad"]
    rows = [
        {"path": "=1+2/+0.png", "sha256": "a" * 64, "label": "=1+2"},
        {"path": "@bad/-1.png", "sha256": "b" * 64, "label": "@bad"},
    ]
    path = tmp_path / "predictions.csv"
    _write_predictions(path, rows, np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), classes)
    assert not any(runs_in_a_spreadsheet(cell) for cell in cells(path))
    read = parse_csv(path.read_text())
    assert [row["predicted"] for row in read] == classes
    assert [row["path"] for row in read] == [row["path"] for row in rows]


def test_export_reads_the_images_a_defused_predictions_csv_names(tmp_path):
    """Parity loads data/raw/<path>: it must see the path restored, not its defused cell."""
    from types import SimpleNamespace

    from headswap.export import _parity_inputs

    classes = ["=1+2", "@bad"]
    rows = [
        {"path": "=1+2/+0.png", "sha256": "a" * 64, "label": "=1+2"},
        {"path": "@bad/-1.png", "sha256": "b" * 64, "label": "@bad"},
    ]
    for row in rows:
        (tmp_path / "raw" / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "raw" / row["path"])
    path = tmp_path / "predictions.csv"
    _write_predictions(path, rows, np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), classes)
    spec = SimpleNamespace(preprocessing=SimpleNamespace(size=8, interpolation="bilinear"))
    paths, pixels = _parity_inputs(path, tmp_path / "raw", spec)
    assert paths == [row["path"] for row in rows]
    assert pixels.shape[0] == 2


def test_the_learning_curve_table_goes_through_the_same_writer(tmp_path):
    point = CurvePoint(None, 40, 2, 0.9, 0.01, None, None, [0.9, 0.9], [None, None])
    write_table([point], tmp_path / "curve.csv", tmp_path / "curve.json")
    text = (tmp_path / "curve.csv").read_text()
    header = "per_class,train_images,seeds,accuracy_mean,accuracy_std,roc_auc_mean,roc_auc_std"
    assert text == csv_text(header.split(","), [["all", 40, 2, "0.900000", "0.010000", "", ""]])


UNDEFINED = {"balanced_accuracy": None, "roc_auc": None}
NASTY = ["a|b", "<script>alert(1)</script>", "x`y", "two\nlines", "[pic](http://e/x.png)"]


def nasty_card() -> str:
    n = len(NASTY)
    per_class = {name: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for name in NASTY}
    metrics = {
        **{k: 0.5 for k in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "pr_auc")},
        "ece": 0.1,
        "n": 2 * n,
        "classes": NASTY,
        "confusion_matrix": np.eye(n, dtype=int).tolist(),
        "per_class": per_class,
        "slices": {"cell|type": {"<b>mono</b>": dict(n=3, accuracy=1.0, **UNDEFINED)}},
    }
    validation = {
        "classes": NASTY,
        "images": 2 * n,
        "counts": {"train": dict.fromkeys(NASTY, 1), "test": dict.fromkeys(NASTY, 1)},
    }
    changes = {
        "since_version": "1",
        "per_class": {name: {"added": 1, "removed": 0, "changed": 0} for name in NASTY},
        "total": {"added": n, "removed": 0, "changed": 0},
    }
    lineage = {"dvc_experiment": "exp`<img src=x>", "backbone": "efficientnet_lite0"}
    return render_model_card(
        "m|<i>x</i>", "2", "run", lineage, metrics, validation, {"type": "logistic"}, changes
    )


def test_class_names_cannot_break_the_model_card_tables_or_inject_html():
    card = nasty_card()
    unescaped_pipe = re.compile(r"(?<!\\)\|")
    tables = [line for line in card.splitlines() if line.startswith("|")]
    assert len(tables) > 10
    blocks, current = [], []
    for line in card.splitlines() + [""]:
        if line.startswith("|"):
            current.append(len(unescaped_pipe.findall(line)))
        elif current:
            blocks.append(current)
            current = []
    assert all(len(set(block)) == 1 for block in blocks), blocks  # every row: header's columns
    assert not any(line.startswith("lines") for line in card.splitlines())  # no row split
    assert "`` exp`<img src=x> ``" in card  # a code span shows HTML as text
    outside_code = re.sub(r"`` .*? ``|`[^`]*`", "", card)
    for tag in ("<script", "<i>", "<b>", "<img"):
        assert tag not in outside_code
    assert "](http" not in card.replace("\\](http", "")  # no live image or link


def test_markdown_helpers_leave_ordinary_names_alone():
    assert md_text("defective") == "defective" and md_text("cell_type=mono") == "cell_type=mono"
    assert md_text("__init__") == "\\_\\_init\\_\\_"
    assert md_code("train-1") == "`train-1`"
