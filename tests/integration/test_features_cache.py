"""The features stage over the content-addressed cache: incremental, torn entries, concurrency,
streamed output, engines, and the cache tools (info, prune)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from headswap.cli import app
from headswap.config import BackboneConfig, FeaturesConfig
from headswap.feature_cache import FeatureCache, prune_cache, summarize_cache
from headswap.feature_set import load_features
from headswap.features import extract_features
from headswap.io import file_sha256

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small real torchvision body; random-init weights saved to a file (loading path only)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    return path


def make_images(raw: Path, start: int, count: int) -> None:
    rng = np.random.default_rng(start)
    for index in range(start, start + count):
        label = "defective" if index % 2 else "functional"
        mode = "L" if index % 3 else "RGB"
        shape = (72, 60) if mode == "L" else (72, 60, 3)
        (raw / label).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels, mode=mode).save(raw / label / f"img{index:03d}.png")


def write_manifest(raw: Path, manifest: Path) -> list[dict]:
    rows = []
    for index, path in enumerate(sorted(raw.glob("*/*.png"))):
        split = ("train", "val", "test")[index % 3]
        rows.append(
            {
                "path": str(path.relative_to(raw)),
                "sha256": file_sha256(path),
                "label": path.parent.name,
                "split": split,
            }
        )
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "sha256", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


@pytest.fixture()
def workspace(tmp_path, weights):
    raw = tmp_path / "raw"
    make_images(raw, 0, 10)
    write_manifest(raw, tmp_path / "manifest.csv")
    backbone = BackboneConfig(
        name="torchvision/mobilenet_v3_small",
        weights=str(weights),
        taps=[3, "head"],
        pool="meanmax",
        image_size=64,
        ensemble=[],
    )
    features = FeaturesConfig(
        engine="onnxruntime",
        views="flip",
        batch_size=4,
        workers=1,
        cache_dir=str(tmp_path / "cache"),
    )
    return tmp_path, backbone, features


def run_stage(root: Path, backbone, features):
    return extract_features(
        backbone, features, root / "manifest.csv", root / "raw", root / "out" / "features.npz"
    )


def cache_of(root: Path, key: str) -> FeatureCache:
    return FeatureCache(root / "cache", key)


def test_only_new_images_are_embedded(workspace):
    root, backbone, features = workspace
    first = run_stage(root, backbone, features)
    assert (first.images, first.cache_hits, first.views) == (10, 0, 2)
    before = load_features(first.path)
    make_images(root / "raw", 10, 3)
    rows = write_manifest(root / "raw", root / "manifest.csv")
    second = run_stage(root, backbone, features)
    info = json.loads((root / "out" / "features_info.json").read_text())
    assert (second.images, second.cache_hits, info["embedded"]) == (13, 10, 3)
    after = load_features(second.path)
    assert list(after.sha256) == [row["sha256"] for row in rows]
    assert after.embeddings.shape == (13, 2, second.dim)
    old = {sha: emb for sha, emb in zip(before.sha256, before.embeddings, strict=True)}
    for sha, emb in zip(after.sha256, after.embeddings, strict=True):
        if sha in old:
            np.testing.assert_array_equal(emb, old[sha])
    last_run = json.loads(
        (root / "cache" / "embeddings" / second.cache_key / "last_run.json").read_text()
    )
    assert (last_run["hits"], last_run["misses"]) == (10, 3)


def test_a_new_code_version_misses_the_cache(workspace, monkeypatch):
    """Changed decoding or preprocessing code: every image is embedded again under a new key,
    through a freshly exported body; the old code's entries stay valid for the old code."""
    root, backbone, features = workspace
    first = run_stage(root, backbone, features)
    monkeypatch.setattr("headswap.features.code_version", lambda: "changed-code")
    monkeypatch.setattr("headswap.engine.code_version", lambda: "changed-code")
    second = run_stage(root, backbone, features)
    assert (second.cache_hits, second.images) == (0, 10) and second.cache_key != first.cache_key
    summary = summarize_cache(root / "cache")
    assert {k.key: k.entries for k in summary.keys} == {first.cache_key: 10, second.cache_key: 10}
    assert summary.bodies == 2
    key_json = root / "cache" / "embeddings" / second.cache_key / "key.json"
    assert json.loads(key_json.read_text())["code_version"] == "changed-code"
    monkeypatch.undo()
    assert run_stage(root, backbone, features).cache_hits == 10


def test_a_torn_entry_is_detected_and_recomputed(workspace):
    root, backbone, features = workspace
    first = run_stage(root, backbone, features)
    reference = load_features(first.path).embeddings
    victim = next((root / "cache" / "embeddings" / first.cache_key).glob("??/*.npy"))
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 2])  # a writer killed half-way (without our rename)
    assert cache_of(root, first.cache_key).get(victim.stem) is None
    second = run_stage(root, backbone, features)
    assert second.cache_hits == 9
    np.testing.assert_allclose(load_features(second.path).embeddings, reference, atol=1e-6)
    flipped = bytearray(victim.read_bytes())
    flipped[-3] ^= 0xFF  # one corrupted byte, same length
    victim.write_bytes(bytes(flipped))
    assert run_stage(root, backbone, features).cache_hits == 9


def test_two_processes_writing_one_cache_leave_valid_entries(workspace):
    root, backbone, features = workspace
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(SRC)!r})
        from pathlib import Path
        from headswap.config import BackboneConfig, FeaturesConfig
        from headswap.features import extract_features
        root, out = Path({str(root)!r}), Path(sys.argv[1])
        backbone = BackboneConfig.model_validate_json({backbone.model_dump_json()!r})
        features = FeaturesConfig.model_validate_json({features.model_dump_json()!r})
        print(extract_features(backbone, features, root / "manifest.csv", root / "raw", out))
    """)
    outs = [root / f"run{i}" / "features.npz" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for out in outs
    ]
    for run in runs:
        output = run.communicate(timeout=600)[0].decode()
        assert run.returncode == 0, output
    first, second = (load_features(out) for out in outs)
    np.testing.assert_allclose(first.embeddings, second.embeddings, atol=1e-6)
    key = json.loads((outs[0].parent / "features_info.json").read_text())["cache_key"]
    cache = cache_of(root, key)
    assert all(cache.get(sha) is not None for sha in first.sha256)
    assert not list((root / "cache").rglob(".*.tmp"))  # no temp file left behind
    third = run_stage(root, backbone, features)
    assert third.cache_hits == 10


def test_torch_and_onnxruntime_engines_agree(workspace):
    root, backbone, features = workspace
    ort = load_features(run_stage(root, backbone, features).path).embeddings
    torch_features = features.model_copy(
        update={"engine": "torch", "cache_dir": str(root / "cache-torch")}
    )
    result = run_stage(root, backbone, torch_features)
    assert result.engine == "torch/cpu"
    np.testing.assert_allclose(load_features(result.path).embeddings, ort, rtol=1e-3, atol=1e-4)


def test_streamed_npz_is_a_plain_numpy_archive(workspace):
    root, backbone, features = workspace
    result = run_stage(root, backbone, features)
    cache = cache_of(root, result.cache_key)
    with np.load(result.path, allow_pickle=False) as data:
        assert sorted(data.files) == ["embeddings", "label", "path", "sha256", "split"]
        expected = np.stack([cache.get(sha) for sha in data["sha256"]])
        np.testing.assert_array_equal(data["embeddings"], expected)
        assert data["embeddings"].dtype == np.float32


def test_cache_info_and_prune(workspace):
    root, backbone, features = workspace
    result = run_stage(root, backbone, features)
    other = run_stage(root, backbone, features.model_copy(update={"views": "none"}))
    summary = summarize_cache(root / "cache")
    assert {k.key: k.entries for k in summary.keys} == {result.cache_key: 10, other.cache_key: 10}
    assert summary.last_run[0] == other.cache_key and summary.bodies == 1

    key_dir = root / "cache" / "embeddings" / result.cache_key
    old_entries = sorted(key_dir.glob("??/*.npy"))[:4]
    long_ago = time.time() - 40 * 86400
    for path in old_entries:
        os.utime(path, (long_ago, long_ago))
    dry = prune_cache(root / "cache", older_than_days=30)
    assert (dry.entries, dry.applied) == (4, False) and all(p.exists() for p in old_entries)
    done = prune_cache(root / "cache", older_than_days=30, apply=True)
    assert done.entries == 4 and not any(p.exists() for p in old_entries)
    assert run_stage(root, backbone, features).cache_hits == 6  # pruned entries recomputed

    with open(root / "manifest.csv", newline="") as handle:
        keep = {result.cache_key: {row["sha256"] for row in csv.DictReader(handle)}}
    unreferenced = prune_cache(root / "cache", keep=keep, apply=True)
    assert unreferenced.entries == 10 and unreferenced.keys == [other.cache_key]
    assert [k.key for k in summarize_cache(root / "cache").keys] == [result.cache_key]


def test_cli_cache_info_and_backbones(workspace, weights):
    root, backbone, features = workspace
    run_stage(root, backbone, features)
    runner = CliRunner()
    info = runner.invoke(
        app,
        [
            "cache",
            "info",
            "--cache-dir",
            str(root / "cache"),
            "--params",
            str(root / "absent.yaml"),
        ],
    )
    assert info.exit_code == 0, info.output
    assert "torchvision/mobilenet_v3_small" in info.output
    assert "0/10 hits" in info.output
    prune = runner.invoke(
        app,
        [
            "cache",
            "prune",
            "--older-than",
            "0",
            "--cache-dir",
            str(root / "cache"),
            "--params",
            str(root / "absent.yaml"),
        ],
    )
    assert "would remove" in prune.output and "10 entries" in prune.output
    params = root / "params.yaml"
    params.write_text(
        f"backbone:\n  name: torchvision/mobilenet_v3_small\n"
        f"  weights: {weights}\n  taps: [3, head]\n"
    )
    listing = runner.invoke(
        app,
        [
            "backbones",
            "torchvision/mobilenet_v3_small",
            "torchvision/resnet18",
            "--params",
            str(params),
        ],
    )
    assert listing.exit_code == 0, listing.output
    assert "taps ['3', 'head']" in listing.output
    assert str(weights) in listing.output and "resnet18-f37072fd.pth" in listing.output
