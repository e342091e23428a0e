"""What a resolved backbone is, without building it: name, weights, preprocessing, identity.

Import-light (no torch), so the feature-cache key and the model card can use it anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from headswap.config import Tap

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes the model's input; the cache key and the ONNX metadata both use it."""

    size: int
    mean: tuple[float, float, float]  # in 0..255 pixel units
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


def scaled_preprocessing(
    size: int, mean: Sequence[float], std: Sequence[float], interpolation: str
) -> Preprocessing:
    """``Preprocessing`` from mean/std in 0..1 units; an augmentation-only interpolation
    (timm's 'random' and the like) becomes bicubic."""
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"
    scale = lambda values: tuple(255.0 * v for v in values)  # noqa: E731
    return Preprocessing(int(size), scale(mean), scale(std), interpolation)


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: what it is, where its weights are, and how to feed it.

    ``ensemble`` holds the identities of further bodies (``backbone.ensemble``) whose features
    follow the main body's; it is empty for a single body, whose identity is then unchanged.
    """

    name: str
    weights_path: Path
    weights_sha256: str
    preprocessing: Preprocessing
    license: str
    ensemble: tuple[dict, ...] = ()

    def identity(self, taps: list[Tap], pool: str) -> dict:
        """Everything that changes the embeddings; hashed into the feature-cache key."""
        identity = {
            "backbone": self.name,
            "weights_sha256": self.weights_sha256,
            "preprocessing": asdict(self.preprocessing),
            "taps": [str(tap) for tap in taps],
            "pool": pool,
        }
        if not self.ensemble:
            return identity
        # Members once saw fractional pixels: the new field keeps those cache entries apart.
        return {**identity, "ensemble": list(self.ensemble), "member_pixels": "rounded"}

    def describe(self) -> str:
        """The body for people: ``efficientnet_lite2`` or ``efficientnet_lite2 + ...@384``."""
        members = [f"{m['backbone']}@{m['preprocessing']['size']}" for m in self.ensemble]
        return " + ".join([self.name, *members])


@dataclass(frozen=True)
class BackboneInfo:
    """One row of ``headswap backbones``."""

    name: str
    taps: list[str]  # every tap this backbone offers
    dim: int | None  # feature size for the configured taps and pool (None: taps not offered)
    weights_present: bool
    weights_path: Path  # where the weights are (or are expected)


def identity_key(identity: dict) -> str:
    """Short stable hash of a backbone identity (plus any extra fields such as views)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
