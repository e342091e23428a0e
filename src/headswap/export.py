"""The export stage: body + views + head + calibration as one ONNX model, checked against torch.

The model takes raw pixels (float32 NCHW, 0..255, resized as its metadata says) and returns
``probabilities`` [N, K] and ``label`` [N]. It averages over the same views the evaluate stage
averaged over, and applies the same temperature and threshold, so it predicts what was reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from headswap.backbones.body import Body, fix_same_padding
from headswap.backbones.loader import load_body
from headswap.backbones.spec import BackboneSpec
from headswap.config import BackboneConfig, ExportConfig, FeaturesConfig
from headswap.engine import torch_to_onnx
from headswap.errors import ParityError
from headswap.heads import Head, HeadMeta
from headswap.imaging import load_model_input
from headswap.io import atomic_path, atomic_write_text, read_csv
from headswap.onnx_session import open_session
from headswap.views import apply_view, view_transforms

PARITY_BATCH_SIZES = (1, 3)


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    parity_path: Path
    max_abs_diff: float


class DeployableModel(nn.Module):
    """pixels -> (view-averaged calibrated probabilities, predicted class index)."""

    def __init__(self, body: Body, head: Head, views: str, threshold: float | None):
        super().__init__()
        self.body, self.head = body, head.float().eval()
        self.views = view_transforms(views)
        self.threshold = threshold

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pixels.shape[0]
        stacked = torch.cat([apply_view(pixels, t, f) for t, f in self.views], dim=0)
        probabilities = self.head(self.body(stacked))
        probabilities = probabilities.reshape(len(self.views), batch, -1).mean(dim=0)
        if self.threshold is not None and self.head.n_classes == 2:
            label = (probabilities[:, 1] >= self.threshold).to(torch.int64)
        else:
            label = probabilities.argmax(dim=1)
        return probabilities, label


def model_metadata(spec: BackboneSpec, meta: HeadMeta, features: FeaturesConfig) -> dict[str, str]:
    """What a consumer needs to feed the model, stored in the ONNX file's metadata_props."""
    prep = spec.preprocessing
    return {
        "headswap.classes": json.dumps(meta.classes),
        "headswap.image_size": str(prep.size),
        "headswap.interpolation": prep.interpolation,
        "headswap.input": "float32 NCHW RGB pixels in 0..255, resized to image_size",
        "headswap.backbone": spec.describe(),
        "headswap.weights_sha256": spec.weights_sha256,
        "headswap.views": features.views,
        "headswap.temperature": repr(meta.temperature),
        "headswap.threshold": repr(meta.threshold),
    }


def _export(model: DeployableModel, size: int, opset: int, target: Path, metadata: dict) -> None:
    fix_same_padding(model.body, size)  # the graph the features stage ran (engine.export_body)
    example = torch.zeros(2, 3, size, size)
    with atomic_path(target) as tmp:
        torch_to_onnx(model, example, tmp, ["probabilities", "label"], opset)
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))


def _parity_inputs(
    predictions_csv: Path, raw_dir: Path, spec: BackboneSpec
) -> tuple[list[str], np.ndarray]:
    rows = read_csv(predictions_csv)[: max(PARITY_BATCH_SIZES)]  # paths restored, not defused
    prep = spec.preprocessing
    pixels = np.stack(
        [load_model_input(raw_dir / r["path"], prep.size, prep.interpolation) for r in rows]
    )
    return [r["path"] for r in rows], pixels


def check_parity(model: DeployableModel, onnx_path: Path, pixels: np.ndarray) -> dict:
    """Max |torch - onnxruntime| over the probabilities at each parity batch size."""
    session = open_session(onnx_path)
    report = {}
    for size in PARITY_BATCH_SIZES:
        batch = pixels[:size]
        with torch.no_grad():
            expected, expected_label = model(torch.from_numpy(batch))
        got, got_label = session.run(None, {"pixels": batch})
        report[f"batch_{size}"] = {
            "max_abs_diff": float(np.abs(got - expected.numpy()).max()),
            "labels_equal": bool((got_label == expected_label.numpy()).all()),
        }
    return report


def export_onnx(
    backbone: BackboneConfig,
    features: FeaturesConfig,
    config: ExportConfig,
    head: Head,
    meta: HeadMeta,
    predictions_csv: Path,
    raw_dir: Path,
    model_path: Path,
    parity_path: Path,
) -> ExportResult:
    """Export and verify; raises ParityError (and keeps no model file) if ONNX disagrees."""
    body, spec = load_body(backbone)
    model = DeployableModel(body, head, features.views, meta.threshold).eval()
    staged = model_path.with_name(model_path.name + ".unverified")
    _export(
        model, spec.preprocessing.size, config.opset, staged, model_metadata(spec, meta, features)
    )
    paths, pixels = _parity_inputs(predictions_csv, raw_dir, spec)
    report = check_parity(model, staged, pixels)
    worst = max(entry["max_abs_diff"] for entry in report.values())
    passed = worst <= config.parity_atol and all(e["labels_equal"] for e in report.values())
    report.update(images=paths, atol=config.parity_atol, max_abs_diff=worst, passed=passed)
    atomic_write_text(parity_path, json.dumps(report, indent=2))
    if not passed:
        staged.unlink(missing_ok=True)
        raise ParityError(
            f"ONNX export disagrees with torch (max |diff| {worst:.2e} > export.parity_atol "
            f"{config.parity_atol:.0e}); see {parity_path}. No model was written."
        )
    staged.replace(model_path)
    return ExportResult(model_path, parity_path, worst)
