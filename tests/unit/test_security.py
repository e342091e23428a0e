"""Security basics: nothing unpickles untrusted files, and a booby-trapped weights file is inert."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from headswap.backbones.loader import load_body
from headswap.config import BackboneConfig
from tests.helpers.workspace import REPO

UNSAFE = {
    "np.load with allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "pickle/joblib/dill load": re.compile(r"\b(pickle|cPickle|joblib|dill|cloudpickle)\.loads?\("),
    "yaml.load (not safe_load)": re.compile(r"\byaml\.load\("),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


def test_no_unsafe_deserialisation_in_the_code():
    offenders = []
    for path in [*REPO.glob("src/headswap/**/*.py"), *REPO.glob("flows/**/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for what, pattern in UNSAFE.items():
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {what}")
    assert offenders == []


class _Payload:
    """Unpickling this runs a command: what a malicious 'weights' file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_booby_trapped_weights_file_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pth"
    torch.save({"conv_stem.weight": _Payload(marker)}, weights)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported|global"):
        load_body(
            BackboneConfig(
                weights=str(weights),
                name="efficientnet_lite0",
                image_size=None,
                taps=["head"],
                pool="mean",
                ensemble=[],
            )
        )
    assert not marker.exists()
