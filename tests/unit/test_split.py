"""An image's split depends only on its pixels and the seed; duplicates and labels by pixels."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headswap.config import DataConfig, HeadConfig, SplitConfig
from headswap.errors import DataError
from headswap.manifest import MANIFEST_COLUMNS, read_manifest
from headswap.prepare import assign_splits, class_order, prepare, split_of, split_warnings
from tests.helpers.synthetic import CLASSES, make_features
from tests.helpers.workspace import noise_folder, noise_image


def rows(n_per_class: dict[str, int], start: int = 0) -> list[dict]:
    return [
        {
            "path": f"{label}/{i}.png",
            "label": label,
            "pixels_sha256": hashlib.sha256(f"{label}{i}".encode()).hexdigest(),
        }
        for label, n in n_per_class.items()
        for i in range(start, start + n)
    ]


def splits(items: list[dict]) -> dict[str, str]:
    return {row["path"]: row["split"] for row in items}


def image_folder(root: Path, n_per_class: dict[str, int]) -> Path:
    """``root/<class>/<i>.png``: distinct noise images (1000 seeds apart per class)."""
    return noise_folder(root, n_per_class, class_stride=1000)


def prepared(raw: Path, out: Path, **data) -> tuple[dict[str, dict], dict]:
    """Run prepare; returns manifest rows by path and the validation report."""
    config = DataConfig(source=str(raw), positive_class=data.pop("positive_class", None), **data)
    result = prepare(config, raw, out)
    report = json.loads(result.report.read_text())
    return {row["path"]: row for row in read_manifest(result.manifest)}, report


def test_split_fractions_come_out_near_the_configured_fractions():
    items = rows({"functional": 3000, "defective": 1500})
    assign_splits(items, SplitConfig(seed=0, test_size=0.25, val_size=0.1))
    counts = Counter((row["label"], row["split"]) for row in items)
    for label, n in (("functional", 3000), ("defective", 1500)):
        # binomial standard deviation at n=1500 and p=0.25 is about 0.011
        assert abs(counts[(label, "test")] / n - 0.25) < 0.04, counts
        assert abs(counts[(label, "val")] / n - 0.1) < 0.03, counts
        assert abs(counts[(label, "train")] / n - 0.65) < 0.04, counts


def test_same_seed_same_split_other_seed_other_split():
    first, second, other = (
        rows({"a": 50, "b": 50}),
        rows({"a": 50, "b": 50}),
        rows({"a": 50, "b": 50}),
    )
    assign_splits(first, SplitConfig(seed=1))
    assign_splits(second, SplitConfig(seed=1))
    assign_splits(other, SplitConfig(seed=2))
    assert splits(first) == splits(second)
    assert splits(first) != splits(other)


def test_adding_or_removing_images_never_moves_any_other_image():
    config = SplitConfig(seed=0, test_size=0.25, val_size=0.1)
    small = rows({"a": 100, "b": 40})
    grown = small + rows({"a": 60, "b": 5, "c": 30}, start=100)
    shrunk = [row for index, row in enumerate(small) if index % 3]
    for items in (small, grown, shrunk):
        assign_splits(items, config)
    before, after, kept = splits(small), splits(grown), splits(shrunk)
    assert {path: after[path] for path in before} == before
    assert kept == {path: before[path] for path in kept}


def test_the_split_depends_only_on_the_pixels_not_the_name_or_class():
    config = SplitConfig(seed=3)
    digest = hashlib.sha256(b"one image").hexdigest()
    renamed = [
        {"path": "a/x.png", "label": "a", "pixels_sha256": digest},
        {"path": "b/other name.bmp", "label": "b", "pixels_sha256": digest},
    ]
    assign_splits(renamed, config)
    assert renamed[0]["split"] == renamed[1]["split"] == split_of(digest, config)


def test_prepare_twice_on_a_growing_folder_keeps_every_split(tmp_path):
    raw = image_folder(tmp_path / "raw", {"a": 12, "b": 12})
    before, _ = prepared(raw, tmp_path / "first")
    image_folder(raw, {"a": 20, "b": 15, "c": 10})  # rewrites the same 24 images, adds 21
    (raw / "a" / "0.png").rename(raw / "a" / "renamed.png")
    (raw / "b" / "1.png").unlink()
    after, _ = prepared(raw, tmp_path / "second")
    assert after["a/renamed.png"]["split"] == before["a/0.png"]["split"]
    assert "b/1.png" not in after
    for path, row in before.items():
        if path in after:
            assert after[path]["split"] == row["split"], path


def test_manifest_has_both_hashes_in_column_order(tmp_path):
    raw = image_folder(tmp_path / "raw", {"a": 8, "b": 8})
    manifest, report = prepared(raw, tmp_path / "out")
    header = (tmp_path / "out" / "manifest.csv").read_text().splitlines()[0]
    assert header == ",".join(MANIFEST_COLUMNS) == "path,sha256,pixels_sha256,label,split"
    row = manifest["a/0.png"]
    assert row["sha256"] == hashlib.sha256((raw / "a" / "0.png").read_bytes()).hexdigest()
    assert row["pixels_sha256"] != row["sha256"]
    assert report["split_rule"] == "pixels-sha256-threshold-v1"


def test_a_re_encoded_copy_is_one_image_and_the_first_path_is_kept(tmp_path):
    raw = image_folder(tmp_path / "raw", {"a": 6, "b": 6})
    noise_image(0).save(raw / "a" / "0.bmp")  # sorts before a/0.png, so it is the one kept
    noise_image(0).save(raw / "a" / "zz.png", compress_level=0)  # other bytes, same pixels
    manifest, report = prepared(raw, tmp_path / "out")
    assert "a/0.bmp" in manifest and {"a/0.png", "a/zz.png"}.isdisjoint(manifest)
    assert report["duplicates"] == [
        {"path": "a/0.png", "same_as": "a/0.bmp"},
        {"path": "a/zz.png", "same_as": "a/0.bmp"},
    ]
    assert report["images"] == 12


def test_the_same_pixels_under_two_labels_is_an_error_naming_the_files(tmp_path):
    raw = image_folder(tmp_path / "raw", {"a": 6, "b": 6})
    noise_image(0).save(raw / "b" / "from a.bmp")
    with pytest.raises(DataError, match="same decoded pixels") as error:
        prepared(raw, tmp_path / "out")
    assert "a/0.png" in str(error.value) and "b/from a.bmp" in str(error.value)
    assert "\n" not in str(error.value)


def test_positive_class_naming_no_class_is_a_one_line_error(tmp_path):
    raw = image_folder(tmp_path / "raw", {"cat": 6, "dog": 6})
    with pytest.raises(DataError) as error:
        prepared(raw, tmp_path / "out", positive_class="defective")
    message = str(error.value)
    assert "\n" not in message
    assert "'defective'" in message and "['cat', 'dog']" in message
    assert "set data.positive_class to one of them (or null)" in message
    _, report = prepared(raw, tmp_path / "out", positive_class="dog")
    assert report["classes"] == ["cat", "dog"]


def test_a_class_without_test_images_is_a_warning_not_an_error():
    items = rows({"big": 400, "tiny": 1})
    config = SplitConfig(seed=0, test_size=0.25, val_size=0.1)
    assign_splits(items, config)
    missing = [split for split in ("test", "train", "val") if split != items[-1]["split"]]
    assert split_warnings(items, config) == [
        f"class 'tiny' has no {split} images: add images" for split in missing
    ]


def test_an_empty_test_split_is_an_error_saying_what_to_do():
    items = rows({"a": 3, "b": 3})
    config = SplitConfig(seed=0, test_size=1e-9, val_size=0.0)
    assign_splits(items, config)
    with pytest.raises(DataError, match="the test split is empty") as error:
        split_warnings(items, config)
    assert "Add images or raise data.split.test_size" in str(error.value)


def test_prepare_reports_split_warnings(tmp_path):
    raw = image_folder(tmp_path / "raw", {"a": 30, "b": 30})
    # val_size tiny: no image draws a val fraction, which is allowed and reported
    manifest, report = prepared(raw, tmp_path / "out", split=SplitConfig(val_size=1e-9))
    assert "val" not in {row["split"] for row in manifest.values()}
    assert report["warnings"] == [
        "the val split is empty: the head keeps temperature 1.0 and threshold 0.5. "
        "Add images or raise data.split.val_size."
    ]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("head_type", ["logistic", "mlp"])
def test_an_empty_val_split_trains_with_temperature_1_and_threshold_0_5(head_type):
    from headswap.train import train_head

    features = make_features()
    features.split[features.split == "val"] = "train"
    config = HeadConfig(type=head_type, hidden=8, max_iter=5, device="cpu", C=1.0)
    _, meta = train_head(features, CLASSES, config, "auto")
    assert meta.temperature == 1.0
    assert meta.threshold == 0.5
    assert any(note.startswith("temperature 1.0") for note in meta.calibration_notes)
    assert any(note.startswith("threshold 0.5") for note in meta.calibration_notes)
    if head_type == "mlp":
        assert meta.epochs == 5


def test_positive_class_goes_last_for_binary_tasks():
    assert class_order({"defective", "functional"}, "defective") == ["functional", "defective"]
    assert class_order({"cat", "dog", "fox"}, "dog") == ["cat", "dog", "fox"]


def test_16_bit_images_keep_their_pixels_hash_and_split_under_banded_decoding(tmp_path):
    """The 16-bit path scales a band of rows at a time (bounded memory); each 8-bit value, hence
    the pixel hash and the split, must equal the whole-image float64 formula it replaced."""
    from headswap.imaging import DECODE_BAND_PIXELS, open_rgb
    from headswap.prepare import pixels_sha256

    side = 3000  # several bands of DECODE_BAND_PIXELS, the last one short
    assert side * side > 2 * DECODE_BAND_PIXELS
    rng = np.random.default_rng(16)
    values = rng.integers(0, 3001, (side, side)).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    expected = (values.astype(np.float64) * (255.0 / float(values.max()))).astype(np.uint8)
    whole = Image.fromarray(expected).convert("RGB")
    decoded = open_rgb(path)
    assert np.array_equal(np.asarray(decoded), np.asarray(whole))
    assert pixels_sha256(decoded) == pixels_sha256(whole)
    digest = hashlib.sha256(f"RGB:{side}x{side}:".encode())
    digest.update(whole.tobytes())
    assert pixels_sha256(decoded) == digest.hexdigest()  # banded hashing: the same bytes
