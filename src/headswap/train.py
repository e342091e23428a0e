"""The train stage: fit the head on the train split, calibrate it on val, write head.pt/head.json.

The logistic head is fitted by full-batch L-BFGS (sklearn's objective, so the same C means the
same model), the MLP by AdamW with early stopping on val; then the temperature and, for two
classes, the decision threshold are fitted on the val split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headswap.config import EvaluateConfig, HeadConfig
from headswap.errors import ConfigError
from headswap.feature_set import FeatureSet
from headswap.heads import Head, HeadMeta, logits_to_probabilities, predict_proba
from headswap.io import atomic_path, atomic_write_text

C_GRID = tuple(float(c) for c in np.logspace(-3, 1, 9))
CV_FOLDS = 5


def _loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean of the log-loss that matches the head's output layer."""
    if logits.shape[1] == 1:
        per_sample = nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0], targets.to(logits.dtype), reduction="none"
        )
    else:
        per_sample = nn.functional.cross_entropy(logits, targets, reduction="none")
    return (per_sample * weights).sum() / weights.sum()


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("head.device: 'cuda' requested but no CUDA device is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Per-sample weights: 1, or n / (k * count[class]) for ``balanced`` (sklearn's rule)."""
    if mode == "none":
        return np.ones(len(labels))
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return (len(labels) / (n_classes * np.maximum(counts, 1)))[labels]


def _expand_views(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, V, D] -> [N*V, D]: every view is a training sample with its image's label."""
    n, v, d = embeddings.shape
    return embeddings.reshape(n * v, d), np.repeat(labels, v)


def _fit_standardisation(head: Head, x: np.ndarray) -> None:
    head.mean.copy_(torch.from_numpy(x.mean(axis=0)))
    head.scale.copy_(torch.from_numpy(x.std(axis=0) + 1e-6))


def fit_logistic(
    head: Head,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    C: float,
    n_images: int,
    max_iter: int,
) -> int:
    """Full-batch L-BFGS on log-loss + ||W||^2 / (2 C n): sklearn's C, counted per image.

    ``x`` is already standardised with the head's own mean and scale.
    """
    params = list(head.net.parameters())
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )
    weight = head.net.weight
    state = {"evaluations": 0}

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _loss(head.net(x), y, w) + weight.pow(2).sum() / (2 * C * n_images)
        loss.backward()
        state["evaluations"] += 1
        return loss

    optimizer.step(closure)
    return state["evaluations"]


def fit_mlp(
    head: Head,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    val: tuple | None,
    config: HeadConfig,
    generator: torch.Generator,
) -> int:
    """AdamW minibatches with early stopping on validation log-loss (patience 20 epochs).

    ``x`` is already standardised; ``val`` holds raw [N, V, D] embeddings and labels.
    """
    optimizer = torch.optim.AdamW(head.net.parameters(), lr=1e-3, weight_decay=1e-2)
    best = (float("inf"), None, 0)
    patience, batch = 20, 256
    epoch = 0
    for epoch in range(1, config.max_iter + 1):
        head.train()
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            _loss(head.net(x[idx]), y[idx], w[idx]).backward()
            optimizer.step()
        head.eval()
        if val is None:
            continue
        with torch.no_grad():
            val_loss = _view_averaged_nll(head, *val)
        if val_loss < best[0] - 1e-5:
            best = (val_loss, {k: v.clone() for k, v in head.state_dict().items()}, epoch)
        elif epoch - best[2] >= patience:
            break
    if best[1] is not None:
        head.load_state_dict(best[1])
    return epoch


def _view_averaged_nll(head: Head, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    n, v, d = embeddings.shape
    probabilities = head(embeddings.reshape(n * v, d)).reshape(n, v, -1).mean(dim=1)
    picked = probabilities[torch.arange(n), labels].clamp_min(1e-12)
    return float(-picked.log().mean())


def fit_temperature(head: Head, embeddings: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising validation NLL of the view-averaged probabilities.

    A 1-D grid over log T (0.05..20) is exact enough and needs no tuning. The logits are computed
    once; each grid point only rescales them.
    """
    if len(labels) == 0:
        return 1.0
    n, v, d = embeddings.shape
    with torch.no_grad():
        logits = head.logits(torch.from_numpy(embeddings.reshape(n * v, d)).to(head.mean))
    targets = torch.from_numpy(labels).to(logits.device)
    best_t, best_nll = 1.0, float("inf")
    for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 241)):
        probabilities = logits_to_probabilities(logits / float(t), head.n_classes)
        picked = probabilities.reshape(n, v, -1).mean(dim=1)[torch.arange(n), targets]
        nll = float(-picked.clamp_min(1e-12).log().mean())
        if nll < best_nll - 1e-12:
            best_t, best_nll = float(t), nll
    head.temperature.fill_(best_t)
    return best_t


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The positive-class threshold with the best validation accuracy (ties -> nearest 0.5)."""
    positive = probabilities[:, 1]
    candidates = np.unique(np.concatenate([positive, [0.5]]))
    scored = [
        (float(((positive >= t) == (labels == 1)).mean()), -abs(t - 0.5), float(t))
        for t in candidates
    ]
    return max(scored)[2]


def _fit_once(
    x: np.ndarray,
    y: np.ndarray,
    n_images: int,
    n_classes: int,
    config: HeadConfig,
    C: float,
    device: str,
    val: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[Head, int]:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    dtype = torch.float64 if device == "cpu" else torch.float32
    head = Head(x.shape[1], n_classes, config.type, config.hidden, config.dropout)
    _fit_standardisation(head, x)
    head = head.to(device, dtype)
    # Standardise once: the fits below call head.net on these, not head.logits on raw features,
    # which would redo two full passes over the matrix at every L-BFGS evaluation.
    xt = (torch.from_numpy(x).to(device, dtype) - head.mean) / head.scale
    yt = torch.from_numpy(y).to(device)
    wt = torch.from_numpy(class_weights(y, n_classes, config.class_weight)).to(device, dtype)
    if config.type == "logistic":
        steps = fit_logistic(head, xt, yt, wt, C, n_images, config.max_iter)
    else:
        val_t = None
        if val is not None and len(val[1]):
            val_t = (
                torch.from_numpy(val[0]).to(device, dtype),
                torch.from_numpy(val[1]).to(device),
            )
        steps = fit_mlp(head, xt, yt, wt, val_t, config, generator)
    return head.eval(), steps


def choose_C(
    embeddings: np.ndarray, labels: np.ndarray, n_classes: int, config: HeadConfig, device: str
) -> float:
    """Stratified k-fold cross-validation on the training split only (folds split by image)."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=config.seed)
    losses = []
    for C in C_GRID:
        fold_losses = []
        for fit_idx, held_idx in folds.split(embeddings[:, 0], labels):
            x, y = _expand_views(embeddings[fit_idx], labels[fit_idx])
            head, _ = _fit_once(x, y, len(fit_idx), n_classes, config, C, device, None)
            held = (
                torch.from_numpy(embeddings[held_idx]).to(head.mean),
                torch.from_numpy(labels[held_idx]).to(device),
            )
            with torch.no_grad():
                fold_losses.append(_view_averaged_nll(head, *held))
        losses.append(float(np.mean(fold_losses)))
    return C_GRID[int(np.argmin(losses))]


def train_head(
    features: FeatureSet,
    classes: list[str],
    config: HeadConfig,
    threshold: EvaluateConfig | float | str = 0.5,
) -> tuple[Head, HeadMeta]:
    """Fit the head on the train split, then temperature and threshold on the val split."""
    if isinstance(threshold, EvaluateConfig):
        threshold = threshold.threshold
    index = {name: i for i, name in enumerate(classes)}
    train_x, train_labels = features.select("train")
    val_x, val_labels = features.select("val")
    train_y = np.array([index[label] for label in train_labels], dtype=np.int64)
    val_y = np.array([index[label] for label in val_labels], dtype=np.int64)
    device = resolve_device(config.device)
    if config.C == "auto" and config.type != "logistic":
        raise ConfigError(
            "head.C: 'auto' tunes the logistic head's L2 strength; the mlp head is regularised "
            "by head.dropout and early stopping. Set head.C to a number or head.type to logistic."
        )

    started = time.perf_counter()
    C = choose_C(train_x, train_y, len(classes), config, device) if config.C == "auto" else config.C
    x, y = _expand_views(train_x, train_y)
    head, steps = _fit_once(x, y, len(train_y), len(classes), config, C, device, (val_x, val_y))
    temperature = fit_temperature(head, val_x, val_y)
    decision = None
    if len(classes) == 2:
        decision = 0.5
        if threshold == "auto" and len(val_y):
            decision = choose_threshold(predict_proba(head, val_x), val_y)
        elif threshold != "auto":
            decision = float(threshold)
    notes = _empty_val_notes(config, len(classes), threshold) if not len(val_y) else []
    seconds = time.perf_counter() - started
    meta = HeadMeta(
        config.type,
        x.shape[1],
        classes,
        config.hidden,
        config.dropout,
        float(C),
        temperature,
        decision,
        device,
        round(seconds, 3),
        steps,
        notes,
    )
    return head.cpu().float(), meta


def _empty_val_notes(config: HeadConfig, n_classes: int, threshold: float | str) -> list[str]:
    """What an empty val split left at its default (data.split.val_size 0, or a tiny dataset)."""
    notes = ["temperature 1.0: the val split is empty, so there is nothing to calibrate on"]
    if n_classes == 2 and threshold == "auto":
        notes.append("threshold 0.5: evaluate.threshold is 'auto' but the val split is empty")
    if config.type == "mlp":
        notes.append(
            f"no early stopping: the val split is empty, so the mlp trained all "
            f"head.max_iter={config.max_iter} epochs"
        )
    return notes


def save_head(head: Head, meta: HeadMeta, weights_path: Path, meta_path: Path) -> None:
    """Weights as a plain state dict (loadable with ``weights_only=True``), metadata as JSON."""
    with atomic_path(weights_path) as tmp:
        torch.save(head.state_dict(), tmp)
    atomic_write_text(meta_path, json.dumps(asdict(meta), indent=2))
