"""What `predict` writes and what model files it accepts, with real ONNX models on real files.

The models are tiny real ONNX graphs with headswap's interface (float32 NCHW ``pixels`` in,
``probabilities`` + ``label`` out, ``headswap.*`` metadata): p(bright) rises with the mean
brightness. No registry is needed: ``predict_images`` also takes a local .onnx file.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headswap.predict import (
    BATCH_BYTES,
    MAX_IMAGE_SIZE,
    OnnxClassifier,
    PredictError,
    _batch_limit,
    partial_path,
    predict_images,
    printable,
)
from tests.helpers.synthetic import brightness_onnx


def brightness_model(
    path: Path, classes: tuple[str, ...] = ("dark", "bright"), size: str = "16"
) -> Path:
    """A real 2-output ONNX classifier on mean brightness; metadata ``classes`` and ``size``."""
    metadata = {"headswap.classes": json.dumps(list(classes)), "headswap.image_size": size}
    return brightness_onnx(path, metadata, slope=20.0, cut=0.5)


def grey(path: Path, level: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20), level, np.uint8), mode="L").save(path)
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:  # strict UTF-8: must decode
        return list(csv.DictReader(handle))


# --- item 6: odd names, rows as they go --------------------------------------------------------


def test_a_non_utf8_file_name_reaches_the_csv_escaped(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    grey(Path(odd), 200)
    grey(folder / "plain.png", 10)
    out = tmp_path / "out" / "p.csv"
    result = predict_images(str(brightness_model(tmp_path / "m.onnx")), [folder], out)
    rows = read_rows(out)
    assert [row["path"] for row in rows] == ["caf\\xe9.png", "plain.png"]
    assert [row["predicted"] for row in rows] == ["bright", "dark"]
    assert result.rows == 2 and result.errors == 0 and not partial_path(out).exists()


def test_printable_escapes_only_what_utf8_cannot_hold():
    assert printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert printable("café ✓") == "café ✓"
    assert printable("lone \ud800") == "lone \\ud800"  # not from a file name: still writable


def test_an_error_part_way_keeps_the_rows_already_scored(tmp_path):
    """A model whose metadata lists fewer classes than it outputs fails on the first bright
    image: the dark batch before it stays in <out>.partial and the message says where."""
    for i in range(4):
        grey(tmp_path / "in" / f"a{i}.png", 10)  # dark: label 0, which the metadata names
    grey(tmp_path / "in" / "b0.png", 240)  # bright: label 1, which it does not
    model = brightness_model(tmp_path / "m.onnx", classes=("dark",))
    out = tmp_path / "p.csv"
    with pytest.raises(PredictError, match="stopped part-way") as stopped:
        predict_images(str(model), [tmp_path / "in"], out, batch_size=2)
    assert str(partial_path(out)) in str(stopped.value) and "\n" not in str(stopped.value)
    assert not out.exists()
    kept = read_rows(partial_path(out))
    assert [row["path"] for row in kept] == ["a0.png", "a1.png", "a2.png", "a3.png"]
    assert all(row["predicted"] == "dark" for row in kept)


def test_a_rerun_replaces_the_csv_and_keeps_its_permissions(tmp_path):
    grey(tmp_path / "in" / "a.png", 10)
    out = tmp_path / "p.csv"
    out.write_text("old")
    out.chmod(0o644)
    partial_path(out).symlink_to(tmp_path / "victim.txt")  # a planted link is not followed
    predict_images(str(brightness_model(tmp_path / "m.onnx")), [tmp_path / "in"], out)
    assert (out.stat().st_mode & 0o777) == 0o644
    assert read_rows(out)[0]["path"] == "a.png"
    assert not (tmp_path / "victim.txt").exists() and not partial_path(out).exists()


def test_hostile_class_names_in_the_header_are_defused(tmp_path):
    grey(tmp_path / "in" / "=cmd.png", 10)
    model = brightness_model(tmp_path / "m.onnx", classes=("=HYPERLINK(1)", "@b"))
    out = tmp_path / "p.csv"
    predict_images(str(model), [tmp_path / "in"], out)
    header, row = out.read_text(encoding="utf-8").splitlines()
    assert header == "path,predicted,p_=HYPERLINK(1),p_@b,error"  # prefixed: not a formula start
    assert row.startswith("'=cmd.png,'=HYPERLINK(1),")


# --- item 7: the model's image_size is bounded --------------------------------------------------


@pytest.mark.parametrize("size", ["65536", "8", "0", "-300", "300.5", "huge", ""])
def test_a_model_claiming_an_unusable_image_size_is_refused_in_one_line(tmp_path, size):
    model = brightness_model(tmp_path / "m.onnx", size=size)
    with pytest.raises(PredictError, match=r"headswap\.image_size .* outside 16\.\.4096") as bad:
        OnnxClassifier.load(model)
    assert "\n" not in str(bad.value)


def test_image_sizes_in_range_load_and_batches_stay_under_the_byte_budget(tmp_path):
    for size in (16, 300, MAX_IMAGE_SIZE):
        assert (
            OnnxClassifier.load(brightness_model(tmp_path / "m.onnx", size=str(size))).size == size
        )
        assert _batch_limit(size, 32) * 3 * size * size * 4 <= max(BATCH_BYTES, 3 * size * size * 4)
    assert _batch_limit(300, 32) == 32 and _batch_limit(MAX_IMAGE_SIZE, 32) == 1
