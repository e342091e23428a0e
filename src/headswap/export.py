"""The export stage: body + views + head + calibration as one ONNX model, checked against torch.

The model takes raw pixels (float32 NCHW, 0..255, resized as its metadata says) and returns
``probabilities`` [N, K] and ``label`` [N]. It averages over the same views the evaluate stage
averaged over, and applies the same temperature and threshold, so it predicts what was reported.

When the features stage has exported the body to ONNX (its cache, ``engine.export_body``), the
model is composed around that graph and only the views and the head are traced; otherwise the
whole model is traced. Either way it is checked against torch before it is kept.
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
from headswap.engine import body_onnx_path, torch_to_onnx
from headswap.errors import ParityError
from headswap.feature_cache import cache_root
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
        return self.classify(self.body(self.stack_views(pixels)))

    def stack_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [V*N, 3, H, W]: every view of the batch, view by view."""
        return torch.cat([apply_view(pixels, t, f) for t, f in self.views], dim=0)

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the stacked views -> view-averaged probabilities and labels."""
        probabilities = self.head(features)
        n_classes = probabilities.shape[1]
        probabilities = probabilities.reshape(len(self.views), -1, n_classes).mean(dim=0)
        if self.threshold is not None and self.head.n_classes == 2:
            label = (probabilities[:, 1] >= self.threshold).to(torch.int64)
        else:
            label = probabilities.argmax(dim=1)
        return probabilities, label


class _Part(nn.Module):
    """One method of a DeployableModel as a module of its own, to export it alone."""

    def __init__(self, model: DeployableModel, method: str):
        super().__init__()
        self.model, self.method = model, method  # a submodule: its weights stay parameters

    def forward(self, tensor: torch.Tensor):
        return getattr(self.model, self.method)(tensor)


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


def _export(
    model: DeployableModel,
    size: int,
    opset: int,
    target: Path,
    metadata: dict,
    cached_body: Path | None = None,
) -> None:
    """Write the deployable model: composed around ``cached_body`` when given, else traced."""
    with atomic_path(target) as tmp:
        if cached_body is not None:
            onnx.save(compose_with_body(model, cached_body, size, opset), str(tmp))
        else:
            fix_same_padding(model.body, size)  # the graph the features stage ran
            example = torch.zeros(2, 3, size, size)
            torch_to_onnx(model, example, tmp, ["probabilities", "label"], opset)
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))


# The symbolic size of the stacked-views axis inside a composed model: V x the input's batch,
# so it must not share the name "batch" (ONNX Runtime may treat equal names as equal sizes).
STACKED = "views_x_batch"


def float_input_body(body_path: Path) -> onnx.ModelProto:
    """The features stage's cached body (uint8 ``pixels`` in), taking float32 pixels instead.

    The body's first op on its input is a Cast to float (``FrozenBody.forward``, and
    ``pixels.float()`` before an ensemble member's resize): on float input each becomes an
    Identity, which is what tracing the body with float input gives.
    """
    proto = onnx.load(str(body_path))
    (source,) = proto.graph.input
    for node in proto.graph.node:
        if source.name not in node.input:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or to != onnx.TensorProto.FLOAT:
            raise ValueError(f"cached body feeds its input to {node.op_type}, not a Cast to float")
        node.op_type = "Identity"
        del node.attribute[:]
    source.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for value in (source, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = STACKED
    return proto


def compose_with_body(model: DeployableModel, body_path: Path, size: int, opset: int):
    """The deployable ONNX graph, built around the body the features stage already exported.

    Only the views (flips, turns) and the head are traced, both tiny; the body's graph is the
    cached one with float input (``float_input_body``), so the two large trunks are not traced
    again. Same input and outputs as the traced model; the parity check runs on it as on that.
    """
    import tempfile

    from onnx import compose

    body = float_input_body(body_path)
    if body.opset_import[0].version != opset:
        raise ValueError(f"cached body has opset {body.opset_import[0].version}, not {opset}")
    dim = body.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    views = len(model.views)
    with tempfile.TemporaryDirectory() as tmp:
        front, back = Path(tmp) / "views.onnx", Path(tmp) / "head.onnx"
        example = torch.zeros(2, 3, size, size)
        torch_to_onnx(_Part(model, "stack_views"), example, front, ["stacked"], opset)
        features = torch.zeros(2 * views, dim)
        torch_to_onnx(_Part(model, "classify"), features, back, ["probabilities", "label"], opset)
        front_proto, back_proto = onnx.load(str(front)), onnx.load(str(back))
    front_proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = STACKED
    back_proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = STACKED
    for part in (front_proto, back_proto):
        part.ir_version = body.ir_version
    front_proto = compose.add_prefix(front_proto, "views/", rename_inputs=False)
    body = compose.add_prefix(body, "body/")
    back_proto = compose.add_prefix(back_proto, "head/", rename_outputs=False)
    joined = compose.merge_models(front_proto, body, io_map=[("views/stacked", "body/pixels")])
    (head_input,) = back_proto.graph.input
    model_proto = compose.merge_models(
        joined, back_proto, io_map=[("body/features", head_input.name)]
    )
    # merge_models lists each part's opset import: keep one per (domain, version), as traced.
    imports = {(entry.domain, entry.version): entry for entry in model_proto.opset_import}
    del model_proto.opset_import[:]
    model_proto.opset_import.extend(imports.values())
    return model_proto


def cached_body(spec: BackboneSpec, backbone: BackboneConfig, features: FeaturesConfig):
    """The body ONNX the features stage exported for this configuration, or None."""
    path = body_onnx_path(cache_root(features.cache_dir), spec, backbone)
    return path if path.is_file() else None


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
    """Max |torch - onnxruntime| over the probabilities at each parity batch size.

    ONNX Runtime runs each batch size (the exported graph's batch axis is what is checked);
    torch runs once, on the largest batch, and each ONNX batch is compared with torch's rows for
    the same images: a second eager forward at batch 1 cost about 40% of the check's CPU.
    """
    session = open_session(onnx_path)
    with torch.no_grad():
        expected, expected_label = model(torch.from_numpy(pixels[: max(PARITY_BATCH_SIZES)]))
    report = {}
    for size in PARITY_BATCH_SIZES:
        got, got_label = session.run(None, {"pixels": pixels[:size]})
        report[f"batch_{size}"] = {
            "max_abs_diff": float(np.abs(got - expected[:size].numpy()).max()),
            "labels_equal": bool((got_label == expected_label[:size].numpy()).all()),
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
    metadata = model_metadata(spec, meta, features)
    size = spec.preprocessing.size
    cached = cached_body(spec, backbone, features)
    try:
        _export(model, size, config.opset, staged, metadata, cached)
    except (ValueError, onnx.checker.ValidationError):
        if cached is None:
            raise
        _export(model, size, config.opset, staged, metadata)  # trace it, as without a cache
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
