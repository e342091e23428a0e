"""benchmarks/gpu_check.py runs end to end (on CPU here; the lead runs it once on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from headswap.backbones.loader import weights_location
from tests.helpers.workspace import REPO


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("defective", "functional"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(8):
            pixels = rng.integers(0, 256, (60, 60), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / "images" / label / f"{index}.png")
    out = tmp_path / "gpu.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_check.py"),
        "--device",
        "cpu",
        "--images",
        str(tmp_path / "images"),
        "--weights",
        str(weights_location("efficientnet_lite0", None)[0]),
        "--out",
        str(out),
        "--batch",
        "4",
        "--workers",
        "1",
        "--repeats",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images"] == 16
    assert report["raw_forward_img_s"] > 0 and report["pipeline_img_s"] > 0
    assert report["head"]["device"] == "cpu" and 0 <= report["head"]["test_accuracy"] <= 1
