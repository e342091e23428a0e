"""The features stage: embed every manifest image once per backbone configuration.

Embeddings live in a content-addressed cache (``headswap.feature_cache``) keyed by (image
sha256, backbone identity, views), shared by every DVC experiment and Prefect run on the
machine. The stage output ``features.npz`` is streamed from that cache row by row, so adding
images embeds only the new ones, sweeping heads never re-runs the body, and peak memory does
not grow with the dataset (beyond the output file itself, which is never held in RAM).

The pipeline, in order: ``missing_rows`` (cache lookup) -> ``embed_missing`` (decode in worker
processes, overlapped with inference through a bounded queue; one batch at a time into the
cache) -> ``write_features`` (stream the manifest's rows from the cache). ``embed_missing``
is the unit a distributed executor can shard: it only needs paths, hashes and the cache.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from headswap.backbones import (
    BackboneSpec,
    Body,
    fix_same_padding,
    identity_key,
    load_body,
    resolve_backbone,
)
from headswap.codeversion import code_version
from headswap.feature_cache import FeatureCache, default_cache_dir
from headswap.imaging import open_rgb
from headswap.io import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from headswap.config import BackboneConfig, FeaturesConfig

__all__ = ["FeatureCache", "FeatureSet", "default_cache_dir", "extract_features", "load_features"]

VIEW_SETS = {"none": 1, "flip": 2, "d4": 8}
_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_EXIF_ORIENTATION = 0x0112


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


def load_pixels(path: Path, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode and resize one file to uint8 CHW: the same values as
    ``headswap.imaging.load_model_input`` (which returns them as float32), at a quarter the size.

    Greyscale files without an EXIF rotation (ELPV's) are resized in one channel and then
    repeated, which gives identical pixels to resizing the RGB conversion for a third of the work.
    """
    resample = _RESAMPLING[interpolation]
    try:
        with Image.open(path) as image:
            if image.mode == "L" and not image.getexif().get(_EXIF_ORIENTATION):
                plane = np.asarray(image.resize((size, size), resample))
                return np.repeat(plane[None], 3, axis=0)
    except (OSError, ValueError, SyntaxError):
        pass  # let open_rgb raise its readable error
    resized = open_rgb(path).resize((size, size), resample)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).copy()


class _ImageFiles(Dataset):
    """Decodes and resizes in DataLoader worker processes, overlapped with inference."""

    def __init__(self, paths: list[Path], size: int, interpolation: str):
        self.paths, self.size, self.interpolation = paths, size, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        return index, load_pixels(self.paths[index], self.size, self.interpolation)


def _collate(
    items: list[tuple[int, np.ndarray]], shared: bool = True
) -> tuple[list[int], torch.Tensor | np.ndarray]:
    """Stack a batch; in a decoding worker with ``shared``, straight into shared memory.

    The DataLoader sends a shared-memory tensor as a handle, whereas a numpy batch is pickled
    through a pipe (4.8 MB per batch of 32 at 224 px): measured here, 0.28 ms of the inference
    process's CPU per image for the pickled copy against 0.08 ms for the handle.
    """
    indices, arrays = [index for index, _ in items], [array for _, array in items]
    if not shared or get_worker_info() is None:
        return indices, np.stack(arrays)
    batch = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8).share_memory_()
    np.stack(arrays, out=batch.numpy())
    return indices, batch


def _shared_memory_fits(batch_bytes: int, batches: int) -> bool:
    """Whether /dev/shm can hold ``batches`` batches twice over.

    Containers often mount a 64 MB /dev/shm; a worker that fills it dies of SIGBUS. Below this
    margin batches go through the pipe instead: slower, never a crash.
    """
    try:
        return shutil.disk_usage("/dev/shm").free >= 2 * batch_bytes * batches
    except OSError:
        return False


def pixel_batches(
    paths: list[Path], spec: BackboneSpec, batch_size: int, workers: int
) -> Iterator[tuple[list[int], np.ndarray]]:
    """(indices into ``paths``, uint8 NCHW batch), decoded ahead by ``workers`` processes.

    The queue is bounded: at most ``workers * 2`` batches wait for the model, so memory does not
    depend on the number of images.
    """
    size = spec.preprocessing.size
    in_flight = workers * 2 + 1  # the prefetch queue plus the batch being inferred
    shared = workers > 0 and _shared_memory_fits(batch_size * 3 * size * size, in_flight)
    loader = DataLoader(
        _ImageFiles(paths, size, spec.preprocessing.interpolation),
        batch_size=batch_size,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        collate_fn=functools.partial(_collate, shared=shared),
        worker_init_fn=_yield_to_inference,
    )
    batches = iter(loader)  # starts the workers now: decoding overlaps loading the model
    return ((indices, np.asarray(pixels)) for indices, pixels in batches)


def _yield_to_inference(_worker_id: int) -> None:
    """Run decoding workers at a lower CPU priority (nice 10) than inference.

    With as many inference threads as cores, a decoder at equal priority preempts one of them,
    and every parallel operator then waits for that thread. At a lower priority decoding fills
    the gaps between operators instead, and still gets whole cores whenever inference waits for
    it. Nice 10 rather than 19: as fast on a quiet machine (measured 135.8 vs 137.8 img/s, 127.9 at
    nice 0), and it keeps a fair share of CPU beside other people's jobs on a shared one.
    """
    os.nice(10)


def resolve_engine(config: FeaturesConfig) -> tuple[str, str]:
    """(engine, device). auto = torch on CUDA when there is a GPU, ONNX Runtime on CPU otherwise."""
    if config.engine == "onnxruntime":
        return "onnxruntime", "cpu"
    cuda = torch.cuda.is_available()
    if config.engine == "torch":
        return "torch", "cuda" if cuda else "cpu"
    return ("torch", "cuda") if cuda else ("onnxruntime", "cpu")


def body_onnx_path(cache_root: Path, spec: BackboneSpec, backbone: BackboneConfig) -> Path:
    """Where the exported body for this backbone, taps, pool and input size is cached."""
    # "padding": bodies exported before fix_same_padding existed are slower, not different.
    # "code_version": the graph holds the in-graph preprocessing, so a body exported before a
    # change to it must not be reused.
    identity = {
        **spec.identity(backbone.taps, backbone.pool),
        "input": "uint8",
        "padding": "fixed",
        "code_version": code_version(),
    }
    return cache_root / "bodies" / f"{identity_key(identity)}.onnx"


@contextmanager
def onnx_export_warnings_silenced() -> Iterator[None]:
    """Hide torch.onnx's "Constant folding - Only steps=1 can be constant folded" warnings.

    The TorchScript exporter prints them (three times per export) for slices with a step other
    than 1, which it leaves for ONNX Runtime to handle at load time; the graph is correct and
    the parity checks prove it, so in a stage's output they would only bury what matters.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        yield


def export_body(body: Body, size: int, target: Path) -> Path:
    """Export the frozen body (uint8 pixels in) to ONNX once; later runs reuse the cached file."""
    if target.is_file():
        os.utime(target)  # last use, for `headswap cache prune --older-than`
        return target
    fix_same_padding(body, size)
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with atomic_path(target) as tmp, onnx_export_warnings_silenced():
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


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def onnx_runner(path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime session over ``path``: one intra-op thread per core, sequential graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or cpu_cores()
    options.inter_op_num_threads = 1
    # No busy-waiting between ops: spinning threads steal the cores the decoding workers need
    # (and, on a shared machine, everyone else's); measured here, +20% images/s without it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"pixels": pixels})[0]


def torch_runner(body: Body, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """Eager torch; on CUDA with channels_last and autocast (bf16 where supported, else fp16).

    Pixels travel to the GPU as uint8 (a quarter of the float32 bytes) from pinned memory,
    and are cast inside the body.
    """
    body = body.to(device)
    if device != "cuda":

        @torch.inference_mode()
        def run_cpu(pixels: np.ndarray) -> np.ndarray:
            return body(torch.from_numpy(pixels)).numpy()

        return run_cpu
    body = body.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @torch.inference_mode()
    def run_cuda(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).pin_memory().to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype):
            return body(x).float().cpu().numpy()

    return run_cuda


def make_runner(
    body: Body | Callable[[], Body],
    spec: BackboneSpec,
    backbone: BackboneConfig,
    config: FeaturesConfig,
    cache_root: Path,
) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """A function from a uint8 pixel batch to features, on the configured engine.

    ``body`` is the torch body, or a function that builds it: then it is only called when
    needed (the ONNX Runtime engine with a cached body never builds it).
    """
    load = (lambda: body) if isinstance(body, torch.nn.Module) else body
    engine, device = resolve_engine(config)
    if engine == "onnxruntime":
        onnx_path = body_onnx_path(cache_root, spec, backbone)
        if not onnx_path.is_file():
            export_body(load(), spec.preprocessing.size, onnx_path)
        os.utime(onnx_path)
        return onnx_runner(onnx_path), "onnxruntime/cpu"
    return torch_runner(load(), device), f"torch/{device}"


def embed_missing(
    paths: list[Path],
    hashes: list[str],
    runner: Callable[[np.ndarray], np.ndarray],
    spec: BackboneSpec,
    config: FeaturesConfig,
    cache: FeatureCache,
    batches: Iterator[tuple[list[int], np.ndarray]] | None = None,
) -> None:
    """Embed images (under every view) and write each to the cache as soon as its batch is done.

    Memory stays bounded by the prefetch queue and one batch, whatever the dataset size; a
    killed run keeps every finished batch, so a re-run resumes where it stopped.

    Args:
        batches: an already started ``pixel_batches`` iterator over ``paths`` (so decoding can
            begin while the model loads); started here when None.
    """
    views = view_transforms(config.views)
    if batches is None:
        batches = pixel_batches(paths, spec, config.batch_size, config.workers)
    # Cache writes run on a thread while the next batch is inferred (ONNX Runtime and torch
    # release the GIL). Leaving the `with` waits for the last write, on errors too, so every
    # finished batch lands.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") as writer:
        written: Future | None = None
        for indices, pixels in image_progress(batches, len(paths)):
            per_view = [runner(apply_view_np(pixels, turns, flip)) for turns, flip in views]
            stacked = np.stack(per_view, axis=1)  # [batch, views, dim]
            if written is not None:
                written.result()  # one batch in flight at most: memory stays bounded
            written = writer.submit(_put_batch, cache, [hashes[i] for i in indices], stacked)
        if written is not None:
            written.result()


def _put_batch(cache: FeatureCache, hashes: list[str], embeddings: np.ndarray) -> None:
    for sha256, embedding in zip(hashes, embeddings, strict=True):
        cache.put(sha256, embedding)


def image_progress(batches: Iterator[tuple[list[int], np.ndarray]], total: int) -> Iterator:
    """Yield ``batches`` under a progress bar counted in images, with images per second."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]embed"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("embed", total=total, rate="-")
        for batch in batches:
            yield batch
            bar.advance(task, len(batch[0]))
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f}" if speed else "-")


def missing_rows(rows: list[dict], cache: FeatureCache) -> list[dict]:
    """Manifest rows without a valid cache entry (absent, torn or corrupt)."""
    return [row for row in rows if cache.get(row["sha256"]) is None]


def _must_get(cache: FeatureCache, row: dict) -> np.ndarray:
    embedding = cache.get(row["sha256"], touch=True)
    if embedding is None:  # only if another process pruned or damaged the entry under us
        raise RuntimeError(f"feature cache entry for {row['path']} vanished; re-run the stage")
    return embedding


def write_features(rows: list[dict], cache: FeatureCache, out_path: Path) -> tuple[int, ...]:
    """Stream ``features.npz`` from the cache, one row at a time; returns the per-row shape.

    The archive is the one ``numpy.savez`` writes (uncompressed members ``embeddings.npy``
    [N, views, dim] float32 plus sha256/path/label/split), so ``numpy.load`` reads it as usual,
    but the embeddings matrix never exists in memory here.
    """
    from headswap.errors import DataError

    if not rows:
        raise DataError(f"{out_path}: the manifest has no images to embed")
    row_shape = _must_get(cache, rows[0]).shape
    header = {"descr": "<f4", "fortran_order": False, "shape": (len(rows), *row_shape)}
    with atomic_path(out_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        with archive.open("embeddings.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            for row in rows:
                embedding = _must_get(cache, row)
                if embedding.shape != row_shape:
                    raise RuntimeError(
                        f"cache entry for {row['path']} has shape "
                        f"{embedding.shape}, expected {row_shape}"
                    )
                handle.write(embedding.astype("<f4", copy=False).tobytes())
        for name in ("sha256", "path", "label", "split"):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                column = np.array([row[name] for row in rows])
                np.lib.format.write_array(handle, column, allow_pickle=False)
    return row_shape


def feature_cache_key(spec: BackboneSpec, backbone: BackboneConfig, config: FeaturesConfig) -> str:
    """The content address of one feature configuration (everything but the image itself)."""
    return identity_key(feature_identity(spec, backbone, config))


def feature_identity(spec: BackboneSpec, backbone: BackboneConfig, config: FeaturesConfig) -> dict:
    """Everything that changes an image's embedding, except the image.

    ``code_version`` stands for the decoding and preprocessing code (``headswap.codeversion``):
    a real change to it re-embeds, any other edit keeps the cache.
    """
    identity = spec.identity(backbone.taps, backbone.pool)
    return {**identity, "views": config.views, "code_version": code_version()}


def _embed_locally(
    paths: list[Path],
    hashes: list[str],
    spec: BackboneSpec,
    backbone: BackboneConfig,
    config: FeaturesConfig,
    cache: FeatureCache,
) -> str:
    """Embed in this process; returns the engine description."""
    # Start the decoding workers first: they fill the queue while the model loads.
    batches = pixel_batches(paths, spec, config.batch_size, config.workers)
    load = lambda: load_body(backbone)[0]  # noqa: E731
    runner, engine = make_runner(load, spec, backbone, config, cache.root)
    embed_missing(paths, hashes, runner, spec, config, cache, batches)
    return engine


def extract_features(
    backbone: BackboneConfig,
    config: FeaturesConfig,
    manifest_path: Path,
    raw_dir: Path,
    out_path: Path,
) -> FeaturesResult:
    """Embed every manifest image (from cache where possible) and write ``features.npz``.

    Also writes ``features_info.json`` beside it (cache key, identity, engine, hits/misses)
    and records the hit rate in the cache for ``headswap cache info``.
    """
    from headswap.data import read_manifest

    started = time.perf_counter()
    spec = resolve_backbone(backbone)
    cache_root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    key = feature_cache_key(spec, backbone, config)
    cache = FeatureCache(cache_root, key)
    rows = read_manifest(manifest_path)
    missing = missing_rows(rows, cache)
    engine = "cache"
    if missing:
        cache.describe(feature_identity(spec, backbone, config))
        paths = [raw_dir / row["path"] for row in missing]
        hashes = [row["sha256"] for row in missing]
        if config.executor == "local":
            engine = _embed_locally(paths, hashes, spec, backbone, config, cache)
        else:  # dask or torchrun: sharded by headswap.distributed into the same cache
            from headswap.distributed import embed_distributed

            body = load_body(backbone)[0]
            engine = embed_distributed(paths, hashes, body, spec, backbone, config, cache)
    views, dim = write_features(rows, cache, out_path)
    hits, seconds = len(rows) - len(missing), time.perf_counter() - started
    cache.record_run(hits, len(missing), seconds)
    info = {
        "cache_key": key,
        "identity": spec.identity(backbone.taps, backbone.pool),
        "views": config.views,
        "engine": engine,
        "images": len(rows),
        "embedded": len(missing),
        "cache_hits": hits,
        "hit_rate": round(hits / len(rows), 4),
        "dim": dim,
        "cache_dir": str(cache_root),
    }
    atomic_write_text(out_path.with_name("features_info.json"), json.dumps(info, indent=2))
    return FeaturesResult(out_path, len(rows), dim, views, hits, key, engine)


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
