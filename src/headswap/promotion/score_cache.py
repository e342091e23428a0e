"""Promotion's score cache: one deployable model's scores for one image, kept between promotions.

Where it lives. In the feature-cache folder (``features.cache_dir``, ``$HEADSWAP_CACHE_DIR`` or
``~/.cache/headswap``), under ``scores/<model key>/<sha[:2]>/<image sha256>.npy``, and not as an
artifact on the version's MLflow run, because:

- the key is content (the model's bytes and the image's bytes), not a registry record: a score
  holds for those bytes in any store, workspace or model name, which is what a
  content-addressed folder is for, and every workspace of the user already shares that folder;
- the gate then only reads the registry: it never writes into the runs it judges, needs no
  write access to their artifact store, and two promotions never race on a run's artifact
  (MLflow has no atomic replace of an artifact; a local file has ``os.replace``);
- entries reuse the feature cache's storage (``FeatureCache``): written through a temp file and
  a rename, checked by a blake2b digest on every read, so a torn or corrupt entry is scored
  again, never trusted; ``headswap cache prune --older-than`` ages them out with the rest;
- a hit is a small local read; an artifact would be downloaded again on every promotion.

The cost: another machine (or user) with its own folder scores the images again once.

The key. ``<model sha256>-<context>``: the sha256 of the exact ONNX bytes that were downloaded
and verified against the version's ``onnx_sha256`` tag, and a short hash of what else turns an
(image, model) pair into numbers: the decoding code (``DECODING_CODE``, as
``headswap.codeversion`` hashes code) and the ONNX Runtime version. Each entry is named by the
sha256 of the image file's bytes as read now (which must equal the manifest's ``sha256``). So a
changed image, model, decoder or runtime never reuses a score.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headswap.codeversion import source_version
from headswap.feature_cache import SCORES, FeatureCache, cache_root
from headswap.io import atomic_write_text

# The code between an image file and the model's input pixels (``OnnxClassifier.load_pixels``).
# Everything after that is inside the ONNX model, whose bytes are in the key.
DECODING_CODE: tuple[tuple[str, str], ...] = (
    ("headswap.imaging", "open_rgb"),
    ("headswap.imaging", "_to_rgb"),
    ("headswap.imaging", "load_pixels"),
    ("headswap.imaging", "load_model_input"),
    ("headswap.imaging", "_RESAMPLING"),
    ("headswap.imaging", "_EXIF_ORIENTATION"),
)


@functools.cache
def scoring_context() -> dict[str, str]:
    """The decoding code's version and the ONNX Runtime version, as the key records them."""
    import onnxruntime

    from headswap import imaging

    sources = {"headswap.imaging": inspect.getsource(imaging)}
    return {
        "decoding_code": source_version(sources, DECODING_CODE),
        "onnxruntime": onnxruntime.__version__,
    }


def score_key(model_sha256: str) -> str:
    """``<model sha256>-<12 hex digits of the scoring context>``."""
    context = json.dumps(scoring_context(), sort_keys=True).encode()
    return f"{model_sha256}-{hashlib.sha256(context).hexdigest()[:12]}"


@dataclass(frozen=True)
class ImageScore:
    """One image's scores by one model: probabilities [K] (float32) and the predicted index."""

    probabilities: np.ndarray
    label: int


class ScoreCache:
    """One model's cached scores, by image sha256, under ``<root>/scores/<score_key>``.

    An entry is a float32 vector: the K probabilities as the model returned them, then the
    predicted class index (exact in float32). An entry that fails the digest or does not have
    that shape is treated as missing, so the image is scored again and the entry rewritten.
    """

    def __init__(self, root: str | Path | None, model_sha256: str, classes: list[str]):
        self.classes = classes
        self.store = FeatureCache(cache_root(root), score_key(model_sha256), SCORES)
        self.model_sha256 = model_sha256

    @property
    def dir(self) -> Path:
        return self.store.dir

    def get(self, image_sha256: str) -> ImageScore | None:
        """The cached score, or None when absent, torn, corrupt or not this model's shape."""
        entry = self.store.get(image_sha256, touch=True)
        k = len(self.classes)
        if entry is None or entry.dtype != np.float32 or entry.shape != (k + 1,):
            return None
        probabilities, label = entry[:k], float(entry[k])
        if not np.isfinite(probabilities).all() or label not in range(k):
            return None
        return ImageScore(probabilities.copy(), int(label))

    def put(self, image_sha256: str, score: ImageScore) -> None:
        """Store one image's score (atomically: temp file + rename)."""
        probabilities = np.asarray(score.probabilities)
        if probabilities.dtype != np.float32:
            # The entry holds float32; a model returning another type would not read back
            # exactly, so it is scored every time rather than cached inexactly.
            return
        self.store.put(image_sha256, np.append(probabilities, np.float32(score.label)))

    def describe(self) -> None:
        """Record what the key stands for (once), so a person can tell the folders apart."""
        target = self.dir / "key.json"
        if not target.is_file():
            identity = {"model_sha256": self.model_sha256, "classes": self.classes}
            atomic_write_text(target, json.dumps({**identity, **scoring_context()}, indent=2))
