"""Accuracy sweep on ELPV: which frozen-body and head levers beat Deitsch et al. (2019)?

Reference: a fine-tuned VGG-19 reached 88.42% accuracy and 0.944 ROC-AUC on a 75/25 stratified
split. Here the body stays frozen; every row is the mean ± std over the same 5 stratified 75/25
splits (``data.split.seed`` in SEEDS, val carved from the 75%).

Bodies are expensive, heads are cheap, so the script extracts a few *rich* bodies once over the
whole dataset (every tap, mean+max pooled, through the project's feature cache) and slices them:
a lever such as "taps 3..head" or "mean pooling only" or "no views" is a column/view subset of a
rich body: the features that narrower config would extract (up to ONNX Runtime float
rounding). The split only decides which images are test, so the same features serve every seed.

Usage (from the repository root, ELPV in data/raw as ``headswap ingest`` leaves it)::

    HEADSWAP_CACHE_DIR=/tmp/cache python benchmarks/accuracy.py --workspace /tmp/acc

It prints a markdown table and writes ``<workspace>/accuracy.json``. ``--params FILE`` scores a
whole params file as the pipeline runs it; ``--combine`` scores the ``--bodies`` side by side
(README.md, "Accuracy on ELPV", lists the command behind every row).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from headswap.backbones import load_body
from headswap.config import BackboneConfig, DataConfig, FeaturesConfig, HeadConfig, SplitConfig
from headswap.data import assign_splits, prepare, read_classes, read_manifest
from headswap.evaluate import decide, roc_auc
from headswap.features import FeatureSet, extract_features, load_features
from headswap.heads import predict_proba, train_head

SEEDS = (0, 1, 2, 3, 4)
DEFAULT_SPLIT = SplitConfig(test_size=0.25, val_size=0.1)
ALL_TAPS: list = [0, 1, 2, 3, 4, 5, 6, "head"]


@dataclass(frozen=True)
class Body:
    """A rich body: one backbone at one input size and view set, every tap meanmax-pooled."""

    backbone: str
    size: int
    views: str


LITE0, LITE1, LITE2 = "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"
BODIES = {
    "224": Body(LITE0, 224, "none"),
    "300": Body(LITE0, 300, "none"),
    "300-flip": Body(LITE0, 300, "flip"),
    "300-d4": Body(LITE0, 300, "d4"),
    "lite1-300-flip": Body(LITE1, 300, "flip"),
    "lite2-300-flip": Body(LITE2, 300, "flip"),
    "lite2-384-flip": Body(LITE2, 384, "flip"),
    "384-flip": Body(LITE0, 384, "flip"),
    "lite2-300-d4": Body(LITE2, 300, "d4"),
    "448-flip": Body(LITE0, 448, "flip"),
    "lite1-384-flip": Body(LITE1, 384, "flip"),
    "384-d4": Body(LITE0, 384, "d4"),
}
# Which stored views make up a lever's view set, per body view set (order of view_transforms).
VIEW_SUBSETS = {
    "none": {"none": [0]},
    "flip": {"none": [0], "flip": [0, 1]},
    "d4": {"none": [0], "flip": [0, 4], "d4": list(range(8))},
}


@dataclass(frozen=True)
class Lever:
    """One row of the table: a slice of a rich body plus a head configuration."""

    name: str
    body: str
    taps: list = field(default_factory=lambda: ["head"])
    pool: str = "mean"  # mean | max | meanmax (slices of the meanmax body)
    views: str = "none"
    head: HeadConfig = HeadConfig()
    threshold: float | str = 0.5


def levers() -> list[Lever]:
    """The sweep in priority order (a cut-short run still answers the main question)."""
    deep = [3, 4, 5, 6, "head"]
    mlp = HeadConfig(type="mlp", hidden=512, dropout=0.5, max_iter=300)
    rich = {"body": "300", "taps": deep, "pool": "meanmax"}
    return [
        Lever("last layer, 224 px (spine default)", "224"),
        Lever("taps 3..head, 300 px, meanmax", **rich),
        Lever("taps 3..head, 300 px, meanmax, C 0.1", **rich, head=HeadConfig(C=0.1)),
        Lever("taps 3..head, 300 px, meanmax, mlp", **rich, head=mlp),
        Lever(
            "taps 3..head, 300 px, meanmax, flip views",
            **{**rich, "body": "300-flip"},
            views="flip",
        ),
        Lever(
            "taps 3..head, 300 px, meanmax, flip, C 0.1",
            **{**rich, "body": "300-flip"},
            views="flip",
            head=HeadConfig(C=0.1),
        ),
        Lever(
            "taps 3..head, 300 px, meanmax, flip, C 0.01",
            **{**rich, "body": "300-flip"},
            views="flip",
            head=HeadConfig(C=0.01),
        ),
        Lever(
            "taps 3..head, 300 px, meanmax, flip, C 0.03",
            **{**rich, "body": "300-flip"},
            views="flip",
            head=HeadConfig(C=0.03),
        ),
        Lever(
            "all taps 0..head, 300 px, meanmax, flip, C 0.01",
            "300-flip",
            ALL_TAPS,
            "meanmax",
            "flip",
            head=HeadConfig(C=0.01),
        ),
        Lever(
            "taps 3..head, 300 px, meanmax, C 0.01",
            **rich,
            head=HeadConfig(C=0.01),
        ),
        Lever(
            "taps 3..head, 300 px, meanmax, flip, C 0.003",
            **{**rich, "body": "300-flip"},
            views="flip",
            head=HeadConfig(C=0.003),
        ),
        Lever(
            "taps 3..head, 300 px, meanmax, flip, C 0.1, threshold auto",
            **{**rich, "body": "300-flip"},
            views="flip",
            head=HeadConfig(C=0.1),
            threshold="auto",
        ),
        Lever(
            "taps 3..head, 300 px, meanmax, flip, mlp",
            **{**rich, "body": "300-flip"},
            views="flip",
            head=mlp,
        ),
        Lever("last layer, 300 px", "300"),
        Lever("taps 3..head, 224 px", "224", deep),
        Lever("taps 3..head, 300 px", "300", deep),
        Lever("all taps 0..head, 300 px, meanmax", "300", ALL_TAPS, "meanmax"),
        Lever(
            "taps 3..head, 300 px, meanmax, balanced",
            **rich,
            head=HeadConfig(class_weight="balanced"),
        ),
        Lever("taps 3..head, 300 px, meanmax, threshold auto", **rich, threshold="auto"),
        Lever("taps 3..head, 300 px, meanmax, C auto", **rich, head=HeadConfig(C="auto")),
        Lever(
            "taps 3..head, 300 px, meanmax, d4, C 0.003",
            **{**rich, "body": "300-d4"},
            views="d4",
            head=HeadConfig(C=0.003),
        ),
        Lever(
            "taps 3..head, 300 px, meanmax, d4, C 0.01",
            **{**rich, "body": "300-d4"},
            views="d4",
            head=HeadConfig(C=0.01),
        ),
        Lever("taps 3..head, 300 px, meanmax, d4 views", **{**rich, "body": "300-d4"}, views="d4"),
        *(
            Lever(
                f"{body.split('-')[0]}, taps 3..head, 300 px, meanmax, flip, C {c}",
                body,
                deep,
                "meanmax",
                "flip",
                head=HeadConfig(C=c),
            )
            for body in ("lite1-300-flip", "lite2-300-flip")
            for c in (0.01, 0.003, 0.03)
        ),
        *(
            Lever(
                f"lite2, all taps 0..head, 300 px, meanmax, flip, C {c}",
                "lite2-300-flip",
                ALL_TAPS,
                "meanmax",
                "flip",
                head=HeadConfig(C=c),
            )
            for c in (0.01, 0.003)
        ),
        *(
            Lever(f"{name}, C {c}", body, deep, "meanmax", views, head=HeadConfig(C=c))
            for name, body, views in (
                ("lite2, taps 3..head, 384 px, meanmax, flip", "lite2-384-flip", "flip"),
                ("taps 3..head, 384 px, meanmax, flip", "384-flip", "flip"),
                ("lite2, taps 3..head, 300 px, meanmax, d4", "lite2-300-d4", "d4"),
            )
            for c in (0.01, 0.003)
        ),
    ]


def extract_body(name: str, workspace: Path, raw_dir: Path) -> Path:
    """Embed the whole dataset with one rich body (cached per image); returns its npz."""
    body = BODIES[name]
    out = workspace / f"features-{name}.npz"
    backbone = BackboneConfig(
        name=body.backbone, image_size=body.size, taps=ALL_TAPS, pool="meanmax"
    )
    started = time.perf_counter()
    result = extract_features(
        backbone, FeaturesConfig(views=body.views), workspace / "manifest.csv", raw_dir, out
    )
    print(
        f"body {name}: {result.images} images x {result.views} views x {result.dim} dims, "
        f"{result.cache_hits} cached, {time.perf_counter() - started:.0f}s"
    )
    return out


@functools.cache
def tap_channels(backbone: str) -> tuple[int, ...]:
    """Channels of each tap in ALL_TAPS (one tiny forward pass through the body)."""
    body, _ = load_body(BackboneConfig(name=backbone, taps=ALL_TAPS, pool="meanmax"))
    with torch.no_grad():
        maps = body.trunk(torch.zeros(1, 3, 64, 64), [str(t) for t in ALL_TAPS])
    return tuple(maps[str(tap)].shape[1] for tap in ALL_TAPS)


def tap_columns(backbone: str, taps: list, pool: str) -> np.ndarray:
    """Column indices of ``taps`` pooled with ``pool`` in the rich (all taps, meanmax) vector."""
    columns, start = [], 0
    for tap, channels in zip(ALL_TAPS, tap_channels(backbone), strict=True):
        if tap in taps:
            mean = np.arange(start, start + channels)
            max_ = mean + channels
            columns.append({"mean": mean, "max": max_, "meanmax": np.r_[mean, max_]}[pool])
        start += 2 * channels
    return np.concatenate(columns)


def split_labels(rows: list[dict], seed: int, split: SplitConfig = DEFAULT_SPLIT) -> np.ndarray:
    """The split of each manifest row under ``data.split`` with ``seed`` (default: 75/25, val
    10% of the whole set, carved from the 75%)."""
    rows = [dict(row) for row in rows]
    assign_splits(rows, split.model_copy(update={"seed": seed}))
    return np.array([row["split"] for row in rows])


def score(features: FeatureSet, classes: list[str], lever: Lever) -> tuple[float, float, float]:
    """Train on the split's train part, calibrate on val, score test: (accuracy, auc, seconds)."""
    head, meta = train_head(features, classes, lever.head, lever.threshold)
    embeddings, names = features.select("test")
    labels = np.array([classes.index(name) for name in names])
    probabilities = predict_proba(head, embeddings)
    accuracy = float((decide(probabilities, meta.threshold) == labels).mean())
    return accuracy, roc_auc(probabilities, labels), meta.train_seconds


_STATE: dict = {}  # the manifest rows, class order and rich bodies of this run


def _score_job(job: tuple[Lever, int]) -> tuple[float, float, float]:
    lever, seed = job
    full, body = _STATE["bodies"][lever.body], BODIES[lever.body]
    views = VIEW_SUBSETS[body.views][lever.views]
    sliced = np.ascontiguousarray(
        full.embeddings[:, views][..., tap_columns(body.backbone, lever.taps, lever.pool)]
    )
    features = replace(full, embeddings=sliced, split=split_labels(_STATE["rows"], seed))
    return score(features, _STATE["classes"], lever)


def summarise(lever: Lever, results: list[tuple[float, float, float]]) -> dict:
    acc, auc, seconds = (np.array(column) for column in zip(*results, strict=True))
    return {
        "lever": lever.name,
        "body": lever.body,
        "taps": [str(t) for t in lever.taps],
        "pool": lever.pool,
        "views": lever.views,
        "head": lever.head.model_dump(mode="json"),
        "threshold": lever.threshold,
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)),
        "roc_auc_mean": float(auc.mean()),
        "roc_auc_std": float(auc.std(ddof=1)),
        "accuracy": acc.tolist(),
        "roc_auc": auc.tolist(),
        "train_seconds_mean": float(seconds.mean()),
    }


def run_sweep(selected: list[Lever], seeds: list[int], out: Path) -> list[dict]:
    """Every (lever, seed) pair in turn; the table is rewritten after each lever.

    One process: torch already uses every core for a fit, and a forked pool deadlocks once the
    parent has run torch's thread pool (as extracting a new body does).
    """
    table: list[dict] = []
    for lever in selected:
        table.append(summarise(lever, [_score_job((lever, seed)) for seed in seeds]))
        row = table[-1]
        print(
            f"| {row['lever']} | {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | "
            f"{row['roc_auc_mean']:.4f} ± {row['roc_auc_std']:.4f} | "
            f"{row['train_seconds_mean']:.1f} s |",
            flush=True,
        )
        out.write_text(json.dumps({"seeds": seeds, "rows": table}, indent=2))
    return table


# Feature normalisations tried as levers (each view's vector, before the head's standardisation).
# None of them beat the plain features on ELPV, so the pipeline has no such option.
NORMALISATIONS = {
    "none": lambda x: x,
    "l2": lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12),
    "signed-sqrt": lambda x: np.sign(x) * np.sqrt(np.abs(x)),
}


def print_row(row: dict) -> None:
    print(
        f"| {row['lever']} | {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | "
        f"{row['roc_auc_mean']:.4f} ± {row['roc_auc_std']:.4f} | per split: accuracy "
        f"{', '.join(f'{a:.4f}' for a in row['accuracy'])}; ROC-AUC "
        f"{', '.join(f'{a:.4f}' for a in row['roc_auc'])} |"
    )


def score_defect_levels(
    features: FeatureSet, _classes: list[str], lever: Lever
) -> tuple[float, float, float]:
    """A four-class head on ELPV's defect levels (the annotators' probability 0, 1/3, 2/3, 1);
    a cell is defective when P(2/3) + P(1) >= 0.5. Scored like ``score``, on the binary task."""
    level_of = {row["path"]: round(float(row["defect_probability"]) * 3) for row in _STATE["rows"]}
    levels = np.array([level_of[str(path)] for path in features.path])
    classes = [f"{level}/3" for level in range(4)]
    head, meta = train_head(
        replace(features, label=np.array([classes[level] for level in levels])), classes, lever.head
    )
    test = features.split == "test"
    defective = predict_proba(head, features.embeddings[test])[:, 2:].sum(axis=1)
    truth = (levels[test] >= 2).astype(int)
    accuracy = float(((defective >= 0.5) == truth).mean())
    auc = roc_auc(np.stack([1 - defective, defective], axis=1), truth)
    return accuracy, auc, meta.train_seconds


def score_params(
    params_path: Path,
    workspace: Path,
    raw_dir: Path,
    seeds: list[int],
    normalise: str = "none",
    target: str = "class",
) -> dict:
    """The configuration in ``params_path`` as the pipeline runs it, over ``seeds`` (with
    ``normalise`` applied to every view's feature vector first, and ``target`` 'levels' for a
    head trained on the defect levels: levers, not pipeline options)."""
    from headswap.config import load_params

    params = load_params(params_path)
    out = workspace / f"features-params-{params_path.stem}.npz"
    started = time.perf_counter()
    result = extract_features(
        params.backbone, params.features, workspace / "manifest.csv", raw_dir, out
    )
    print(
        f"{params_path}: {result.images} images x {result.views} views x {result.dim} dims, "
        f"{result.cache_hits} cached, {time.perf_counter() - started:.0f}s"
    )
    full = load_features(out)
    normalised = NORMALISATIONS[normalise](full.embeddings).astype(np.float32, copy=False)
    full = replace(full, embeddings=normalised)
    name = str(params_path) + ("" if normalise == "none" else f", {normalise} normalised")
    name += ", four defect levels" if target == "levels" else ""
    lever = Lever(name, "params", head=params.head, threshold=params.evaluate.threshold)
    scorer = score_defect_levels if target == "levels" else score
    results = [
        scorer(
            replace(full, split=split_labels(_STATE["rows"], seed, params.data.split)),
            _STATE["classes"],
            lever,
        )
        for seed in seeds
    ]
    row = summarise(lever, results)
    print_row(row)
    return row


def score_combination(names: list[str], views: str, seeds: list[int], head: HeadConfig) -> dict:
    """Rich bodies side by side (taps 3..head, meanmax, ``views``), one logistic head over the
    concatenation: an ensemble whose members read PIL-resized files. The pipeline's members
    resize in the model instead; on the default pair that differs by 0.002 accuracy and 0.0005
    ROC-AUC (README rows 36 and 40)."""
    deep = [3, 4, 5, 6, "head"]
    parts = []
    for name in names:
        full, body = _STATE["bodies"][name], BODIES[name]
        columns = tap_columns(body.backbone, deep, "meanmax")
        parts.append(full.embeddings[:, VIEW_SUBSETS[body.views][views]][..., columns])
    combined = replace(
        _STATE["bodies"][names[0]], embeddings=np.ascontiguousarray(np.concatenate(parts, -1))
    )
    lever = Lever(
        " + ".join(names) + f", {views}, C {head.C}", "+".join(names), deep, "meanmax", views, head
    )
    results = [
        score(replace(combined, split=split_labels(_STATE["rows"], seed)), _STATE["classes"], lever)
        for seed in seeds
    ]
    row = summarise(lever, results)
    print_row(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument(
        "--bodies", nargs="+", default=["224", "300", "300-flip"], choices=list(BODIES)
    )
    parser.add_argument("--only", nargs="*", help="lever names (substring match) to run")
    parser.add_argument(
        "--params",
        type=Path,
        help="score this params.yaml as the pipeline runs it (its backbone, views and head) "
        "instead of the lever sweep",
    )
    parser.add_argument(
        "--normalise",
        choices=list(NORMALISATIONS),
        default="none",
        help="with --params: normalise each view's features first (l2, signed-sqrt)",
    )
    parser.add_argument(
        "--target",
        choices=["class", "levels"],
        default="class",
        help="with --params: train on the class (as the pipeline does) or on ELPV's four defect "
        "levels (defective = P(2/3) + P(1) >= 0.5)",
    )
    parser.add_argument(
        "--combine",
        action="store_true",
        help="score the --bodies side by side (taps 3..head, meanmax, --views, C 0.01) "
        "instead of the lever sweep",
    )
    parser.add_argument(
        "--views",
        choices=["none", "flip", "d4"],
        default="flip",
        help="with --combine: the views the head trains on (each body must have them)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workspace.mkdir(parents=True, exist_ok=True)
    # One manifest for every body; its own split is ignored (each seed re-splits it).
    prepare(DataConfig(), args.raw, args.workspace / "prepared")
    (args.workspace / "manifest.csv").write_bytes(
        (args.workspace / "prepared/manifest.csv").read_bytes()
    )
    rows = read_manifest(args.workspace / "manifest.csv")
    classes = read_classes(args.workspace / "prepared/validation.json")
    if args.params:
        _STATE.update(rows=rows, classes=classes)
        row = score_params(
            args.params, args.workspace, args.raw, args.seeds, args.normalise, args.target
        )
        suffix = "" if args.normalise == "none" else f"-{args.normalise}"
        suffix += "" if args.target == "class" else f"-{args.target}"
        out = args.workspace / f"accuracy-{args.params.stem}{suffix}.json"
        out.write_text(json.dumps({"seeds": args.seeds, "rows": [row]}, indent=2))
        print(f"wrote {out}")
        return
    _STATE.update(
        rows=rows,
        classes=classes,
        bodies={
            name: load_features(extract_body(name, args.workspace, args.raw))
            for name in args.bodies
        },
    )
    if args.combine:
        row = score_combination(args.bodies, args.views, args.seeds, HeadConfig(C=0.01))
        out = args.workspace / f"accuracy-combined-{'+'.join(args.bodies)}-{args.views}.json"
        out.write_text(json.dumps({"seeds": args.seeds, "rows": [row]}, indent=2))
        print(f"wrote {out}")
        return
    selected = [
        lever
        for lever in levers()
        if lever.body in args.bodies and (not args.only or any(o in lever.name for o in args.only))
    ]
    out = args.workspace / "accuracy.json"
    run_sweep(selected, args.seeds, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
