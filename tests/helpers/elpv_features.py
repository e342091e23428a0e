"""Real features for tests that are about what a head or a choice reads: a few dozen ELPV
cells through the small body (Lite0 at 96 px, one tap), embedded by the features stage."""

from __future__ import annotations

import json
from pathlib import Path

from headswap.config import BackboneConfig, DataConfig, FeaturesConfig
from headswap.feature_set import FeatureSet, load_features
from headswap.features import extract_features
from headswap.ingest import ingest
from headswap.manifest import read_classes
from headswap.prepare import prepare
from tests.helpers.workspace import SMALL_BODY


def elpv_features(
    root: Path, cache_dir: Path, per_class: int = 40, views: str = "flip", **body: object
) -> tuple[FeatureSet, list[str], dict]:
    """Ingest, prepare and embed ``per_class`` ELPV images per class under ``root`` with the
    small body (``body`` overrides its keys: taps, pool).

    Returns the feature set (split by ``data.split`` as params.yaml has it), the class order
    and ``features_info.json``.
    """
    data = DataConfig(source="elpv", max_per_class=per_class)
    raw = root / "raw"
    ingest(data, raw)
    prepared = prepare(data, raw, root / "prepared")
    backbone = BackboneConfig(**{**SMALL_BODY, **body}, weights=None)
    features = FeaturesConfig(views=views, cache_dir=str(cache_dir), workers=0)
    out = root / "features" / "features.npz"
    out.parent.mkdir(parents=True)
    extract_features(backbone, features, prepared.manifest, raw, out)
    info = json.loads((out.parent / "features_info.json").read_text())
    return load_features(out), read_classes(prepared.report), info
