"""Feature-extraction benchmark on ELPV: every figure measured in one run, reported as ratios.

    python benchmarks/features.py [--raw data/raw] [--out benchmarks/results/features.json]

What is measured (on ``BENCH_BODY``: efficientnet_lite0 'head' tap, views none, batch 32):

- ``limit_img_s``: ONNX Runtime over the exported body on pre-decoded uint8 batches in memory
  (the mean of one measurement before and one after the features-stage runs).
- ``torch_eager_img_s``: the same body in PyTorch eager (fp32, CPU), on the same images, at the
  fastest of batch sizes 1, 4, 8 and 32.
- ``pipeline_img_s``: ``extract_features`` from image files with a cold embedding cache
  (the exported body is already cached, as it is after the first run of any configuration),
  run in a fresh process that also reports its peak RSS.
- ``incremental_vs_cold``: after that cold run over 95% of ELPV, the run that adds the other 5%
  (every 20th image), divided by the cold run's time.
- ``naive_epochs_s``: the PyTorch transfer-learning tutorial's "ConvNet as fixed feature
  extractor" on the same body: every epoch decodes and augments every train image (PIL and
  torchvision transforms, batch 4), runs the frozen body forward in train mode and steps the new
  linear layer, then runs the val images through in eval mode. Timed per phase on a subset of
  images and *extrapolated* to 10 epochs over the full train and val splits.
- ``naive_fast_epochs_s``: a favourable version of that loop (headswap's fast decoder, batch 32,
  the body in eval mode under no_grad), a lower bound for any per-epoch approach.
- ``peak_rss_mb`` for ELPV and for a doubled ELPV (every file also copied with one trailing
  byte, so it has a new sha256; the copies are embedded, the originals come from the cache).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from headswap.onnx_session import cpu_cores  # noqa: E402

BATCH = 32
# The body every figure here is measured on (stated in benchmarks/README.md): Lite0, its own
# input size, the head tap only, one view. Spelled out so a params.yaml change never moves it.
BENCH_BODY = {
    "name": "efficientnet_lite0",
    "weights": None,
    "image_size": None,
    "taps": ["head"],
    "pool": "mean",
    "ensemble": [],
}
TORCH_BATCHES = (1, 4, 8, 32)
EPOCHS = 10


def cpu_seconds() -> float:
    """CPU time of this process and of its children reaped so far (decoding workers)."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds over a block. On a shared machine wall time swings with everyone
    else's load; CPU time measures the work this code did, so the CPU ratios stay stable."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=ROOT / "data" / "raw", help="ELPV ImageFolder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/features.json")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes")
    parser.add_argument("--limit-images", type=int, default=256)
    parser.add_argument("--torch-images", type=int, default=64)
    parser.add_argument("--naive-images", type=int, default=64)
    parser.add_argument(
        "--stage", nargs=4, metavar=("MANIFEST", "RAW", "CACHE", "OUT"), help=argparse.SUPPRESS
    )  # internal: one features run in this process
    return parser.parse_args()


def run_stage_here(manifest: str, raw: str, cache: str, out: str, workers: int) -> None:
    """Child-process mode: one ``extract_features`` call, timed, with this process's peak RSS."""
    from headswap.config import BackboneConfig, FeaturesConfig
    from headswap.features import extract_features

    features = FeaturesConfig(
        engine="onnxruntime", views="none", workers=workers, batch_size=BATCH, cache_dir=cache
    )
    with Clock() as clock:
        body = BackboneConfig(**BENCH_BODY)
        result = extract_features(body, features, Path(manifest), Path(raw), Path(out))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, so a child would report the
    # parent's peak. VmHWM belongs to this process image alone.
    print(
        json.dumps(
            {
                "seconds": clock.wall,
                "cpu_seconds": clock.cpu,
                "images": result.images,
                "hits": result.cache_hits,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stage(manifest: Path, raw: Path, cache: Path, out: Path, workers: int) -> dict:
    """Run the features stage in a fresh process (so its peak RSS is its own)."""
    command = [
        sys.executable,
        __file__,
        "--workers",
        str(workers),
        "--stage",
        str(manifest),
        str(raw),
        str(cache),
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"features run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_rows(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["path", "sha256", "label", "split"], extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(rows)
    return path


def prepared_manifest(raw: Path, work: Path) -> tuple[list[dict], list[str]]:
    """The prepare stage over ELPV: manifest rows and class order."""
    from headswap.config import DataConfig
    from headswap.manifest import read_classes, read_manifest
    from headswap.prepare import prepare

    result = prepare(DataConfig(source=str(raw)), raw, work / "prepared")
    return read_manifest(result.manifest), read_classes(result.report)


def decoded(rows: list[dict], raw: Path, count: int, size: int) -> np.ndarray:
    from headswap.imaging import load_pixels

    return np.stack([load_pixels(raw / row["path"], size) for row in rows[:count]])


def images_per_second(
    run, pixels: np.ndarray, repeats: int = 1, batch: int = BATCH
) -> tuple[float, float]:
    """(images/s, CPU s/image) of ``run`` over ``pixels`` in batches, after a warm-up batch."""
    run(pixels[:batch])
    with Clock() as clock:
        for _ in range(repeats):
            for start in range(0, len(pixels), batch):
                run(pixels[start : start + batch])
    images = repeats * len(pixels)
    return images / clock.wall, clock.cpu / images


def engine_figures(rows: list[dict], raw: Path, cache: Path, args) -> tuple[dict, Callable]:
    """torch_eager_img_s and ONNX Runtime's limit on the same in-memory batches, plus a function
    that measures the limit again (after the pipeline runs, since the machine's load drifts)."""
    from headswap.backbones.loader import load_body
    from headswap.config import BackboneConfig
    from headswap.engine import body_onnx_path, export_body, onnx_runner

    backbone = BackboneConfig(**BENCH_BODY)
    body, spec = load_body(backbone)
    onnx_path = export_body(body, spec.preprocessing.size, body_onnx_path(cache, spec, backbone))
    pixels = decoded(rows, raw, args.limit_images, spec.preprocessing.size)
    runner = onnx_runner(onnx_path)
    limit, limit_cpu = images_per_second(runner, pixels, repeats=2)
    torch.set_num_threads(cpu_cores())

    @torch.inference_mode()
    def eager(batch: np.ndarray) -> np.ndarray:
        return body(torch.from_numpy(batch)).numpy()

    # Eager torch gets its best batch size (on this CPU small batches beat 32), so the ratio
    # is ONNX Runtime against the best a plain PyTorch user would see, not a handicapped one.
    eager_by_batch = {
        batch: images_per_second(eager, pixels[: args.torch_images], batch=batch)
        for batch in TORCH_BATCHES
    }
    eager_batch = max(eager_by_batch, key=lambda batch: eager_by_batch[batch][0])
    eager_rate, eager_cpu = eager_by_batch[eager_batch]
    figures = {
        "limit_before_img_s": limit,
        "torch_eager_img_s": eager_rate,
        "torch_eager_batch": eager_batch,
        "torch_eager_img_s_by_batch": {b: rate for b, (rate, _) in eager_by_batch.items()},
        "ort_vs_torch": limit / eager_rate,
        "limit_before_cpu_s_per_img": limit_cpu,
        "torch_eager_cpu_s_per_img": eager_cpu,
        "ort_vs_torch_cpu": eager_cpu / limit_cpu,
    }
    return figures, lambda: images_per_second(runner, pixels, repeats=2)


class TutorialImages(torch.utils.data.Dataset):
    """The tutorial's ImageFolder pipeline: PIL decode, then its torchvision transforms."""

    def __init__(self, paths: list[Path], labels: list[int], transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def tutorial_phase_seconds(rows: list[dict], raw: Path, args) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds per image of each phase of the PyTorch transfer-learning tutorial's
    "ConvNet as fixed feature extractor", on the same body (EfficientNet-Lite0, ImageNet weights).

    As in the tutorial: the classifier is replaced by a new linear layer and every other
    parameter is frozen; each epoch has a train phase (``model.train()``, grad enabled,
    RandomResizedCrop(224) + horizontal flip, batch 4, shuffled, SGD with momentum) and a val
    phase (``model.eval()``, no grad, Resize(256) + CenterCrop(224)). Images are decoded with PIL
    in ``args.workers`` DataLoader processes (the tutorial uses 4; this machine has 2 cores).
    Each phase is timed from its second batch on, so DataLoader start-up is not extrapolated.
    """
    from torchvision import transforms

    from headswap.backbones.loader import build_architecture, load_weights, resolve_backbone
    from headswap.config import BackboneConfig

    spec = resolve_backbone(BackboneConfig(**BENCH_BODY))
    model, _ = build_architecture(spec.name)
    load_weights(spec.name, model, spec.weights_path)
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.classifier = torch.nn.Linear(model.classifier.in_features, 2)
    optimizer = torch.optim.SGD(model.classifier.parameters(), lr=1e-3, momentum=0.9)
    normalize = transforms.Normalize(
        [m / 255 for m in spec.preprocessing.mean], [s / 255 for s in spec.preprocessing.std]
    )
    phases = {
        "train": transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        ),
        "val": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)]),
    }
    subset = rows[: args.naive_images]
    labels = [int(row["label"] == "defective") for row in subset]
    timings = {}
    for phase, augment in phases.items():
        transform = transforms.Compose([augment, transforms.ToTensor(), normalize])
        images = TutorialImages([raw / row["path"] for row in subset], labels, transform)
        loader = torch.utils.data.DataLoader(
            images, batch_size=4, shuffle=True, num_workers=args.workers
        )
        model.train(phase == "train")
        timings[phase] = _timed_phase(model, optimizer, loader, train=phase == "train")
    return timings


def _timed_phase(model, optimizer, loader, train: bool) -> tuple[float, float]:
    """(wall, CPU) seconds per image of one tutorial epoch phase, after its first batch."""
    batches = iter(loader)
    first_inputs, first_labels = next(batches)
    _tutorial_step(model, optimizer, first_inputs, first_labels, train)
    images = 0
    with Clock() as clock:
        for inputs, labels in batches:
            _tutorial_step(model, optimizer, inputs, labels, train)
            images += len(labels)
    return clock.wall / images, clock.cpu / images


def _tutorial_step(model, optimizer, inputs, labels, train: bool) -> None:
    optimizer.zero_grad()
    with torch.set_grad_enabled(train):
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        if train:
            loss.backward()
            optimizer.step()


def naive_seconds_per_image(rows: list[dict], raw: Path, args) -> tuple[float, float]:
    """(wall, CPU) seconds per image of a *favourable* tutorial loop, a lower bound for it:
    headswap's fast uint8 decoder, batch 32, the body in eval mode under no_grad, a linear head
    step."""
    from headswap.backbones.loader import load_body, resolve_backbone
    from headswap.config import BackboneConfig
    from headswap.engine import pixel_batches

    body, _ = load_body(BackboneConfig(**BENCH_BODY))
    head = torch.nn.Linear(1280, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
    subset = rows[: args.naive_images]
    labels = torch.tensor([int(row["label"] == "defective") for row in subset])
    spec = resolve_backbone(BackboneConfig(**BENCH_BODY))
    batches = pixel_batches([raw / row["path"] for row in subset], spec, BATCH, args.workers)
    with Clock() as clock:
        naive_loop(body, head, optimizer, batches, labels)
    return clock.wall / len(subset), clock.cpu / len(subset)


def naive_loop(body, head, optimizer, batches, labels) -> None:
    for indices, pixels in batches:
        with torch.no_grad():
            features = body(torch.from_numpy(pixels).float())
        loss = torch.nn.functional.cross_entropy(head(features), labels[indices])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def head_seconds(features_path: Path, classes: list[str]) -> tuple[float, float]:
    from headswap.config import HeadConfig
    from headswap.feature_set import load_features
    from headswap.train import train_head

    with Clock() as clock:
        train_head(load_features(features_path), classes, HeadConfig(device="cpu"))
    return clock.wall, clock.cpu


def doubled_dataset(rows: list[dict], raw: Path, work: Path) -> tuple[list[dict], Path]:
    """ELPV twice: the originals (linked) plus copies with one trailing byte (new sha256)."""
    from headswap.io import file_sha256

    root = work / "doubled"
    (root / "copy").mkdir(parents=True)
    (root / "orig").symlink_to(raw.resolve())
    doubled = [{**row, "path": f"orig/{row['path']}"} for row in rows]
    for row in rows:
        target = root / "copy" / row["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((raw / row["path"]).read_bytes() + b"\0")
        doubled.append({**row, "path": f"copy/{row['path']}", "sha256": file_sha256(target)})
    return doubled, root


def pipeline_figures(rows: list[dict], raw: Path, work: Path, cache: Path, args) -> dict:
    """Cold 95% run, the +5% incremental run, and the doubled-dataset run, each in a subprocess."""
    base = [row for index, row in enumerate(rows) if index % 20 != 19]
    cold = run_stage(
        write_rows(base, work / "base.csv"), raw, cache, work / "a/f.npz", args.workers
    )
    full_manifest = write_rows(rows, work / "full.csv")
    incremental = run_stage(full_manifest, raw, cache, work / "b/f.npz", args.workers)
    doubled_rows, doubled_raw = doubled_dataset(rows, raw, work)
    doubled = run_stage(
        write_rows(doubled_rows, work / "doubled.csv"),
        doubled_raw,
        cache,
        work / "c/f.npz",
        args.workers,
    )
    return {
        "pipeline_img_s": cold["images"] / cold["seconds"],
        "cold_run": cold,
        "incremental_run": incremental,
        "doubled_run": doubled,
        "incremental_vs_cold": incremental["seconds"] / cold["seconds"],
        "peak_rss_mb": max(cold["peak_rss_mb"], incremental["peak_rss_mb"]),
        "doubled_peak_rss_mb": doubled["peak_rss_mb"],
        "full_features": str(work / "b/f.npz"),
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": cpu_cores(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def ratios(
    figures: dict,
    tutorial: dict[str, tuple[float, float]],
    naive_fast: tuple[float, float],
    head: tuple[float, float],
    phase_images: dict[str, int],
) -> dict:
    """The headline ratios, in wall time (the targets) and in CPU time (stable under load).

    ``tutorial`` and ``naive_fast`` are seconds per image; both are extrapolated to EPOCHS
    epochs over the train split (train phase) and the val split (val phase).
    """
    cold, incremental = figures["cold_run"], figures["incremental_run"]
    headswap_wall = cold["seconds"] + incremental["seconds"] + head[0]
    headswap_cpu = cold["cpu_seconds"] + incremental["cpu_seconds"] + head[1]
    pipeline_cpu = cold["cpu_seconds"] / cold["images"]
    epoch_images = sum(phase_images.values())

    def tutorial_epochs(column: int) -> float:
        return EPOCHS * sum(n * tutorial[phase][column] for phase, n in phase_images.items())

    return {
        "pipeline_vs_limit": figures["pipeline_img_s"] / figures["limit_img_s"],
        "naive_epochs_s": tutorial_epochs(0),
        "speedup_vs_naive": tutorial_epochs(0) / headswap_wall,
        "naive_fast_epochs_s": EPOCHS * epoch_images * naive_fast[0],
        "speedup_vs_naive_fast": EPOCHS * epoch_images * naive_fast[0] / headswap_wall,
        "headswap_extract_and_train_s": headswap_wall,
        "head_train_s": head[0],
        "naive_train_seconds_per_image": tutorial["train"][0],
        "naive_val_seconds_per_image": tutorial["val"][0],
        "naive_fast_seconds_per_image": naive_fast[0],
        "naive_extrapolated_to_images": EPOCHS * epoch_images,
        "pipeline_cpu_s_per_img": pipeline_cpu,
        "pipeline_vs_limit_cpu": figures["limit_cpu_s_per_img"] / pipeline_cpu,
        "incremental_vs_cold_cpu": incremental["cpu_seconds"] / cold["cpu_seconds"],
        "speedup_vs_naive_cpu": tutorial_epochs(1) / headswap_cpu,
        "speedup_vs_naive_fast_cpu": EPOCHS * epoch_images * naive_fast[1] / headswap_cpu,
    }


def measure(rows: list[dict], classes: list[str], raw: Path, work: Path, args) -> dict:
    """Every measurement, in order, on one machine in one run."""
    cache = work / "cache"
    print(f"{len(rows)} images; measuring engines...", flush=True)
    figures, measure_limit = engine_figures(rows, raw, cache, args)
    print(json.dumps(figures), "\nfeatures stage runs...", flush=True)
    figures.update(pipeline_figures(rows, raw, work, cache, args))
    figures["limit_after_img_s"], figures["limit_after_cpu_s_per_img"] = measure_limit()
    # The limit is the mean of the measurements either side of the pipeline runs.
    figures["limit_img_s"] = (figures["limit_before_img_s"] + figures["limit_after_img_s"]) / 2
    figures["limit_cpu_s_per_img"] = (
        figures["limit_before_cpu_s_per_img"] + figures["limit_after_cpu_s_per_img"]
    ) / 2
    print("naive baselines and head...", flush=True)
    tutorial = tutorial_phase_seconds(rows, raw, args)
    naive_fast = naive_seconds_per_image(rows, raw, args)
    head = head_seconds(Path(figures.pop("full_features")), classes)
    phase_images = {phase: sum(row["split"] == phase for row in rows) for phase in tutorial}
    return {**figures, **ratios(figures, tutorial, naive_fast, head, phase_images)}


def main() -> None:
    args = parse_args()
    if args.stage:
        run_stage_here(*args.stage, workers=args.workers)
        return
    raw = args.raw.resolve()
    if not raw.is_dir():
        raise SystemExit(f"{raw}: no ELPV images (run `headswap ingest` or `dvc pull` first)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="headswap-bench-") as tmp:
        rows, classes = prepared_manifest(raw, Path(tmp))
        figures = measure(rows, classes, raw, Path(tmp), args)
    figures.update(
        {
            "images": len(rows),
            "workers": args.workers,
            "batch_size": BATCH,
            "naive_measured_images": args.naive_images,
            "machine": machine(),
            "bench_seconds": time.perf_counter() - started,
            "command": "python benchmarks/features.py " + " ".join(sys.argv[1:]),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for key in (
        "limit_img_s",
        "pipeline_img_s",
        "pipeline_vs_limit",
        "torch_eager_img_s",
        "ort_vs_torch",
        "naive_epochs_s",
        "speedup_vs_naive",
        "naive_fast_epochs_s",
        "speedup_vs_naive_fast",
        "incremental_vs_cold",
        "peak_rss_mb",
        "doubled_peak_rss_mb",
        "pipeline_vs_limit_cpu",
        "ort_vs_torch_cpu",
        "speedup_vs_naive_cpu",
        "incremental_vs_cold_cpu",
    ):
        print(f"{key:>24}: {figures[key]:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
