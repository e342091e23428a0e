"""The trained part: a logistic-regression or MLP head on frozen embeddings, plus calibration.

A head owns its input standardisation, its temperature and (for two classes) its decision
threshold, so the saved artifact alone reproduces every prediction the evaluate stage reports,
and the exported ONNX model embeds exactly the same numbers. ``headswap.train`` fits and saves
heads; this module defines them and reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class HeadMeta:
    """Everything needed to rebuild a saved head, stored beside its weights as JSON."""

    type: str
    dim: int
    classes: list[str]
    hidden: int
    dropout: float
    C: float
    temperature: float
    threshold: float | None
    device: str
    train_seconds: float
    epochs: int
    # Why a val-fitted number took its default (an empty val split), for the model card and logs.
    calibration_notes: list[str] = field(default_factory=list)


class Head(nn.Module):
    """Standardise -> linear (or MLP) -> temperature-scaled class probabilities."""

    def __init__(
        self,
        dim: int,
        n_classes: int,
        kind: str = "logistic",
        hidden: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_classes = n_classes
        outputs = 1 if n_classes == 2 else n_classes  # one sigmoid logit for binary tasks
        if kind == "logistic":
            self.net = nn.Linear(dim, outputs)
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, outputs)
            )
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("temperature", torch.ones(()))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, n_classes], temperature applied."""
        return logits_to_probabilities(self.logits(features) / self.temperature, self.n_classes)


def logits_to_probabilities(logits: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Binary heads have one sigmoid logit; expand it to two columns like softmax heads."""
    if n_classes == 2:
        positive = torch.sigmoid(logits)
        return torch.cat([1 - positive, positive], dim=1)
    return torch.softmax(logits, dim=1)


def predict_proba(head: Head, embeddings: np.ndarray) -> np.ndarray:
    """[N, V, D] embeddings -> [N, K] probabilities averaged over views (what ONNX computes)."""
    head.eval()
    n, v, d = embeddings.shape
    device = next(head.parameters()).device
    x = torch.from_numpy(embeddings.reshape(n * v, d)).to(device, head.mean.dtype)
    with torch.no_grad():
        probabilities = head(x).reshape(n, v, -1).mean(dim=1)
    return probabilities.double().cpu().numpy()


def load_head(weights_path: Path, meta_path: Path) -> tuple[Head, HeadMeta]:
    meta = HeadMeta(**json.loads(Path(meta_path).read_text()))
    head = Head(meta.dim, len(meta.classes), meta.type, meta.hidden, meta.dropout)
    head.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return head.eval(), meta
