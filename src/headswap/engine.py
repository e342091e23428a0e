"""The embedding engine: decode, run the frozen body, and write each embedding to the cache.

Decoding runs in DataLoader worker processes, overlapped with inference through a bounded
queue; inference runs on eager torch (CUDA or CPU) or on ONNX Runtime over the body exported to
ONNX once per backbone identity. ``embed_missing`` is the unit a distributed executor shards:
an ``EmbeddingJob`` holds only paths, hashes, configuration and the cache.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from headswap.backbones.body import Body, fix_same_padding
from headswap.backbones.spec import BackboneSpec, identity_key
from headswap.codeversion import code_version
from headswap.feature_cache import FeatureCache
from headswap.imaging import load_pixels
from headswap.io import atomic_path, progress
from headswap.onnx_session import open_session
from headswap.views import apply_view_np, view_transforms

if TYPE_CHECKING:
    from headswap.config import BackboneConfig, FeaturesConfig

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 NCHW pixels -> features [N, dim]
ONNX_OPSET = 17


@dataclass(frozen=True)
class EmbeddingJob:
    """Images to embed (paths and content hashes, in step) and where their embeddings go."""

    paths: list[Path]
    hashes: list[str]
    spec: BackboneSpec
    backbone: BackboneConfig
    config: FeaturesConfig
    cache: FeatureCache

    def part(self, share: slice) -> EmbeddingJob:
        """The same job over ``share`` of its images."""
        return replace(self, paths=self.paths[share], hashes=self.hashes[share])

    def with_config(self, **update) -> EmbeddingJob:
        """The same job with ``features`` settings changed (a worker's own engine settings)."""
        return replace(self, config=self.config.model_copy(update=update))


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


def torch_to_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, outputs: list[str], opset: int
) -> None:
    """Export ``module`` to ``path`` with a ``pixels`` input and every axis 0 named ``batch``."""
    with onnx_export_warnings_silenced():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["pixels", *outputs]},
            opset_version=opset,
            dynamo=False,
        )


def export_body(body: Body, size: int, target: Path) -> Path:
    """Export the frozen body (uint8 pixels in) to ONNX once; later runs reuse the cached file."""
    if target.is_file():
        os.utime(target)  # last use, for `headswap cache prune --older-than`
        return target
    fix_same_padding(body, size)
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with atomic_path(target) as tmp:
        torch_to_onnx(body, example, tmp, ["features"], ONNX_OPSET)
    return target


def onnx_runner(path: Path, threads: int | None = None) -> Runner:
    """ONNX Runtime over the exported body, tuned for throughput (``open_session``)."""
    session = open_session(path, threads=threads, throughput=True)
    return lambda pixels: session.run(None, {"pixels": pixels})[0]


def torch_runner(body: Body, device: str) -> Runner:
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


def make_runner(body: Body | Callable[[], Body], job: EmbeddingJob) -> tuple[Runner, str]:
    """A function from a uint8 pixel batch to features on the job's engine, and its description.

    ``body`` is the torch body, or a function that builds it: then it is only called when
    needed (the ONNX Runtime engine with a cached body never builds it).
    """
    load = (lambda: body) if isinstance(body, nn.Module) else body
    engine, device = resolve_engine(job.config)
    if engine == "onnxruntime":
        onnx_path = body_onnx_path(job.cache.root, job.spec, job.backbone)
        if not onnx_path.is_file():
            export_body(load(), job.spec.preprocessing.size, onnx_path)
        os.utime(onnx_path)
        return onnx_runner(onnx_path), "onnxruntime/cpu"
    return torch_runner(load(), device), f"torch/{device}"


def embed_missing(
    job: EmbeddingJob,
    runner: Runner,
    batches: Iterator[tuple[list[int], np.ndarray]] | None = None,
) -> None:
    """Embed the job's images (under every view) and cache each batch as soon as it is done.

    Memory stays bounded by the prefetch queue and one batch, whatever the dataset size; a
    killed run keeps every finished batch, so a re-run resumes where it stopped.

    Args:
        batches: an already started ``pixel_batches`` iterator over ``job.paths`` (so decoding
            can begin while the model loads); started here when None.
    """
    config = job.config
    views = view_transforms(config.views)
    if batches is None:
        batches = pixel_batches(job.paths, job.spec, config.batch_size, config.workers)
    # Cache writes run on a thread while the next batch is inferred (ONNX Runtime and torch
    # release the GIL). Leaving the `with` waits for the last write, on errors too, so every
    # finished batch lands.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") as writer:
        written: Future | None = None
        counted = progress(batches, "embed images", len(job.paths), lambda batch: len(batch[0]))
        for indices, pixels in counted:
            per_view = [runner(apply_view_np(pixels, turns, flip)) for turns, flip in views]
            stacked = np.stack(per_view, axis=1)  # [batch, views, dim]
            if written is not None:
                written.result()  # one batch in flight at most: memory stays bounded
            hashes = [job.hashes[i] for i in indices]
            written = writer.submit(_put_batch, job.cache, hashes, stacked)
        if written is not None:
            written.result()


def _put_batch(cache: FeatureCache, hashes: list[str], embeddings: np.ndarray) -> None:
    for sha256, embedding in zip(hashes, embeddings, strict=True):
        cache.put(sha256, embedding)
