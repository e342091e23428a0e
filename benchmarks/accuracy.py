"""Accuracy on ELPV: which frozen-body and head configurations beat Deitsch et al. (2019)?

Reference: a fine-tuned VGG-19 reached 88.42% accuracy and 0.944 ROC-AUC on a 75/25 stratified
split. Here the body stays frozen; every figure is the mean ± std over the same 5 75/25 splits
(``data.split.seed`` in SEEDS, val carved from the 75%).

``select`` is the protocol that reports: on each split it chooses between the candidates of
``benchmarks/accuracy_params/selection.yaml`` by stratified k-fold cross-validation inside that
split's train+val side (``choose_candidate`` is handed those rows only), then trains the winner
as the pipeline does (head on train, temperature on val) and scores the split's test rows once.
The candidates are slices (bodies, taps, views) of one features.npz, such as the default's.

``measure`` is the exploratory sweep: it reports test scores of configurations that were
themselves picked by looking at those test scores, so its figures are optimistic. Bodies are
expensive, heads are cheap, so it extracts a few *rich* bodies once over the whole dataset
(every tap, mean+max pooled, through the project's feature cache) and slices them: a lever such
as "taps 3..head" or "mean pooling only" or "no views" is a column/view subset of a rich body:
the features that narrower config would extract (up to ONNX Runtime float rounding). The split
only decides which images are test, so the same features serve every seed. The bodies and
levers are listed in ``benchmarks/accuracy_params/sweep.yaml``.

Usage (from the repository root, ELPV in data/raw as ``headswap ingest`` leaves it)::

    python benchmarks/accuracy.py select --features data/features/features.npz
    HEADSWAP_CACHE_DIR=/tmp/cache python benchmarks/accuracy.py measure --workspace /tmp/acc
    python benchmarks/accuracy.py render

``select`` writes ``benchmarks/results/accuracy_selection.json`` (every candidate's CV scores per
split, the winners, their test scores, the default's); ``--seeds`` with ``--merge`` combines
runs over different seeds. ``measure`` prints a markdown row per experiment, writes
``<workspace>/accuracy*.json`` with every seed's scores, and records each experiment's result in
``benchmarks/results/accuracy.csv``. ``--params FILE`` scores a whole params file as the
pipeline runs it; ``--combine`` scores the ``--bodies`` side by side. ``render`` rewrites the
generated tables of ``benchmarks/ACCURACY.md`` from both results files (``--check``: only say
whether they are current).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from headswap.backbones.loader import load_body
from headswap.config import BackboneConfig, HeadConfig, SplitConfig, load_params
from headswap.evaluate import decide, roc_auc
from headswap.feature_set import FeatureSet, load_features
from headswap.features import extract_features
from headswap.heads import predict_proba
from headswap.io import atomic_write_text, markdown_table
from headswap.manifest import read_classes, read_manifest
from headswap.prepare import assign_splits, prepare
from headswap.train import train_head

HERE = Path(__file__).parent
SWEEP_FILE = HERE / "accuracy_params" / "sweep.yaml"
CANDIDATES_FILE = HERE / "accuracy_params" / "selection.yaml"
SELECTION_FILE = HERE / "results" / "accuracy_selection.json"
RESULTS_FILE = HERE / "results" / "accuracy.csv"
ACCURACY_MD = HERE / "ACCURACY.md"
SEEDS = (0, 1, 2, 3, 4)
ALL_TAPS: list = [0, 1, 2, 3, 4, 5, 6, "head"]
# Which stored views make up a lever's view set, per body view set (order of view_transforms).
VIEW_SUBSETS = {
    "none": {"none": [0]},
    "flip": {"none": [0], "flip": [0, 1]},
    "d4": {"none": [0], "flip": [0, 4], "d4": list(range(8))},
}


@dataclass(frozen=True)
class Body:
    """A rich body: one backbone at one input size and view set, every tap meanmax-pooled."""

    backbone: str
    size: int
    views: str


@dataclass(frozen=True)
class Lever:
    """One experiment: a slice of a rich body plus a head configuration."""

    name: str
    body: str
    taps: list
    pool: str  # mean | max | meanmax (slices of the meanmax body)
    views: str
    head: HeadConfig
    threshold: float | str = 0.5


@dataclass(frozen=True)
class Sweep:
    """The contents of sweep.yaml: split sizes, the base head, rich bodies, levers in priority
    order (a cut-short run still answers the main question), and the ``--combine`` slice."""

    split: SplitConfig
    bodies: dict[str, Body]
    levers: list[Lever]
    combine_taps: list
    combine_head: HeadConfig


def load_sweep(path: Path = SWEEP_FILE) -> Sweep:
    """Parse sweep.yaml; every lever's head is the file's ``head`` with the lever's keys on top."""
    spec = yaml.safe_load(path.read_text())
    base_head = spec["head"]
    levers = [
        Lever(
            name=lever["name"],
            body=lever["body"],
            taps=lever["taps"],
            pool=lever["pool"],
            views=lever["views"],
            head=HeadConfig(**{**base_head, **lever.get("head", {})}),
            threshold=lever.get("threshold", 0.5),
        )
        for lever in spec["levers"]
    ]
    return Sweep(
        split=SplitConfig(seed=SEEDS[0], **spec["split"]),
        bodies={name: Body(**body) for name, body in spec["bodies"].items()},
        levers=levers,
        combine_taps=spec["combine"]["taps"],
        combine_head=HeadConfig(**{**base_head, **spec["combine"]["head"]}),
    )


def extract_body(name: str, body: Body, workspace: Path, raw_dir: Path) -> Path:
    """Embed the whole dataset with one rich body (cached per image); returns its npz."""
    out = workspace / f"features-{name}.npz"
    base = load_params()
    backbone = rich_backbone(body.backbone, body.size)
    features = base.features.model_copy(update={"views": body.views})
    started = time.perf_counter()
    result = extract_features(backbone, features, workspace / "manifest.csv", raw_dir, out)
    print(
        f"body {name}: {result.images} images x {result.views} views x {result.dim} dims, "
        f"{result.cache_hits} cached, {time.perf_counter() - started:.0f}s"
    )
    return out


def rich_backbone(name: str, size: int | None) -> BackboneConfig:
    """One body with every tap, mean+max pooled: the superset every lever slices."""
    return BackboneConfig(
        name=name, weights=None, image_size=size, taps=ALL_TAPS, pool="meanmax", ensemble=[]
    )


@functools.cache
def tap_channels(backbone: str) -> tuple[int, ...]:
    """Channels of each tap in ALL_TAPS (one tiny forward pass through the body)."""
    body, _ = load_body(rich_backbone(backbone, None))
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


def split_labels(rows: list[dict], seed: int, split: SplitConfig) -> np.ndarray:
    """The split of each manifest row under ``data.split`` with ``seed``."""
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


_STATE: dict = {}  # the sweep, manifest rows, class order and rich bodies of this run


def _score_job(job: tuple[Lever, int]) -> tuple[float, float, float]:
    lever, seed = job
    sweep: Sweep = _STATE["sweep"]
    full, body = _STATE["bodies"][lever.body], sweep.bodies[lever.body]
    views = VIEW_SUBSETS[body.views][lever.views]
    sliced = np.ascontiguousarray(
        full.embeddings[:, views][..., tap_columns(body.backbone, lever.taps, lever.pool)]
    )
    split = split_labels(_STATE["rows"], seed, sweep.split)
    features = replace(full, embeddings=sliced, split=split)
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
        print_row(table[-1])
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
    """One experiment as a markdown row, with every split's scores."""
    print(
        f"| {row['lever']} | {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | "
        f"{row['roc_auc_mean']:.4f} ± {row['roc_auc_std']:.4f} | per split: accuracy "
        f"{', '.join(f'{a:.4f}' for a in row['accuracy'])}; ROC-AUC "
        f"{', '.join(f'{a:.4f}' for a in row['roc_auc'])} |",
        flush=True,
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


def score_seeds(
    scorer: Callable[[FeatureSet, list[str], Lever], tuple[float, float, float]],
    features: FeatureSet,
    split: SplitConfig,
    lever: Lever,
    seeds: list[int],
) -> dict:
    """``scorer`` on ``features`` split under ``split`` with every seed; printed and summarised."""
    results = [
        scorer(
            replace(features, split=split_labels(_STATE["rows"], seed, split)),
            _STATE["classes"],
            lever,
        )
        for seed in seeds
    ]
    row = summarise(lever, results)
    print_row(row)
    return row


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
    lever = Lever(
        name,
        "params",
        params.backbone.taps,
        params.backbone.pool,
        params.features.views,
        params.head,
        params.evaluate.threshold,
    )
    scorer = score_defect_levels if target == "levels" else score
    return score_seeds(scorer, full, params.data.split, lever, seeds)


def score_combination(names: list[str], views: str, seeds: list[int], sweep: Sweep) -> dict:
    """Rich bodies side by side (sweep.yaml's ``combine`` taps, meanmax, ``views``), one head over
    the concatenation: an ensemble whose members read PIL-resized files. The pipeline's members
    resize in the model instead; on the default pair that differs by 0.002 accuracy and 0.0005
    ROC-AUC (ACCURACY.md rows 36 and 40)."""
    taps, head = sweep.combine_taps, sweep.combine_head
    parts = []
    for name in names:
        full, body = _STATE["bodies"][name], sweep.bodies[name]
        columns = tap_columns(body.backbone, taps, "meanmax")
        parts.append(full.embeddings[:, VIEW_SUBSETS[body.views][views]][..., columns])
    combined = replace(
        _STATE["bodies"][names[0]], embeddings=np.ascontiguousarray(np.concatenate(parts, -1))
    )
    lever = Lever(
        " + ".join(names) + f", {views}, C {head.C}", "+".join(names), taps, "meanmax", views, head
    )
    return score_seeds(score, combined, sweep.split, lever, seeds)


# Selection: choose between configurations by cross-validation inside each split's train+val
# side, then report the chosen one's test score once. The candidates are slices of one feature
# file (bodies, taps, views) with a head each, listed in accuracy_params/selection.yaml.


@dataclass(frozen=True)
class Candidate:
    """One configuration to choose between: a slice of the feature file plus a head."""

    name: str
    bodies: list[str]  # "<backbone>@<size>" of the file's bodies (main body, then members)
    taps: list
    views: str
    head: HeadConfig
    threshold: float = 0.5


@dataclass(frozen=True)
class Selection:
    """The contents of selection.yaml: the rule, the splits and the candidates."""

    criterion: str  # accuracy | roc_auc: the cross-validated mean that chooses
    folds: int
    seed: int  # shuffles the folds (the same folds for every candidate)
    default: str  # the candidate that is params.yaml
    split: SplitConfig
    candidates: list[Candidate]


CRITERIA = ("accuracy", "roc_auc")


def load_selection(path: Path = CANDIDATES_FILE) -> Selection:
    """Parse selection.yaml; each candidate's head is the file's ``head`` with its keys on top."""
    spec = yaml.safe_load(path.read_text())
    candidates = [
        Candidate(
            name=item["name"],
            bodies=item["bodies"],
            taps=item["taps"],
            views=item["views"],
            head=HeadConfig(**{**spec["head"], **item.get("head", {})}),
            threshold=float(item.get("threshold", 0.5)),
        )
        for item in spec["candidates"]
    ]
    selection = Selection(
        criterion=spec["criterion"],
        folds=int(spec["folds"]),
        seed=int(spec["seed"]),
        default=spec["default"],
        split=SplitConfig(seed=SEEDS[0], **spec["split"]),
        candidates=candidates,
    )
    names = [c.name for c in candidates]
    if selection.criterion not in CRITERIA or selection.default not in names:
        sys.exit(f"{path}: criterion must be one of {CRITERIA} and default a candidate's name")
    if len(set(names)) != len(names):
        sys.exit(f"{path}: candidate names must be unique")
    return selection


def body_layout(identity: dict) -> list[tuple[str, str, list[str], str]]:
    """(``backbone@size``, backbone, taps, pool) of every body in a features_info identity, in
    the order their features are concatenated (main body first, then ``backbone.ensemble``)."""
    bodies = [identity, *identity.get("ensemble", [])]
    return [
        (f"{b['backbone']}@{b['preprocessing']['size']}", b["backbone"], b["taps"], b["pool"])
        for b in bodies
    ]


def candidate_columns(identity: dict, candidate: Candidate) -> np.ndarray:
    """Column indices of ``candidate``'s bodies and taps in a feature file with ``identity``.

    Each body's block holds its taps in order, each tap pooled as the file's pool (meanmax:
    the tap's mean channels, then its max channels), exactly as ``headswap.backbones.body``
    concatenates them; so a slice is the vector the narrower configuration would extract.
    """
    layout = body_layout(identity)
    unknown = sorted(set(candidate.bodies) - {name for name, *_ in layout})
    if unknown:
        sys.exit(f"candidate {candidate.name!r}: bodies {unknown} are not in the feature file")
    wanted = {str(tap) for tap in candidate.taps}
    columns, start = [], 0
    for name, backbone, taps, pool in layout:
        width = 2 if pool == "meanmax" else 1
        channels = dict(zip([str(t) for t in ALL_TAPS], tap_channels(backbone), strict=True))
        for tap in taps:
            size = width * channels[tap]
            if name in candidate.bodies and tap in wanted:
                columns.append(np.arange(start, start + size))
            start += size
    return np.concatenate(columns)


def candidate_slice(
    embeddings: np.ndarray, identity: dict, file_views: str, candidate: Candidate
) -> np.ndarray:
    """``embeddings`` [N, V, D] cut down to ``candidate``'s views and columns."""
    views = VIEW_SUBSETS[file_views][candidate.views]
    return np.ascontiguousarray(embeddings[:, views][..., candidate_columns(identity, candidate)])


def candidate_lever(candidate: Candidate) -> Lever:
    """The candidate as a Lever, so ``score`` trains and scores it as the sweep does."""
    return Lever(
        candidate.name,
        "+".join(candidate.bodies),
        candidate.taps,
        "meanmax",
        candidate.views,
        candidate.head,
        candidate.threshold,
    )


def cross_validate(
    embeddings: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    candidate: Candidate,
    folds: int,
    seed: int,
) -> dict[str, float]:
    """Stratified k-fold scores of ``candidate`` on the rows given, and only those.

    Each fold trains the head on the other folds (no val part: temperature 1, which moves
    neither accuracy at a fixed threshold nor ROC-AUC) and scores the held-out fold.
    """
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = []
    for _, held in splitter.split(np.zeros(len(labels)), labels):
        split = np.full(len(labels), "train", dtype="<U5")
        split[held] = "test"
        # the fold needs no sha256 or path: ``score`` reads embeddings, labels and split only
        fold = FeatureSet(embeddings, sha256=labels, path=labels, label=labels, split=split)
        scores.append(score(fold, classes, candidate_lever(candidate))[:2])
    accuracy, auc = (np.array(column) for column in zip(*scores, strict=True))
    return {
        "accuracy": float(accuracy.mean()),
        "roc_auc": float(auc.mean()),
        "accuracy_per_fold": accuracy.tolist(),
        "roc_auc_per_fold": auc.tolist(),
    }


def choose_candidate(
    training_side: FeatureSet,
    identity: dict,
    file_views: str,
    classes: list[str],
    selection: Selection,
    cv_cache: Path | None = None,
    reverse: bool = False,
    start: int = 0,
) -> tuple[str, list[dict]]:
    """The winning candidate's name and every candidate's cross-validated scores.

    ``training_side`` is one split's train and val rows: the function never sees a test row,
    so nothing about the test split can move the choice. Ties go to the other criterion, then
    to the candidate listed first. With ``cv_cache`` (a folder for this split) each candidate's
    CV scores are stored there and reused, so two processes can share one split's candidates,
    one of them working through the list from the end (``reverse``), another from ``start``.
    """
    if (training_side.split == "test").any():
        raise ValueError("choose_candidate takes the train+val side of a split, not its test rows")
    rows: dict[int, dict] = {}
    order = range(len(selection.candidates))
    start = start % len(order)
    work = [*order[start:], *order[:start]]  # a third process can start in the middle
    for index in reversed(work) if reverse else work:
        candidate = selection.candidates[index]
        stored = cv_cache / cv_cache_name(candidate, selection) if cv_cache else None
        if stored is not None and stored.is_file():
            rows[index] = json.loads(stored.read_text())
            continue
        started = time.perf_counter()
        sliced = candidate_slice(training_side.embeddings, identity, file_views, candidate)
        cv = cross_validate(
            sliced, training_side.label, classes, candidate, selection.folds, selection.seed
        )
        rows[index] = {"candidate": candidate.name, **cv}
        if stored is not None:
            atomic_write_text(stored, json.dumps(rows[index]))
        print(
            f"  {candidate.name}: CV accuracy {cv['accuracy']:.4f}, ROC-AUC {cv['roc_auc']:.4f} "
            f"({time.perf_counter() - started:.0f}s)",
            flush=True,
        )
    table = [rows[index] for index in order]
    other = CRITERIA[1 - CRITERIA.index(selection.criterion)]
    ranked = sorted(
        range(len(table)),
        key=lambda i: (-table[i][selection.criterion], -table[i][other], i),
    )
    return table[ranked[0]]["candidate"], table


def cv_cache_name(candidate: Candidate, selection: Selection) -> str:
    """The file of one candidate's CV scores: its whole definition and the folds."""
    key = json.dumps(
        [
            candidate.name,
            candidate.bodies,
            [str(t) for t in candidate.taps],
            candidate.views,
            candidate.head.model_dump(mode="json"),
            candidate.threshold,
            selection.folds,
            selection.seed,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16] + ".json"


def score_on_test(
    features: FeatureSet,
    identity: dict,
    file_views: str,
    classes: list[str],
    candidate: Candidate,
) -> dict[str, float]:
    """Train ``candidate`` as the pipeline does (head on train, temperature on val) and score
    the test rows: the one look at the test split."""
    sliced = replace(
        features, embeddings=candidate_slice(features.embeddings, identity, file_views, candidate)
    )
    accuracy, auc, _ = score(sliced, classes, candidate_lever(candidate))
    return {"accuracy": accuracy, "roc_auc": auc}


def select_on_split(
    features: FeatureSet,
    identity: dict,
    file_views: str,
    classes: list[str],
    selection: Selection,
    cv_cache: Path | None = None,
    reverse: bool = False,
    start: int = 0,
) -> dict:
    """One split (``features.split``): choose on its train+val side, then score test once."""
    side = features.split != "test"
    training_side = FeatureSet(*(column[side] for column in _columns(features)))
    winner, table = choose_candidate(
        training_side, identity, file_views, classes, selection, cv_cache, reverse, start
    )
    chosen = next(c for c in selection.candidates if c.name == winner)
    cv = next(row for row in table if row["candidate"] == winner)
    return {
        "winner": winner,
        "cv_accuracy": cv["accuracy"],
        "cv_roc_auc": cv["roc_auc"],
        "test": score_on_test(features, identity, file_views, classes, chosen),
        "cv": table,
    }


def _columns(features: FeatureSet) -> tuple[np.ndarray, ...]:
    return (features.embeddings, features.sha256, features.path, features.label, features.split)


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    array = np.array(values)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return {"mean": float(array.mean()), "std": std}


def aligned_rows(features: FeatureSet, manifest: Path) -> list[dict]:
    """The manifest's rows in the feature file's row order (the split needs pixels_sha256)."""
    by_path = {row["path"]: row for row in read_manifest(manifest)}
    missing = [str(p) for p in features.path if str(p) not in by_path]
    if missing:
        sys.exit(f"{manifest}: {len(missing)} feature rows are not in the manifest: {missing[:3]}")
    return [by_path[str(p)] for p in features.path]


def run_selection(
    features: FeatureSet,
    info: dict,
    rows: list[dict],
    classes: list[str],
    selection: Selection,
    seeds: list[int],
    done: Callable[[dict], None] = lambda _: None,
    cv_cache: Path | None = None,
    reverse: bool = False,
    start: int = 0,
) -> dict:
    """Every seed's split: the CV choice and its test score, and the default's test score.

    ``done`` gets the results so far after each split (a cut-short run keeps what it measured).
    """
    identity, file_views = info["identity"], info["views"]
    default = next(c for c in selection.candidates if c.name == selection.default)
    splits = []
    for seed in seeds:
        print(f"split seed {seed}: choosing by {selection.folds}-fold CV on train+val", flush=True)
        split = replace(features, split=split_labels(rows, seed, selection.split))
        folder = None
        if cv_cache is not None:
            folder = cv_cache / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
        result = select_on_split(
            split, identity, file_views, classes, selection, folder, reverse, start
        )
        result["default_test"] = score_on_test(split, identity, file_views, classes, default)
        print(
            f"split seed {seed}: chose {result['winner']!r}; test accuracy "
            f"{result['test']['accuracy']:.4f}, ROC-AUC {result['test']['roc_auc']:.4f} "
            f"(default: {result['default_test']['accuracy']:.4f}, "
            f"{result['default_test']['roc_auc']:.4f})",
            flush=True,
        )
        splits.append({"seed": seed, **result})
        done(summarise_selection(splits))
    return summarise_selection(splits)


def summarise_selection(splits: list[dict]) -> dict:
    """The chosen configurations' and the default's test scores: mean ± std over the splits."""
    return {
        "selected": {metric: spread([s["test"][metric] for s in splits]) for metric in CRITERIA},
        "default": {
            metric: spread([s["default_test"][metric] for s in splits]) for metric in CRITERIA
        },
        "splits": splits,
    }


def selection_record(selection: Selection, info: dict, results: dict, seconds: dict) -> dict:
    """What ``select`` writes: the protocol, the candidates, every split's figures, timing."""
    return {
        "protocol": {
            "criterion": selection.criterion,
            "folds": selection.folds,
            "fold_seed": selection.seed,
            "split": selection.split.model_dump(mode="json") | {"seed": "per split"},
            "default": selection.default,
            "feature_cache_key": info["cache_key"],
        },
        "candidates": [
            {
                "name": c.name,
                "bodies": c.bodies,
                "taps": [str(t) for t in c.taps],
                "views": c.views,
                "C": c.head.C,
                "threshold": c.threshold,
            }
            for c in selection.candidates
        ],
        **results,
        "seconds": seconds,
    }


def merge_selections(paths: list[Path]) -> dict:
    """One record from ``select`` runs over different seeds with the same candidates file."""
    records = [json.loads(path.read_text()) for path in paths]
    first = records[0]
    for path, record_ in zip(paths, records, strict=True):
        if (record_["protocol"], record_["candidates"]) != (first["protocol"], first["candidates"]):
            sys.exit(f"{path}: another protocol or candidate set than {paths[0]}")
    splits = sorted((s for r in records for s in r["splits"]), key=lambda split: split["seed"])
    seeds = [split["seed"] for split in splits]
    if len(set(seeds)) != len(seeds):
        sys.exit(f"the same split seed appears twice in {', '.join(map(str, paths))}: {seeds}")
    runs = [{"seeds": [s["seed"] for s in r["splits"]], **r["seconds"]} for r in records]
    seconds = {"cpu": round(sum(run["cpu"] for run in runs), 1), "runs": runs}
    return {
        "protocol": first["protocol"],
        "candidates": first["candidates"],
        **summarise_selection(splits),
        "seconds": seconds,
    }


def select_command(args: argparse.Namespace) -> int:
    """``select``: choose by CV inside train+val on every split and score test once."""
    import resource

    if args.merge:
        atomic_write_text(args.out, json.dumps(merge_selections(args.merge), indent=2) + "\n")
        print(f"wrote {args.out} from {len(args.merge)} runs")
        return 0
    if args.features is None:
        sys.exit("select: --features is required (or --merge earlier results)")
    if args.threads:
        torch.set_num_threads(args.threads)
    selection = load_selection(args.candidates)
    info_path = args.info or args.features.with_name("features_info.json")
    info = json.loads(info_path.read_text())
    features = load_features(args.features)
    rows = aligned_rows(features, args.manifest)
    classes = read_classes(args.validation)
    started, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)

    def write(results: dict) -> dict[str, float]:
        end = resource.getrusage(resource.RUSAGE_SELF)
        seconds = {
            "wall": round(time.perf_counter() - started, 1),
            "cpu": round(end.ru_utime + end.ru_stime - usage.ru_utime - usage.ru_stime, 1),
            "torch_threads": torch.get_num_threads(),
        }
        record_ = selection_record(selection, info, results, seconds)
        atomic_write_text(args.out, json.dumps(record_, indent=2) + "\n")
        return seconds

    results = run_selection(
        features,
        info,
        rows,
        classes,
        selection,
        args.seeds,
        write,
        args.cv_cache,
        args.reverse,
        args.start,
    )
    seconds = write(results)
    for name in ("selected", "default"):
        acc, auc = results[name]["accuracy"], results[name]["roc_auc"]
        print(
            f"{name}: test accuracy {acc['mean']:.4f} ± {acc['std'] or 0:.4f}, "
            f"ROC-AUC {auc['mean']:.4f} ± {auc['std'] or 0:.4f}"
        )
    print(f"wrote {args.out} ({seconds['wall']}s wall, {seconds['cpu']}s CPU)")
    return 0


# The results file: one row per experiment, numbers as printed (4 decimals). ``commit`` is set
# only on rows the current code no longer reproduces: the commit they were measured at.
RESULT_FIELDS = [
    "row",
    "experiment",
    "configuration",
    "accuracy_mean",
    "accuracy_std",
    "roc_auc_mean",
    "roc_auc_std",
    "accuracy_per_split",
    "roc_auc_per_split",
    "commit",
    "default",
]


def read_results(path: Path = RESULTS_FILE) -> list[dict[str, str]]:
    """The results file's rows, every value a string as written."""
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def write_results(rows: list[dict[str, str]], path: Path = RESULTS_FILE) -> None:
    """Rewrite the results file with ``rows``, columns in RESULT_FIELDS order."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=RESULT_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def measured(summary: dict) -> dict[str, str]:
    """The results-file columns of one experiment's summary."""
    return {
        "experiment": summary["lever"],
        "accuracy_mean": f"{summary['accuracy_mean']:.4f}",
        "accuracy_std": f"{summary['accuracy_std']:.4f}",
        "roc_auc_mean": f"{summary['roc_auc_mean']:.4f}",
        "roc_auc_std": f"{summary['roc_auc_std']:.4f}",
        "accuracy_per_split": " ".join(f"{a:.4f}" for a in summary["accuracy"]),
        "roc_auc_per_split": " ".join(f"{a:.4f}" for a in summary["roc_auc"]),
    }


def upsert(rows: list[dict[str, str]], result: dict[str, str]) -> list[dict[str, str]]:
    """``rows`` with ``result`` in place of the current-code row of the same experiment, or
    appended as the next numbered row (its configuration text starts as the experiment name)."""
    for index, row in enumerate(rows):
        if row["experiment"] == result["experiment"] and not row["commit"]:
            return [*rows[:index], {**row, **result}, *rows[index + 1 :]]
    number = 1 + max((int(row["row"]) for row in rows if row["row"]), default=0)
    new = {field: "" for field in RESULT_FIELDS} | {
        "row": str(number),
        "configuration": result["experiment"],
        **result,
    }
    return [*rows, new]


def record(summary: dict, path: Path) -> None:
    """Write one experiment's result into the results file (``path``)."""
    write_results(upsert(read_results(path), measured(summary)), path)
    print(f"recorded {summary['lever']!r} in {path}")


def numbered_first(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Experiments in row order, then the unnumbered reference rows."""
    return sorted(rows, key=lambda row: (not row["row"], int(row["row"] or 0)))


def figure(mean: str, std: str) -> str:
    """``mean ± std``, or the mean alone for a figure without a spread (the reference)."""
    return f"{mean} ± {std}" if std else mean


def experiments_table(rows: list[dict[str, str]]) -> str:
    """Every experiment: mean ± std over the seeds; the committed default in bold."""

    def bold(text: str, row: dict[str, str]) -> str:
        return f"**{text}**" if row["default"] and text else text

    return markdown_table(
        ["#", "configuration (what changed)", "test accuracy", "test ROC-AUC", "measured at"],
        [
            [
                bold(row["row"], row),
                bold(row["configuration"], row),
                bold(figure(row["accuracy_mean"], row["accuracy_std"]), row),
                bold(figure(row["roc_auc_mean"], row["roc_auc_std"]), row),
                f"`{row['commit']}`" if row["commit"] else "",
            ]
            for row in numbered_first(rows)
        ],
    )


def per_split_table(rows: list[dict[str, str]]) -> str:
    """The experiments whose every split's scores are recorded."""
    return markdown_table(
        ["#", "configuration", "accuracy, seeds 0..4", "ROC-AUC, seeds 0..4"],
        [
            [
                row["row"],
                row["configuration"],
                row["accuracy_per_split"].replace(" ", ", "),
                row["roc_auc_per_split"].replace(" ", ", "),
            ]
            for row in numbered_first(rows)
            if row["accuracy_per_split"]
        ],
    )


def number(value: float) -> str:
    return f"{value:.4f}"


def spread_text(figures: dict[str, float | None]) -> str:
    """``mean ± std`` of a ``spread``."""
    std = figures["std"]
    return number(figures["mean"]) + ("" if std is None else f" ± {number(std)}")


def selection_summary_table(selection: dict) -> str:
    """The CV-chosen configurations and the default: test mean ± std over the splits."""
    seeds = ", ".join(str(split["seed"]) for split in selection["splits"])
    rows = [
        ("chosen by CV inside train+val, per split", selection["selected"]),
        (f"the default, params.yaml ({selection['protocol']['default']})", selection["default"]),
    ]
    return markdown_table(
        ["configuration", f"test accuracy, seeds {seeds}", "test ROC-AUC"],
        [[name, spread_text(f["accuracy"]), spread_text(f["roc_auc"])] for name, f in rows],
    )


def selection_splits_table(selection: dict) -> str:
    """Per split: the winner, its CV score, its test score, and the default's test score."""
    return markdown_table(
        [
            "split seed",
            "chosen configuration",
            "CV accuracy",
            "CV ROC-AUC",
            "test accuracy",
            "test ROC-AUC",
            "default's test accuracy",
            "default's test ROC-AUC",
        ],
        [
            [
                str(split["seed"]),
                split["winner"],
                number(split["cv_accuracy"]),
                number(split["cv_roc_auc"]),
                number(split["test"]["accuracy"]),
                number(split["test"]["roc_auc"]),
                number(split["default_test"]["accuracy"]),
                number(split["default_test"]["roc_auc"]),
            ]
            for split in selection["splits"]
        ],
    )


def selection_candidates_table(selection: dict) -> str:
    """Every candidate's cross-validated scores, averaged over the splits, and its wins."""
    table = []
    for candidate in selection["candidates"]:
        name = candidate["name"]
        cv = [
            row for split in selection["splits"] for row in split["cv"] if row["candidate"] == name
        ]
        wins = sum(split["winner"] == name for split in selection["splits"])
        table.append(
            [
                name,
                number(float(np.mean([row["accuracy"] for row in cv]))),
                number(float(np.mean([row["roc_auc"] for row in cv]))),
                str(wins),
            ]
        )
    return markdown_table(
        ["candidate", "CV accuracy (mean of splits)", "CV ROC-AUC (mean of splits)", "splits won"],
        table,
    )


TABLES = {"experiments": experiments_table, "per-split": per_split_table}
SELECTION_TABLES = {
    "selection": selection_summary_table,
    "selection-splits": selection_splits_table,
    "selection-candidates": selection_candidates_table,
}
GENERATED = re.compile(
    r"(<!-- generated by benchmarks/accuracy.py render: (?P<name>[\w-]+) -->\n)"
    r".*?"
    r"(<!-- end of generated table -->)",
    re.DOTALL,
)


def render(markdown: str, rows: list[dict[str, str]], selection: dict | None = None) -> str:
    """``markdown`` with every generated block rewritten from ``rows`` (the results file) and
    ``selection`` (what ``select`` wrote)."""

    def table(name: str) -> str:
        if name in TABLES:
            return TABLES[name](rows)
        if selection is None:
            sys.exit(f"the {name!r} table needs the selection results (render --selection)")
        return SELECTION_TABLES[name](selection)

    return GENERATED.sub(lambda match: f"{match[1]}{table(match['name'])}\n{match[3]}", markdown)


def render_command(args: argparse.Namespace) -> int:
    """``render``: rewrite the generated tables, or with ``--check`` only compare them."""
    current = args.out.read_text()
    selection = json.loads(args.selection.read_text()) if args.selection.is_file() else None
    rendered = render(current, read_results(args.results), selection)
    if args.check:
        print(f"{args.out} is {'current' if rendered == current else 'stale'}")
        return int(rendered != current)
    args.out.write_text(rendered)
    print(f"wrote {args.out} from {args.results} and {args.selection}")
    return 0


def prepare_workspace(workspace: Path, raw_dir: Path) -> tuple[list[dict], list[str]]:
    """One manifest for every body (its own split is ignored: each seed re-splits it)."""
    workspace.mkdir(parents=True, exist_ok=True)
    prepare(load_params().data, raw_dir, workspace / "prepared")
    (workspace / "manifest.csv").write_bytes((workspace / "prepared/manifest.csv").read_bytes())
    return read_manifest(workspace / "manifest.csv"), read_classes(
        workspace / "prepared/validation.json"
    )


def write_json(out: Path, seeds: list[int], rows: list[dict]) -> None:
    """Every seed's scores of ``rows``, for a closer look than the results file keeps."""
    out.write_text(json.dumps({"seeds": seeds, "rows": rows}, indent=2))
    print(f"wrote {out}")


def measure_command(args: argparse.Namespace) -> int:
    """``measure``: score the lever sweep, a params file or a combination, and record it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = load_sweep(args.sweep)
    rows, classes = prepare_workspace(args.workspace, args.raw)
    _STATE.update(sweep=sweep, rows=rows, classes=classes)
    if args.params:
        row = score_params(
            args.params, args.workspace, args.raw, args.seeds, args.normalise, args.target
        )
        suffix = "" if args.normalise == "none" else f"-{args.normalise}"
        suffix += "" if args.target == "class" else f"-{args.target}"
        write_json(args.workspace / f"accuracy-{args.params.stem}{suffix}.json", args.seeds, [row])
        record(row, args.results)
        return 0
    unknown = sorted(set(args.bodies) - set(sweep.bodies))
    if unknown:
        sys.exit(f"unknown bodies {unknown} (sweep.yaml has: {', '.join(sweep.bodies)})")
    _STATE["bodies"] = {
        name: load_features(extract_body(name, sweep.bodies[name], args.workspace, args.raw))
        for name in args.bodies
    }
    if args.combine:
        row = score_combination(args.bodies, args.views, args.seeds, sweep)
        out = args.workspace / f"accuracy-combined-{'+'.join(args.bodies)}-{args.views}.json"
        write_json(out, args.seeds, [row])
        record(row, args.results)
        return 0
    selected = [
        lever
        for lever in sweep.levers
        if lever.body in args.bodies and (not args.only or any(o in lever.name for o in args.only))
    ]
    table = run_sweep(selected, args.seeds, args.workspace / "accuracy.json")
    for row in table:
        record(row, args.results)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="run experiments and record their results")
    measure.set_defaults(run=measure_command)
    measure.add_argument("--workspace", type=Path, required=True)
    measure.add_argument("--raw", type=Path, default=Path("data/raw"))
    measure.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    measure.add_argument("--sweep", type=Path, default=SWEEP_FILE, help="bodies and levers")
    measure.add_argument("--results", type=Path, default=RESULTS_FILE, help="results file")
    measure.add_argument(
        "--bodies", nargs="+", default=["224", "300", "300-flip"], help="sweep.yaml body names"
    )
    measure.add_argument("--only", nargs="*", help="lever names (substring match) to run")
    measure.add_argument(
        "--params",
        type=Path,
        help="score this params.yaml as the pipeline runs it (its backbone, views and head) "
        "instead of the lever sweep",
    )
    measure.add_argument(
        "--normalise",
        choices=list(NORMALISATIONS),
        default="none",
        help="with --params: normalise each view's features first (l2, signed-sqrt)",
    )
    measure.add_argument(
        "--target",
        choices=["class", "levels"],
        default="class",
        help="with --params: train on the class (as the pipeline does) or on ELPV's four defect "
        "levels (defective = P(2/3) + P(1) >= 0.5)",
    )
    measure.add_argument(
        "--combine",
        action="store_true",
        help="score the --bodies side by side (sweep.yaml's combine taps and head, --views) "
        "instead of the lever sweep",
    )
    measure.add_argument(
        "--views",
        choices=["none", "flip", "d4"],
        default="flip",
        help="with --combine: the views the head trains on (each body must have them)",
    )
    measure.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    select = commands.add_parser(
        "select",
        help="choose between candidates by CV inside each split's train+val, score test once",
    )
    select.set_defaults(run=select_command)
    select.add_argument("--features", type=Path, help="a features.npz the candidates slice")
    select.add_argument(
        "--info", type=Path, help="its features_info.json (default: beside --features)"
    )
    select.add_argument("--manifest", type=Path, default=Path("data/prepared/manifest.csv"))
    select.add_argument(
        "--validation", type=Path, default=Path("data/prepared/validation.json"), help="classes"
    )
    select.add_argument("--candidates", type=Path, default=CANDIDATES_FILE)
    select.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    select.add_argument("--out", type=Path, default=SELECTION_FILE, help="results (JSON)")
    select.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    select.add_argument(
        "--cv-cache",
        type=Path,
        help="keep each candidate's CV scores here per split and reuse them (processes that "
        "share a split share this folder)",
    )
    select.add_argument(
        "--reverse", action="store_true", help="work through the candidates from the end"
    )
    select.add_argument(
        "--start", type=int, default=0, help="with --cv-cache: begin at this candidate's index"
    )
    select.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="instead of measuring: combine these select results (other seeds) into --out",
    )
    render_ = commands.add_parser("render", help="rewrite ACCURACY.md's tables from the results")
    render_.set_defaults(run=render_command)
    render_.add_argument("--results", type=Path, default=RESULTS_FILE)
    render_.add_argument("--selection", type=Path, default=SELECTION_FILE, help="select's results")
    render_.add_argument("--out", type=Path, default=ACCURACY_MD)
    render_.add_argument(
        "--check", action="store_true", help="exit 1 if the tables differ from the results"
    )
    return top


def main() -> int:
    args = parser().parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
