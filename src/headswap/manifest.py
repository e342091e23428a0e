"""The prepared dataset as later stages read it: the manifest and the class order.

The prepare stage writes ``manifest.csv`` (one row per image, with its split) and
``validation.json`` (which records the class order); features, evaluate, register and the
operator tools read them through this module, never through the prepare stage itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from headswap.io import read_csv

# sha256 is of the file's bytes (the feature cache's key); pixels_sha256 is of the decoded RGB
# pixels, so a re-encoded copy of an image is recognised as the same image.
MANIFEST_COLUMNS = ("path", "sha256", "pixels_sha256", "label", "split")
# How an image's split is decided, recorded on every registered version: two versions with the
# same rule, seed and fractions put every image in the same split.
SPLIT_RULE = "pixels-sha256-threshold-v1"


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The manifest rows, in file order, with every cell as prepare was given it."""
    return read_csv(path)


def read_classes(report_path: Path) -> list[str]:
    """Class names in model output order, as recorded by prepare."""
    return json.loads(Path(report_path).read_text())["classes"]
