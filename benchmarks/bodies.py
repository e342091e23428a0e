"""Cheaper bodies for the default configuration: throughput and accuracy, side by side.

    python benchmarks/bodies.py --raw /work/scratch/elpv-raw --default /work/scratch/default \\
        --work /work/scratch/bodies [--images 128] [--rounds 3] [--calibration 128]

The default (params.yaml: Lite2 at 300 px + Lite0 at 384 px, taps 3..head, meanmax, flip views,
ONNX Runtime on CPU) against cheaper candidates. Each candidate has a **speed** (the ONNX bodies
the features stage would run, on the views it would run them on) and **features** for all 2,624
ELPV images:

- default: ``<default>/features.npz`` as the features stage wrote it (both views, both bodies).
- a. int8: the default's exported body quantized statically by ONNX Runtime (QDQ, per-channel
  int8 weights, uint8 activations, Conv and Add quantized; calibrated on images that are in
  the train part of all five splits), then run over ELPV like the stage does (flip views).
- b. a smaller member: Lite0 at 300 px (extracted alone through ``extract_features``: at the
  main body's own size the in-model resize is the identity), or no member (the main body's
  columns of the default).
- c. views for the main body only: the flip rows' member columns replaced by the same image's
  unflipped member columns (the member runs on the unflipped image only).
- d. fewer taps: column slices of the default.

Throughput is measured in one process, on pre-decoded uint8 images at 300 px in memory, batch
32 (the stage's), ONNX Runtime tuned as the stage opens it (one intra-op thread per core), in
alternating rounds (the candidate order rotates each round); CPU time is this process's. A
candidate's cost is the sum of its parts: e.g. c runs the ensemble on the unflipped image and
the main body alone on the flipped one.

Accuracy: the logistic head with params.yaml's head and threshold (C 0.01, threshold 0.5),
trained on train (calibrated on val) and scored on test for ``data.split.seed`` 0..4 (test_size
0.25, val_size 0.1), through ``benchmarks/accuracy.py``'s helpers. The rule: a candidate
qualifies at >= 1.5x the default's throughput (wall and CPU) with mean accuracy and mean ROC-AUC
no more than one standard error (the default's std over the five splits / sqrt(5)) below the
default's.

Rerunnable: exported and quantized bodies and extracted features are cached under ``--work``;
writes ``benchmarks/results/bodies.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accuracy import Lever, score, split_labels, tap_channels  # noqa: E402

from headswap.config import BackboneConfig, load_params  # noqa: E402

DEFAULT_TAPS: list = [3, 4, 5, 6, "head"]
ALL_TAPS: list = [0, 1, 2, 3, 4, 5, 6, "head"]  # accuracy.tap_channels' order
SEEDS = (0, 1, 2, 3, 4)
BATCH = 32
RULE_SPEEDUP = 1.5
# Scoring order: the candidates that need an extraction last (cheapest first).
EXTRACTION_ORDER = {
    "member300": 1,
    "member300-unflipped": 1,
    "int8-percentile": 2,
    "int8-minmax": 3,
}


# --- pure helpers (tests/unit/test_bench_bodies.py) -------------------------------------------


def tap_blocks(channels: dict, taps: list) -> list[tuple[str, int]]:
    """(tap, width) of each meanmax block of a body's vector, in the body's tap order."""
    return [(str(tap), 2 * channels[str(tap)]) for tap in taps]


def block_columns(blocks: list[tuple[str, int]], keep: list, offset: int = 0) -> np.ndarray:
    """Column indices of the taps in ``keep`` within a vector laid out as ``blocks``
    (``tap_blocks``), shifted by ``offset`` (where the body's vector starts)."""
    wanted, columns, start = {str(tap) for tap in keep}, [], offset
    for tap, width in blocks:
        if tap in wanted:
            columns.append(np.arange(start, start + width))
        start += width
    return np.concatenate(columns) if columns else np.arange(0)


def unflipped_member(embeddings: np.ndarray, member: np.ndarray) -> np.ndarray:
    """[N, views, D] with every view's ``member`` columns taken from view 0 (the unflipped
    image): what the head sees if the member runs on the unflipped image only."""
    out = embeddings.copy()
    out[:, 1:, member] = embeddings[:, :1, member]
    return out


def standard_error(values: list[float]) -> float:
    """std over the splits (ddof 1) / sqrt(number of splits)."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def verdict(speedup_wall: float, speedup_cpu: float, gaps: dict, ses: dict) -> dict:
    """The adoption rule: >= RULE_SPEEDUP in wall and CPU throughput, and each metric's mean no
    more than one standard error of the default below the default's mean (``gaps``: candidate
    minus default)."""
    within = {metric: gaps[metric] >= -ses[metric] for metric in gaps}
    fast = speedup_wall >= RULE_SPEEDUP and speedup_cpu >= RULE_SPEEDUP
    return {"fast_enough": fast, "within_one_se": within, "kept": fast and all(within.values())}


def train_everywhere(splits: list[np.ndarray]) -> np.ndarray:
    """Indices of the images in the train part of every split (calibration never sees a test or
    val image of any split)."""
    return np.flatnonzero(np.logical_and.reduce([split == "train" for split in splits]))


# --- timing -----------------------------------------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Candidate:
    """A cheaper body: its parts (ONNX body, views run through it) and how its features are made.

    ``features`` is one of the names ``candidate_features`` knows; ``taps`` for slices."""

    name: str
    lever: str
    what: str
    parts: tuple[tuple[str, tuple[bool, ...]], ...]  # (body name, horizontal flip per view)
    features: str
    taps: tuple = tuple(DEFAULT_TAPS)
    timed: bool = True  # False: its bodies do a superset of a timed candidate's work


BOTH = (False, True)
CANDIDATES = [
    Candidate(
        "default", "-", "Lite2@300 + Lite0@384, taps 3..head, flip", (("default", BOTH),), "default"
    ),
    Candidate(
        "int8-percentile",
        "a",
        "default body int8 (QDQ, percentile 99.999 calibration)",
        (("int8-percentile", BOTH),),
        "int8-percentile",
    ),
    Candidate(
        "int8-minmax",
        "a",
        "default body int8 (QDQ, min-max calibration)",
        (("int8-minmax", BOTH),),
        "int8-minmax",
    ),
    Candidate(
        "member-lite0-300",
        "b",
        "member Lite0 at 300 px instead of 384",
        (("member300", BOTH),),
        "member300",
    ),
    Candidate(
        "no-member", "b", "Lite2@300 alone (no ensemble member)", (("main", BOTH),), "no-member"
    ),
    Candidate(
        "member-unflipped",
        "c",
        "member on the unflipped image only",
        (("default", (False,)), ("main", (True,))),
        "member-unflipped",
    ),
    Candidate(
        "member-300-unflipped",
        "b+c",
        "member Lite0 at 300 px, unflipped image only",
        (("member300", (False,)), ("main", (True,))),
        "member300-unflipped",
    ),
    Candidate(
        "taps-5-6-head",
        "d",
        "taps 5, 6, head (both bodies)",
        (("taps-5-6-head", BOTH),),
        "taps",
        (5, 6, "head"),
        timed=False,  # same trunk as taps-head, more pooling: no faster than taps-head
    ),
    Candidate(
        "taps-6-head",
        "d",
        "taps 6, head (both bodies)",
        (("taps-6-head", BOTH),),
        "taps",
        (6, "head"),
        timed=False,
    ),
    Candidate(
        "taps-head", "d", "head tap only (both bodies)", (("taps-head", BOTH),), "taps", ("head",)
    ),
]


def backbones(params) -> dict[str, BackboneConfig]:
    """The fp32 bodies the candidates run, as BackboneConfigs (the default's, varied)."""
    default = params.backbone
    member = default.ensemble[0]
    configs = {
        "default": default,
        "main": default.model_copy(update={"ensemble": []}),
        "member300": default.model_copy(
            update={"ensemble": [member.model_copy(update={"image_size": 300})]}
        ),
    }
    for taps in ([5, 6, "head"], [6, "head"], ["head"]):
        name = "taps-" + "-".join(str(tap) for tap in taps)
        members = [m.model_copy(update={"taps": taps}) for m in default.ensemble]
        configs[name] = default.model_copy(update={"taps": taps, "ensemble": members})
    return configs


def exported(config: BackboneConfig, cache: Path) -> Path:
    """The body's ONNX file, exported as the features stage exports it (cached)."""
    from headswap.backbones.loader import load_body, resolve_backbone
    from headswap.engine import body_onnx_path, export_body

    spec = resolve_backbone(config)
    target = body_onnx_path(cache, spec, config)
    if not target.is_file():
        started = time.perf_counter()
        body, _ = load_body(config)
        export_body(body, spec.preprocessing.size, target)
        print(
            f"exported {config.name} + {len(config.ensemble)} member(s) in "
            f"{time.perf_counter() - started:.0f}s: {target}",
            flush=True,
        )
    return target


def time_candidate(candidate: Candidate, sessions: dict, pixels: np.ndarray) -> tuple[float, float]:
    """(wall s, CPU s) for every part of ``candidate`` over ``pixels`` in batches of BATCH."""
    flipped = np.ascontiguousarray(pixels[..., ::-1])
    wall, cpu = time.perf_counter(), cpu_seconds()
    for start in range(0, len(pixels), BATCH):
        for body, views in candidate.parts:
            for flip in views:
                batch = (flipped if flip else pixels)[start : start + BATCH]
                sessions[body].run(None, {"pixels": batch})
    return time.perf_counter() - wall, cpu_seconds() - cpu


def measure_speed(
    candidates: list[Candidate], paths: dict, pixels: np.ndarray, rounds: int
) -> dict:
    """Every timed candidate, ``rounds`` alternating rounds (order rotated each round), one
    process. Each measurement opens its candidate's sessions and runs one warm-up batch first;
    keeping every candidate's sessions open at once took over 10 GB (one arena each)."""
    timed = [candidate for candidate in candidates if candidate.timed]
    times = {candidate.name: [] for candidate in timed}
    for round_ in range(rounds):
        shift = round_ % len(timed)
        for candidate in timed[shift:] + timed[:shift]:
            times[candidate.name].append(timed_once(candidate, paths, pixels))
            wall, cpu = times[candidate.name][-1]
            print(
                f"round {round_}: {candidate.name:>22}: {len(pixels) / wall:6.2f} img/s, "
                f"{1000 * cpu / len(pixels):6.1f} CPU ms/img",
                flush=True,
            )
    return {
        name: speed_figures(rows, len(pixels), times["default"]) for name, rows in times.items()
    }


def timed_once(candidate: Candidate, paths: dict, pixels: np.ndarray) -> tuple[float, float]:
    """(wall s, CPU s) of ``candidate`` over ``pixels``, on freshly opened, warmed sessions
    (opened as the features stage opens them)."""
    from headswap.onnx_session import open_session

    sessions = {body: open_session(paths[body], throughput=True) for body, _ in candidate.parts}
    time_candidate(candidate, sessions, pixels[:BATCH])  # first runs allocate the arenas
    return time_candidate(candidate, sessions, pixels)


def speed_figures(rows: list[tuple[float, float]], images: int, default: list) -> dict:
    wall, cpu = (sum(column) for column in zip(*rows, strict=True))
    default_wall, default_cpu = (sum(column) for column in zip(*default, strict=True))
    return {
        "img_s": images * len(rows) / wall,
        "cpu_ms_per_img": 1000 * cpu / (images * len(rows)),
        "speedup_wall": default_wall / wall,
        "speedup_cpu": default_cpu / cpu,
        "speedup_wall_per_round": [d[0] / r[0] for d, r in zip(default, rows, strict=True)],
        "speedup_cpu_per_round": [d[1] / r[1] for d, r in zip(default, rows, strict=True)],
    }


# --- quantization -----------------------------------------------------------------------------


class PixelBatches:
    """ONNX Runtime's CalibrationDataReader over uint8 batches, with the ``set_range`` that
    ``CalibStridedMinMax`` uses to collect (and free) a few batches at a time."""

    def __init__(self, pixels: np.ndarray, batch: int):
        self.batches = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict | None:
        batch = next(self.pending, None)
        return None if batch is None else {"pixels": batch}

    def rewind(self) -> None:
        self.set_range(0, len(self.batches))


def quantized(fp32: Path, method: str, calibration: np.ndarray, work: Path) -> Path:
    """``fp32`` quantized statically (QDQ, per-channel), calibrated on ``calibration``; cached
    per (model, method, calibration images)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    digest = hashlib.sha256(fp32.read_bytes() + calibration.tobytes()).hexdigest()[:16]
    target = work / "quantized" / f"{digest}-{method}.onnx"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prepared = target.with_name(f"{digest}-prepared.onnx")
    if not prepared.is_file():
        quant_pre_process(str(fp32), str(prepared))
    reader = type("Reader", (PixelBatches, CalibrationDataReader), {})(calibration, 8)
    started, cpu = time.perf_counter(), cpu_seconds()
    quantize_static(
        str(prepared),
        str(target) + ".tmp",
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "Add"],  # pooling and the concatenated output stay fp32
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method={
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
        }[method],
        extra_options={"CalibStridedMinMax": 1},  # one batch of activations in memory at a time
    )
    os.replace(str(target) + ".tmp", target)
    print(
        f"quantized ({method}) in {time.perf_counter() - started:.0f}s wall, "
        f"{cpu_seconds() - cpu:.0f}s CPU: {target}",
        flush=True,
    )
    return target


def embed_with(onnx_path: Path, rows: list[dict], raw: Path, backbone, work: Path) -> np.ndarray:
    """[N, 2, D] features of ``rows`` from ``onnx_path`` through the engine's own loop
    (``embed_missing``: decoding workers, flip views, the content-addressed cache)."""
    from headswap.backbones.loader import resolve_backbone
    from headswap.backbones.spec import identity_key
    from headswap.engine import EmbeddingJob, embed_missing, onnx_runner
    from headswap.feature_cache import FeatureCache
    from headswap.features import missing_rows

    params = load_params()
    config = params.features.model_copy(update={"engine": "onnxruntime", "views": "flip"})
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    cache = FeatureCache(work / "cache", identity_key({"onnx_sha256": digest, "views": "flip"}))
    missing = missing_rows(rows, cache)
    if missing:
        started, cpu = time.perf_counter(), cpu_seconds()
        paths, hashes = [raw / row["path"] for row in missing], [row["sha256"] for row in missing]
        job = EmbeddingJob(paths, hashes, resolve_backbone(backbone), backbone, config, cache)
        embed_missing(job, onnx_runner(onnx_path))
        print(
            f"embedded {len(missing)} images with {onnx_path.name} in "
            f"{time.perf_counter() - started:.0f}s wall, {cpu_seconds() - cpu:.0f}s CPU "
            f"(this process)",
            flush=True,
        )
    return np.stack([cache.get(row["sha256"]) for row in rows])


def member300_features(rows_path: Path, raw: Path, params, work: Path) -> np.ndarray:
    """Lite0 at 300 px alone, taps 3..head, meanmax, flip, through ``extract_features``."""
    from headswap.feature_set import load_features
    from headswap.features import extract_features

    member = params.backbone.ensemble[0]
    body = BackboneConfig(**{**member.model_dump(), "image_size": 300, "ensemble": []})
    features = params.features.model_copy(update={"cache_dir": str(work / "cache")})
    out = work / "features-lite0-300.npz"
    started, cpu = time.perf_counter(), cpu_seconds()
    result = extract_features(body, features, rows_path, raw, out)
    print(
        f"Lite0@300: {result.images} images, {result.cache_hits} cached, "
        f"{time.perf_counter() - started:.0f}s wall, {cpu_seconds() - cpu:.0f}s CPU "
        f"(this process)",
        flush=True,
    )
    return load_features(out).embeddings


# --- accuracy ---------------------------------------------------------------------------------


def five_splits(features, inputs: Inputs, name: str) -> dict:
    """Accuracy and ROC-AUC of the default head on ``features`` over the five splits."""
    params, rows, classes = inputs.params, inputs.rows, inputs.classes
    lever = Lever(
        name, "bodies", DEFAULT_TAPS, "meanmax", "flip", params.head, params.evaluate.threshold
    )
    results = [
        score(replace(features, split=split_labels(rows, seed, params.data.split)), classes, lever)
        for seed in SEEDS
    ]
    accuracy, auc = ([result[i] for result in results] for i in (0, 1))
    return {
        "accuracy": accuracy,
        "roc_auc": auc,
        "accuracy_mean": float(np.mean(accuracy)),
        "accuracy_std": float(np.std(accuracy, ddof=1)),
        "roc_auc_mean": float(np.mean(auc)),
        "roc_auc_std": float(np.std(auc, ddof=1)),
    }


def layout(params) -> dict:
    """Column blocks of the default's vector: the main body's, then the member's."""
    main = dict(zip(map(str, ALL_TAPS), tap_channels(params.backbone.name), strict=True))
    member = dict(
        zip(map(str, ALL_TAPS), tap_channels(params.backbone.ensemble[0].name), strict=True)
    )
    main_blocks, member_blocks = tap_blocks(main, DEFAULT_TAPS), tap_blocks(member, DEFAULT_TAPS)
    main_width = sum(width for _, width in main_blocks)
    return {"main": main_blocks, "member": member_blocks, "main_width": main_width}


def sliced(embeddings: np.ndarray, blocks: dict, taps: list) -> np.ndarray:
    columns = np.r_[
        block_columns(blocks["main"], taps),
        block_columns(blocks["member"], taps, blocks["main_width"]),
    ]
    return np.ascontiguousarray(embeddings[..., columns])


# --- the run ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, help="ELPV ImageFolder")
    parser.add_argument(
        "--default",
        type=Path,
        help="the default's features.npz, manifest.csv and validation.json",
    )
    parser.add_argument("--work", type=Path, help="caches (bodies, features)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bodies.json")
    parser.add_argument("--images", type=int, default=128, help="images per timing round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=128, help="int8 calibration images")
    parser.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--table", action="store_true", help="only print the markdown table of --out"
    )
    return parser.parse_args()


@dataclass(frozen=True)
class Inputs:
    """The default's run: params, manifest rows, classes, features and their column layout."""

    params: object
    rows: list[dict]
    classes: list[str]
    default: object  # FeatureSet
    blocks: dict


def load_inputs(default_dir: Path) -> Inputs:
    from headswap.feature_set import load_features
    from headswap.manifest import read_classes, read_manifest

    params = load_params()
    rows = read_manifest(default_dir / "manifest.csv")
    default = load_features(default_dir / "features.npz")
    if list(default.sha256) != [row["sha256"] for row in rows]:
        raise SystemExit(f"{default_dir}/features.npz rows are not in manifest order")
    blocks = layout(params)
    if blocks["main_width"] + sum(w for _, w in blocks["member"]) != default.embeddings.shape[-1]:
        raise SystemExit(f"column layout {blocks} does not add up to {default.embeddings.shape}")
    classes = read_classes(default_dir / "validation.json")
    return Inputs(params, rows, classes, default, blocks)


def decoded(raw: Path, rows: list[dict], size: int) -> np.ndarray:
    from headswap.imaging import load_pixels

    return np.stack([load_pixels(raw / row["path"], size) for row in rows])


def prepare_bodies(args, inputs: Inputs, candidates: list[Candidate]) -> tuple[dict, dict]:
    """Every ONNX body the candidates run (exported, quantized), and the calibration facts."""
    params, rows = inputs.params, inputs.rows
    paths = {
        name: exported(config, args.work / "cache") for name, config in backbones(params).items()
    }
    pool = train_everywhere([split_labels(rows, seed, params.data.split) for seed in SEEDS])
    calibration = decoded(
        args.raw, [rows[i] for i in pool[: args.calibration]], params.backbone.image_size
    )
    for method in ("percentile", "minmax"):
        if any(c.features == f"int8-{method}" for c in candidates):
            paths[f"int8-{method}"] = quantized(paths["default"], method, calibration, args.work)
    return paths, {"calibration_images": len(calibration), "calibration_pool": len(pool)}


def score_candidates(args, inputs: Inputs, candidates, paths, speed, meta) -> dict:
    """Five-split scores of every candidate; the results file is rewritten after each one."""
    # One torch thread for the head fits: on this shared machine two threads made the same fits
    # 5-10x slower under load (benchmarks/README.md, "Head training time").
    torch.set_num_threads(1)
    results, report = {}, {}
    # Slices of the default first, extractions last: a run cut short still has those rows.
    for candidate in sorted(candidates, key=lambda c: EXTRACTION_ORDER.get(c.features, 0)):
        embeddings = candidate_embeddings(candidate, inputs, args, paths)
        features = replace(inputs.default, embeddings=embeddings)
        scores = five_splits(features, inputs, candidate.name)
        results[candidate.name] = {
            "lever": candidate.lever,
            "what": candidate.what,
            "dim": int(embeddings.shape[-1]),
            **scores,
        }
        print(
            f"{candidate.name}: accuracy {scores['accuracy_mean']:.4f} ± "
            f"{scores['accuracy_std']:.4f}, ROC-AUC {scores['roc_auc_mean']:.4f} ± "
            f"{scores['roc_auc_std']:.4f}",
            flush=True,
        )
        report = write_report(args.out, judge(results, speed), meta)
    return report


def main() -> None:
    args = parse_args()
    if args.table:
        print_table(json.loads(args.out.read_text()))
        return
    if not (args.raw and args.default and args.work):
        raise SystemExit("--raw, --default and --work are needed to measure")
    os.chdir(ROOT)  # load_params reads params.yaml
    meta = {
        "command": "python benchmarks/bodies.py " + " ".join(sys.argv[1:]),
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": os.getloadavg(),
        "rounds": args.rounds,
        "batch": BATCH,
        "_clock": (time.perf_counter(), cpu_seconds()),
    }
    inputs = load_inputs(args.default)
    candidates = [c for c in CANDIDATES if not args.only or c.name in {"default", *args.only}]
    paths, calibration = prepare_bodies(args, inputs, candidates)
    step = len(inputs.rows) // args.images
    pixels = decoded(
        args.raw, inputs.rows[::step][: args.images], inputs.params.backbone.image_size
    )
    stored = inputs.default.embeddings[::step][:8]
    meta.update(
        calibration,
        timing_images=len(pixels),
        parity_default_body_vs_features_npz=parity_check(paths["default"], pixels[:8], stored),
    )
    speed = {} if args.skip_speed else measure_speed(candidates, paths, pixels, args.rounds)
    print_table(score_candidates(args, inputs, candidates, paths, speed, meta))
    print(f"wrote {args.out}")


def write_report(out: Path, report: dict, meta: dict) -> dict:
    """``report`` with the run's facts, (re)written to ``out`` atomically."""
    started, cpu_start = meta["_clock"]
    report.update({key: value for key, value in meta.items() if not key.startswith("_")})
    report.update(
        finished_utc=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load_average_end=os.getloadavg(),
        wall_s=time.perf_counter() - started,
        cpu_s=cpu_seconds() - cpu_start,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    return report


def parity_check(onnx_path: Path, pixels: np.ndarray, stored: np.ndarray) -> float:
    """Max |diff| between the exported default body now and the features.npz rows (view 0):
    the timed body is the one that made the default's features."""
    from headswap.onnx_session import open_session

    now = open_session(onnx_path, throughput=True).run(None, {"pixels": pixels})[0]
    return float(np.abs(now - stored[:, 0]).max())


def candidate_embeddings(candidate: Candidate, inputs: Inputs, args, paths: dict) -> np.ndarray:
    """[N, 2, D] features of ``candidate`` (slices of the default, or extracted)."""
    default, blocks, params = inputs.default.embeddings, inputs.blocks, inputs.params
    member = block_columns(blocks["member"], DEFAULT_TAPS, blocks["main_width"])
    main = np.arange(blocks["main_width"])
    kind = candidate.features
    if kind == "default":
        return default
    if kind == "member-unflipped":
        return unflipped_member(default, member)
    if kind == "no-member":
        return np.ascontiguousarray(default[..., main])
    if kind == "taps":
        return sliced(default, blocks, list(candidate.taps))
    if kind.startswith("member300"):
        lite0 = member300_features(args.default / "manifest.csv", args.raw, params, args.work)
        both = np.concatenate([default[..., main], lite0], axis=-1)
        if kind.endswith("unflipped"):
            return unflipped_member(both, np.arange(len(main), both.shape[-1]))
        return both
    if kind.startswith("int8"):
        return embed_with(paths[kind], inputs.rows, args.raw, params.backbone, args.work)
    raise ValueError(kind)


def judge(results: dict, speed: dict) -> dict:
    """Each candidate against the default under the adoption rule."""
    base = results["default"]
    ses = {metric: standard_error(base[metric]) for metric in ("accuracy", "roc_auc")}
    for name, row in results.items():
        gaps = {metric: row[f"{metric}_mean"] - base[f"{metric}_mean"] for metric in ses}
        row["gap"] = gaps
        row["paired_gap_per_split"] = {
            metric: [c - d for c, d in zip(row[metric], base[metric], strict=True)]
            for metric in ses
        }
        if name in speed:
            row["speed"] = speed[name]
            row["verdict"] = verdict(
                speed[name]["speedup_wall"], speed[name]["speedup_cpu"], gaps, ses
            )
    return {"default_standard_error": ses, "candidates": results}


def markdown_rows(report: dict) -> list[str]:
    """The README's table: one row per candidate, from the results file."""
    header = [
        "| candidate | lever | throughput vs default, wall / CPU | img/s, CPU ms/img "
        "| accuracy | ROC-AUC | vs default: accuracy / ROC-AUC | within one SE | kept |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for name, row in report["candidates"].items():
        speed, verdict_ = row.get("speed"), row.get("verdict", {})
        ratio = f"{speed['speedup_wall']:.2f}x / {speed['speedup_cpu']:.2f}x" if speed else "-"
        rate = f"{speed['img_s']:.2f}, {speed['cpu_ms_per_img']:.0f}" if speed else "not timed"
        ses = report["default_standard_error"]
        se = "/".join("yes" if row["gap"][m] >= -ses[m] else "no" for m in ("accuracy", "roc_auc"))
        if not speed:  # untimed: the same trunk as taps-head, more pooling
            ratio, rate = "at most taps-head's", "not timed"
        kept = "baseline" if name == "default" else "**yes**" if verdict_.get("kept") else "no"
        rows.append(
            f"| {name} ({row['what']}) | {row['lever']} | {ratio} | {rate} | "
            f"{row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | "
            f"{row['roc_auc_mean']:.4f} ± {row['roc_auc_std']:.4f} | "
            f"{row['gap']['accuracy']:+.4f} / {row['gap']['roc_auc']:+.4f} | "
            f"{se} | "
            f"{kept} |"
        )
    return header + rows


def print_table(report: dict) -> None:
    print("\n".join(markdown_rows(report)))


if __name__ == "__main__":
    main()
