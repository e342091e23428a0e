"""The bad-image matrix: every kind of messy file, through the real ingest + prepare stages.

Each case is generated here, in a temp folder, and goes through the CLI commands that dvc.yaml
runs (``headswap ingest``, ``headswap prepare``), then the readable images through the features
stage. The outcomes asserted here are the table in README.md (``## Bad input``).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from headswap.cli import app
from headswap.config import BackboneConfig, FeaturesConfig
from headswap.feature_set import load_features
from headswap.features import extract_features
from headswap.imaging import MAX_PIXELS, UnreadableImageError, open_rgb
from headswap.manifest import read_manifest

# case -> (file under the "cat" class, expected outcome, reason fragment for skipped files)
SKIPPED = {
    "truncated JPEG": ("truncated.jpg", "cannot decode"),
    "truncated PNG": ("truncated.png", "cannot decode"),
    "text file with .jpg": ("text.jpg", "not an image file"),
    "zero-byte file": ("zero.png", "empty file (0 bytes)"),
    "enormous image (bomb, warn range)": ("huge.png", "image too large to decode safely"),
    "enormous image (bomb, error range)": ("huger.png", "image too large to decode safely"),
    "non-image extension": ("notes.txt", "not an image extension (.txt)"),
    "broken symlink": ("dangling.png", "broken symlink"),
    "symlink loop (both ends)": ("loop_a.png", "symlink loop"),
    "symlink loop (other end)": ("loop_b.png", "symlink loop"),
    "image-named link to a secret": ("credentials.png", "not an image file"),
}
SECRET = "aws_secret_access_key = do-not-upload"
ACCEPTED = {
    "CMYK JPEG": "cmyk.jpg",
    "16-bit PNG": "gray16.png",
    "RGBA PNG": "rgba.png",
    "palette PNG": "palette.png",
    "1-bit PNG": "onebit.png",
    "EXIF-rotated JPEG": "exif_rotated.jpg",
    "non-ASCII name": "Ünïcødé ñame.png",
    "name with spaces": "with space.jpg",
    "symlink to an image": "link.png",
}
HIDDEN = (".hidden.png", ".DS_Store", "Thumbs.db")

runner = CliRunner()


def _noise(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    blob = bytearray(_encoded(Image.new("L", (8, 8)), "PNG"))
    ihdr = bytes(blob[12:16]) + struct.pack(">II", width, height) + bytes(blob[24:29])
    blob[16:24] = struct.pack(">II", width, height)
    blob[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(blob)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_png16_zeros(path: Path, side: int) -> None:
    """A real ``side`` x ``side`` 16-bit greyscale PNG of zeros, deflated row by row, so the
    test never holds the 512 MiB of pixels it describes (about 0.5 MB on disk at 16384)."""
    deflate = zlib.compressobj(9)
    row = bytes(1 + 2 * side)  # filter byte 0, then 16-bit zeros
    idat = b"".join([*(deflate.compress(row) for _ in range(side)), deflate.flush()])
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def exif_rotated_jpeg() -> bytes:
    """60x30 stored pixels, left half red, right half blue, EXIF orientation 6 (rotate 90 CW)."""
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


def _write_special_files(cat: Path, outside: Path) -> None:
    jpeg, png = _encoded(_noise(100), "JPEG"), _encoded(_noise(101), "PNG")
    (cat / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (cat / "truncated.png").write_bytes(png[: len(png) // 2])
    (cat / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (cat / "zero.png").write_bytes(b"")
    (cat / "huge.png").write_bytes(_png_claiming_size(20_000, 20_000))
    (cat / "huger.png").write_bytes(_png_claiming_size(100_000, 100_000))
    (cat / "notes.txt").write_text("labelling notes")
    (cat / "dangling.png").symlink_to(outside / "missing.png")
    (cat / "loop_a.png").symlink_to(cat / "loop_b.png")
    (cat / "loop_b.png").symlink_to(cat / "loop_a.png")
    (outside / "credentials").write_text(f"[default]\n{SECRET}\n")
    (cat / "credentials.png").symlink_to(outside / "credentials")
    (cat / "cmyk.jpg").write_bytes(_encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"))
    gradient = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4).astype(np.uint16)
    Image.fromarray(gradient).save(cat / "gray16.png")  # uint16 -> mode I;16
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (0, 0, 16, 32))
    rgba.save(cat / "rgba.png")
    _noise(102, 32).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(
        cat / "palette.png"
    )
    _noise(103, 32).convert("1").save(cat / "onebit.png")
    (cat / "exif_rotated.jpg").write_bytes(exif_rotated_jpeg())
    _noise(104).save(cat / "Ünïcødé ñame.png")
    _noise(105).save(cat / "with space.jpg")
    _noise(106).save(outside / "elsewhere.png")
    (cat / "link.png").symlink_to(outside / "elsewhere.png")
    _noise(107).save(cat / ".hidden.png")
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (cat / "Thumbs.db").write_bytes(bytes(range(256)))


def make_source(root: Path, per_class: int = 6) -> Path:
    """An ImageFolder with two healthy classes plus every special case under ``cat``."""
    source = root / "source"
    outside = root / "outside"
    outside.mkdir(parents=True)
    for offset, label in enumerate(("cat", "dog")):
        (source / label).mkdir(parents=True)
        for index in range(per_class):
            _noise(offset * 50 + index).save(source / label / f"{label}{index}.png")
    _write_special_files(source / "cat", outside)
    (source / "empty_class").mkdir()
    return source


def write_params(workdir: Path, source: Path, **data: object) -> None:
    extra = "".join(f"  {key}: {value}\n" for key, value in data.items())
    (workdir / "params.yaml").write_text(
        f"data:\n  source: '{source}'\n  positive_class: dog\n{extra}"
        "backbone:\n  image_size: 64\n"
        "features:\n  engine: torch\n  workers: 0\n  batch_size: 8\n"
    )


def error_lines(output: str) -> list[str]:
    """The error as printed: exactly one line, and no traceback anywhere in the output."""
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines


def run_cli(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory) -> dict:
    """ingest + prepare (skip mode) + features, once for all the assertions below."""
    work = tmp_path_factory.mktemp("bad-images")
    source = make_source(work)
    write_params(work, source)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        ingest = run_cli("ingest")
        prepare = run_cli("prepare")
        report = json.loads((work / "data/prepared/validation.json").read_text())
        manifest = read_manifest(work / "data/prepared/manifest.csv")
        features = extract_features(
            BackboneConfig(
                image_size=64, name="efficientnet_lite0", taps=["head"], pool="mean", ensemble=[]
            ),
            FeaturesConfig(
                engine="torch", workers=0, batch_size=8, cache_dir=str(work / "cache"), views="none"
            ),
            work / "data/prepared/manifest.csv",
            work / "data/raw",
            work / "features.npz",
        )
    return {
        "work": work,
        "ingest": ingest,
        "prepare": prepare,
        "report": report,
        "manifest": manifest,
        "features": features,
    }


def test_skip_mode_continues_and_lists_every_unreadable_file(skip_run):
    assert skip_run["ingest"].exit_code == 0, skip_run["ingest"].output
    assert skip_run["prepare"].exit_code == 0, skip_run["prepare"].output
    reasons = {item["path"]: item["reason"] for item in skip_run["report"]["skipped"]}
    assert set(reasons) == {f"cat/{name}" for name, _ in SKIPPED.values()}
    for name, fragment in SKIPPED.values():
        assert fragment in reasons[f"cat/{name}"], (name, reasons[f"cat/{name}"])
        # ... and in the stage output, with its reason, not only in the report
        assert f"skipped cat/{name}: {reasons[f'cat/{name}']}" in skip_run["prepare"].output
    assert f"skipped {len(SKIPPED)} unreadable file(s)" in skip_run["prepare"].output
    assert "Traceback" not in skip_run["prepare"].output


def test_ingest_copies_nothing_that_is_not_an_image(skip_run):
    raw = skip_run["work"] / "data/raw"
    copied = {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()}
    assert "cat/credentials.png" not in copied and "cat/notes.txt" not in copied
    assert not any(SECRET.encode() in (raw / name).read_bytes() for name in copied)


def test_a_source_that_is_the_workspace_is_refused_with_one_line(tmp_path, monkeypatch):
    make_source(tmp_path)
    write_params(tmp_path, tmp_path)  # data.source: the project folder itself
    monkeypatch.chdir(tmp_path)
    result = run_cli("ingest")
    assert result.exit_code == 1
    (line,) = error_lines(result.output)
    assert "is the workspace" in line and "data.source" in line
    assert not (tmp_path / "data" / "raw").exists()


def test_skip_mode_accepts_odd_but_valid_images_and_ignores_hidden_files(skip_run):
    paths = {row["path"] for row in skip_run["manifest"]}
    for name in ACCEPTED.values():
        assert f"cat/{name}" in paths, name
    assert not any(Path(path).name in HIDDEN for path in paths)
    assert len(paths) == 2 * 6 + len(ACCEPTED)
    assert skip_run["report"]["empty_classes"] == ["empty_class"]
    assert skip_run["report"]["classes"] == ["cat", "dog"]


def test_features_embed_every_accepted_image(skip_run):
    features = load_features(skip_run["work"] / "features.npz")
    assert skip_run["features"].images == len(skip_run["manifest"])
    assert sorted(features.path) == sorted(row["path"] for row in skip_run["manifest"])
    assert np.isfinite(features.embeddings).all()
    # no two distinct images collapsed to one embedding (e.g. every odd mode decoded to black)
    flat = features.embeddings.reshape(len(features.path), -1)
    assert len({row.tobytes() for row in flat}) == len(flat)


def test_fail_mode_stops_with_one_message_naming_the_files(tmp_path, monkeypatch):
    source = make_source(tmp_path)
    write_params(tmp_path, source, on_bad_image="fail")
    monkeypatch.chdir(tmp_path)
    assert run_cli("ingest").exit_code == 0
    result = run_cli("prepare")
    assert result.exit_code == 1
    lines = error_lines(result.output)
    assert f"{len(SKIPPED)} unreadable file(s)" in lines[0]
    assert "data.on_bad_image is 'fail'" in lines[0]
    named = [name for name, _ in SKIPPED.values() if f"cat/{name}" in lines[0]]
    assert len(named) == min(10, len(SKIPPED)), named  # the first ten, then how many more
    assert len(SKIPPED) <= 10 or f"(and {len(SKIPPED) - 10} more)" in lines[0]
    assert not (tmp_path / "data/prepared/manifest.csv").exists()


def test_symlinks_placed_directly_in_data_raw(tmp_path, monkeypatch):
    raw = tmp_path / "data/raw"
    for label in ("cat", "dog"):
        (raw / label).mkdir(parents=True)
        for index in range(5):
            _noise(len(label) * 7 * (label == "cat") + 100 * (label == "dog") + index).save(
                raw / label / f"{index}.png"
            )
    (raw / "cat/loop_a.png").symlink_to(raw / "cat/loop_b.png")
    (raw / "cat/loop_b.png").symlink_to(raw / "cat/loop_a.png")
    (raw / "cat/gone.png").symlink_to(tmp_path / "nowhere.png")
    (raw / "cat/sub").mkdir()
    (raw / "cat/sub/up").symlink_to(raw / "cat")  # a folder loop: must not recurse forever
    write_params(tmp_path, tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run_cli("prepare")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "data/prepared/validation.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons["cat/loop_a.png"].startswith("symlink loop")
    assert reasons["cat/gone.png"].startswith("broken symlink")
    assert {"path": "cat/sub/up", "reason": "symlinked folder (not followed)"} in report["ignored"]
    assert report["images"] == 10


@pytest.mark.parametrize(
    ("layout", "params", "fragments"),
    [
        ({"cat": 5}, {}, ["need at least 2 classes", "['cat']"]),
        ({"cat": 5, "dog": 0}, {}, ["need at least 2 classes", "empty class folders: ['dog']"]),
        ({"cat": 5, "dog": 1}, {}, ["below data.min_per_class=2", "'dog': 1"]),
        # every image's split comes from its own pixels: these three all draw fractions >= 0.1
        (
            {"cat": 2, "dog": 1},
            {"min_per_class": 1, "split": "{test_size: 0.1}"},
            ["the test split is empty", "Add images or raise data.split.test_size"],
        ),
    ],
    ids=["single-class", "empty-class-leaves-one", "single-image-class", "empty-test-split"],
)
def test_dataset_level_errors_stop_before_training(
    tmp_path, monkeypatch, layout, params, fragments
):
    source = tmp_path / "source"
    for offset, (label, count) in enumerate(layout.items()):
        (source / label).mkdir(parents=True)
        for index in range(count):
            _noise(offset * 100 + index).save(source / label / f"{index}.png")
    write_params(tmp_path, source, **params)
    monkeypatch.chdir(tmp_path)
    assert run_cli("ingest").exit_code == 0
    result = run_cli("prepare")
    assert result.exit_code == 1
    error_lines(result.output)
    for fragment in fragments:
        assert fragment in result.output
    assert not (tmp_path / "data/prepared").exists()


def _ingest_cats_and_dogs_with_a_copy_of_cat0(tmp_path, monkeypatch, copy: str) -> None:
    """Four noise images per label plus ``copy`` (a path in the source) with cat0's pixels,
    ingested into a workspace at ``tmp_path``, which becomes the working directory."""
    source = tmp_path / "source"
    for offset, label in enumerate(("cat", "dog")):
        (source / label).mkdir(parents=True)
        for index in range(4):
            _noise(offset * 10 + index).save(source / label / f"{label}{index}.png")
    _noise(0).save(source / copy)
    write_params(tmp_path, source)
    monkeypatch.chdir(tmp_path)
    assert run_cli("ingest").exit_code == 0


def test_same_image_under_two_labels_is_an_error_naming_both_files(tmp_path, monkeypatch):
    _ingest_cats_and_dogs_with_a_copy_of_cat0(tmp_path, monkeypatch, "dog/copy of cat0.png")
    result = run_cli("prepare")
    assert result.exit_code == 1
    assert "same image (same decoded pixels) appears under different labels" in result.output
    assert "cat/cat0.png" in result.output and "dog/copy of cat0.png" in result.output


def test_same_image_twice_under_one_label_is_deduplicated_and_reported(tmp_path, monkeypatch):
    _ingest_cats_and_dogs_with_a_copy_of_cat0(tmp_path, monkeypatch, "cat/zz copy.png")
    assert run_cli("prepare").exit_code == 0
    report = json.loads((tmp_path / "data/prepared/validation.json").read_text())
    assert report["duplicates"] == [{"path": "cat/zz copy.png", "same_as": "cat/cat0.png"}]
    assert report["images"] == 8


class TestDecodedPixels:
    """What the odd-but-valid files decode to (open_rgb is what every stage uses)."""

    def test_exif_orientation_is_applied(self, tmp_path):
        path = tmp_path / "rotated.jpg"
        path.write_bytes(exif_rotated_jpeg())
        image = open_rgb(path)
        assert image.size == (30, 60)  # portrait after the 90-degree turn
        top, bottom = np.asarray(image)[5, 15], np.asarray(image)[-5, 15]
        assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
        assert bottom[2] > 200 and bottom[0] < 60

    def test_cmyk_becomes_the_same_colour_in_rgb(self, tmp_path):
        path = tmp_path / "cmyk.jpg"
        path.write_bytes(_encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
        red = np.asarray(open_rgb(path))[8, 8]
        assert red[0] > 230 and red[1] < 30 and red[2] < 30

    def test_16_bit_is_scaled_not_clipped(self, tmp_path):
        path = tmp_path / "g16.png"
        Image.fromarray(np.linspace(0, 4000, 256).astype(np.uint16).reshape(16, 16)).save(path)
        pixels = np.asarray(open_rgb(path))[..., 0]
        assert pixels.max() == 255 and len(np.unique(pixels)) > 200  # gradient kept

    def test_a_16k_16_bit_png_decodes_in_bounded_memory(self, tmp_path):
        """16384 x 16384 x 16 bits of zeros: 512 MiB decoded from 0.5 MB. The whole-image float64
        copy the 16-bit scaling used to make peaked at 5.4 GiB here; decode and pixel hash (what
        prepare does) now stay within the RGB result PIL must hold plus 512 MiB."""
        side = 16_384
        path = tmp_path / "zeros16.png"
        write_png16_zeros(path, side)
        assert path.stat().st_size < 1_000_000
        child = (
            "import json, sys\n"
            "from headswap.prepare import pixels_sha256\n"
            "from headswap.imaging import open_rgb\n"
            "image = open_rgb(sys.argv[1])\n"
            "pixels_sha256(image)\n"
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so the child would
            # report pytest's own peak once the suite has grown past the bound.
            "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
            "peak = int(status.split()[0]) * 1024\n"
            "print(json.dumps([image.mode, image.size, image.getextrema(), peak]))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", child, str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        mode, size, extrema, peak = json.loads(done.stdout.splitlines()[-1])
        assert (mode, size, extrema) == ("RGB", [side, side], [[0, 0]] * 3)
        rgb_in_pil = 4 * side * side  # PIL keeps RGB as 4 bytes a pixel
        assert peak < rgb_in_pil + 512 * 2**20, f"peak {peak / 2**20:.0f} MiB"

    def test_transparent_pixels_become_white(self, tmp_path):
        path = tmp_path / "rgba.png"
        Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
        assert (np.asarray(open_rgb(path)) == 255).all()

    def test_one_bit_and_palette_decode_to_rgb(self, tmp_path):
        for mode in ("1", "P"):
            path = tmp_path / f"{mode}.png"
            _noise(1, 16).convert(mode).save(path)
            image = open_rgb(path)
            assert image.mode == "RGB" and image.size == (16, 16)

    def test_bomb_guard_message_names_the_limit(self, tmp_path):
        path = tmp_path / "bomb.png"
        path.write_bytes(_png_claiming_size(100_000, 100_000))
        with pytest.raises(UnreadableImageError, match=f"limit {MAX_PIXELS} pixels"):
            open_rgb(path)
