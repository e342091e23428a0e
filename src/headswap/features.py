"""The features stage: embed every manifest image once per backbone configuration.

Embeddings live in a content-addressed cache keyed by (image sha256, backbone identity, views),
shared by every DVC experiment and Prefect run on the machine. The stage output
``features.npz`` gathers the manifest's rows from that cache, so adding images embeds only the
new ones, and sweeping heads never re-runs the body.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from headswap.backbones import BackboneSpec, FrozenBody, identity_key, load_body
from headswap.config import BackboneConfig, FeaturesConfig
from headswap.data import read_manifest
from headswap.imaging import load_model_input
from headswap.io import atomic_path, atomic_write_text, progress

VIEW_SETS = {"none": 1, "flip": 2, "d4": 8}


@dataclass(frozen=True)
class FeaturesResult:
    path: Path
    images: int
    dim: int
    views: int
    cache_hits: int
    cache_key: str
    engine: str


def view_transforms(views: str) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) for each view; the exported model applies the same list."""
    if views == "none":
        return [(0, False)]
    if views == "flip":
        return [(0, False), (0, True)]
    return [(k, flip) for flip in (False, True) for k in range(4)]


def apply_view_np(batch: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """NCHW numpy twin of ``headswap.export.apply_view`` (torch), for the ONNX Runtime engine."""
    out = np.flip(batch, axis=3) if flip else batch
    out = np.rot90(out, k=turns, axes=(2, 3)) if turns else out
    return np.ascontiguousarray(out)


def default_cache_dir() -> Path:
    """One cache per user, outside any workspace, so DVC temp workspaces share it too."""
    root = os.environ.get("HEADSWAP_CACHE_DIR") or Path.home() / ".cache" / "headswap"
    return Path(root)


class FeatureCache:
    """Per-image embedding files: ``<root>/embeddings/<key>/<sha[:2]>/<sha>.npy``.

    Each file carries a blake2b digest of its payload, so a torn or corrupted entry is detected
    and recomputed, never read. Writes go through a temp file and a rename, so two runs writing
    the same entry at once both leave a complete file.
    """

    def __init__(self, root: Path, key: str):
        self.key = key
        self.dir = root / "embeddings" / key

    def _path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        path = self._path(sha256)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        digest, payload = blob[:32], blob[32:]
        if hashlib.blake2b(payload, digest_size=32).digest() != digest:
            return None
        return np.load(io.BytesIO(payload), allow_pickle=False)

    def put(self, sha256: str, embedding: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(embedding, dtype=np.float32), allow_pickle=False)
        payload = buffer.getvalue()
        with atomic_path(self._path(sha256)) as tmp:
            tmp.write_bytes(hashlib.blake2b(payload, digest_size=32).digest() + payload)


class _ImageFiles(Dataset):
    """Decodes and resizes in DataLoader worker processes, overlapped with inference."""

    def __init__(self, paths: list[Path], size: int, interpolation: str):
        self.paths, self.size, self.interpolation = paths, size, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        return index, load_model_input(self.paths[index], self.size, self.interpolation)


def _collate(items: list[tuple[int, np.ndarray]]) -> tuple[list[int], np.ndarray]:
    # Plain numpy batches: ONNX Runtime takes them as they are, torch wraps them without a copy.
    return [index for index, _ in items], np.stack([array for _, array in items])


def _batches(paths: list[Path], spec: BackboneSpec, config: FeaturesConfig) -> Iterator:
    """Bounded prefetch: at most ``workers * 2`` batches are decoded ahead of the model."""
    loader = DataLoader(
        _ImageFiles(paths, spec.preprocessing.size, spec.preprocessing.interpolation),
        batch_size=config.batch_size,
        num_workers=config.workers,
        prefetch_factor=2 if config.workers else None,
        collate_fn=_collate,
    )
    yield from loader


def resolve_engine(config: FeaturesConfig) -> tuple[str, str]:
    """(engine, device). auto = torch on CUDA when there is a GPU, ONNX Runtime on CPU otherwise."""
    if config.engine == "onnxruntime":
        return "onnxruntime", "cpu"
    cuda = torch.cuda.is_available()
    if config.engine == "torch":
        return "torch", "cuda" if cuda else "cpu"
    return ("torch", "cuda") if cuda else ("onnxruntime", "cpu")


def body_onnx_path(cache_root: Path, spec: BackboneSpec, backbone: BackboneConfig) -> Path:
    return cache_root / "bodies" / f"{identity_key(spec.identity(backbone.taps, backbone.pool))}.onnx"


def export_body(body: FrozenBody, size: int, target: Path) -> Path:
    """Export the frozen body to ONNX once; later runs reuse the cached file."""
    if target.is_file():
        return target
    example = torch.zeros(2, 3, size, size)
    with atomic_path(target) as tmp:
        torch.onnx.export(
            body,
            (example,),
            str(tmp),
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return target


def _onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"pixels": pixels})[0]


def _torch_runner(body: FrozenBody, device: str) -> Callable[[np.ndarray], np.ndarray]:
    body = body.to(device)
    if device == "cuda":
        body = body.to(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(device, non_blocking=True)
        if device != "cuda":
            return body(x).numpy()
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype):
            return body(x).float().cpu().numpy()

    return run


def make_runner(
    body: FrozenBody, spec: BackboneSpec, backbone: BackboneConfig, config: FeaturesConfig,
    cache_root: Path,
) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """A function from a pixel batch to features, on the configured engine."""
    engine, device = resolve_engine(config)
    if engine == "onnxruntime":
        onnx_path = export_body(body, spec.preprocessing.size, body_onnx_path(cache_root, spec, backbone))
        return _onnx_runner(onnx_path), "onnxruntime/cpu"
    return _torch_runner(body, device), f"torch/{device}"


def embed_missing(
    paths: list[Path], hashes: list[str], runner: Callable[[np.ndarray], np.ndarray],
    spec: BackboneSpec, config: FeaturesConfig, cache: FeatureCache,
) -> None:
    """Embed images (under every view) and write each to the cache as soon as its batch is done.

    Memory stays bounded by the prefetch queue and one batch, whatever the dataset size; a
    killed run keeps every finished batch, so a re-run resumes where it stopped.
    """
    views = view_transforms(config.views)
    batches = _batches(paths, spec, config)
    total = -(-len(paths) // config.batch_size)
    for indices, pixels in progress(batches, f"embed {len(paths)} images", total=total):
        per_view = [runner(apply_view_np(pixels, turns, flip)) for turns, flip in views]
        stacked = np.stack(per_view, axis=1)  # [batch, views, dim]
        for row, index in enumerate(indices):
            cache.put(hashes[index], stacked[row])


def extract_features(
    backbone: BackboneConfig, config: FeaturesConfig, manifest_path: Path, raw_dir: Path,
    out_path: Path,
) -> FeaturesResult:
    """Embed every manifest image (from cache where possible) and write ``features.npz``."""
    body, spec = load_body(backbone)
    cache_root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    key = feature_cache_key(spec, backbone, config)
    cache = FeatureCache(cache_root, key)
    rows = read_manifest(manifest_path)
    missing = [row for row in rows if cache.get(row["sha256"]) is None]
    engine = "cache"
    if missing:
        paths = [raw_dir / row["path"] for row in missing]
        hashes = [row["sha256"] for row in missing]
        if config.executor == "local":
            runner, engine = make_runner(body, spec, backbone, config, cache_root)
            embed_missing(paths, hashes, runner, spec, config, cache)
        else:  # dask or torchrun: sharded by headswap.distributed into the same cache
            from headswap.distributed import embed_distributed

            engine = embed_distributed(paths, hashes, body, spec, backbone, config, cache)
    embeddings = np.stack([_must_get(cache, row) for row in rows])
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                embeddings=embeddings,
                sha256=np.array([row["sha256"] for row in rows]),
                path=np.array([row["path"] for row in rows]),
                label=np.array([row["label"] for row in rows]),
                split=np.array([row["split"] for row in rows]),
            )
    info = {
        "cache_key": key, "identity": spec.identity(backbone.taps, backbone.pool),
        "views": config.views, "engine": engine, "images": len(rows),
        "embedded": len(missing), "cache_hits": len(rows) - len(missing),
        "dim": int(embeddings.shape[-1]),
    }
    atomic_write_text(out_path.with_name("features_info.json"), json.dumps(info, indent=2))
    return FeaturesResult(
        out_path, len(rows), int(embeddings.shape[-1]), embeddings.shape[1],
        len(rows) - len(missing), key, engine,
    )


def _must_get(cache: FeatureCache, row: dict) -> np.ndarray:
    embedding = cache.get(row["sha256"])
    if embedding is None:  # only if another process pruned the cache under us
        raise RuntimeError(f"feature cache entry for {row['path']} vanished; re-run the stage")
    return embedding


def feature_cache_key(spec: BackboneSpec, backbone: BackboneConfig, config: FeaturesConfig) -> str:
    """The content address of one feature configuration (everything but the image itself)."""
    return identity_key({**spec.identity(backbone.taps, backbone.pool), "views": config.views})


@dataclass(frozen=True)
class FeatureSet:
    """``features.npz`` loaded: embeddings [N, views, D] and per-row metadata."""

    embeddings: np.ndarray
    sha256: np.ndarray
    path: np.ndarray
    label: np.ndarray
    split: np.ndarray

    def select(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split == split
        return self.embeddings[mask], self.label[mask]


def load_features(path: Path) -> FeatureSet:
    with np.load(path, allow_pickle=False) as data:
        return FeatureSet(**{name: data[name] for name in data.files})
