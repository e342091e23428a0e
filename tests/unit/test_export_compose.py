"""The export composes the deployable model around the body the features stage exported.

Composed or traced, the model must be the same: same input and outputs, same numbers on whole and
on fractional pixels, at several batch sizes (the composed graph stacks views on the batch axis).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from headswap.backbones.loader import load_body
from headswap.config import BackboneConfig
from headswap.engine import export_body
from headswap.export import DeployableModel, _export, float_input_body
from headswap.heads import Head
from headswap.onnx_session import open_session

# Small, but with what the default has: an ensemble member resized in the graph, and views.
SIZE = 64
BACKBONE = BackboneConfig(
    name="efficientnet_lite0",
    image_size=SIZE,
    taps=[3, "head"],
    pool="meanmax",
    ensemble=[{"name": "efficientnet_lite0", "image_size": 80, "taps": ["head"], "pool": "mean"}],
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path of the composed model, path of the traced one)."""
    tmp = tmp_path_factory.mktemp("export")
    body, _ = load_body(BACKBONE)
    cached = export_body(body, SIZE, tmp / "body.onnx")  # what the features stage caches
    dim = body(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)).shape[1]
    torch.manual_seed(0)
    head = Head(dim, 2)
    head.temperature.fill_(1.3)
    model = DeployableModel(body, head, "flip", threshold=0.4).eval()
    metadata = {"headswap.views": "flip"}
    _export(model, SIZE, 17, tmp / "composed.onnx", metadata, cached_body=cached)
    _export(model, SIZE, 17, tmp / "traced.onnx", metadata)
    return model, tmp / "composed.onnx", tmp / "traced.onnx"


def _io(path) -> list:
    graph = onnx.load(str(path)).graph
    return [
        (
            v.name,
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in (*graph.input, *graph.output)
    ]


def test_composed_model_has_the_traced_models_interface_and_metadata(exported):
    _, composed, traced = exported
    assert _io(composed) == _io(traced)
    assert _io(composed)[0] == ("pixels", onnx.TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    props = {p.key: p.value for p in onnx.load(str(composed)).metadata_props}
    assert props == {"headswap.views": "flip"}


@pytest.mark.parametrize("batch", [1, 3])
def test_composed_model_gives_the_traced_models_numbers(exported, batch):
    model, composed, traced = exported
    rng = np.random.default_rng(batch)
    whole = rng.integers(0, 256, (batch, 3, SIZE, SIZE)).astype(np.float32)
    fractional = whole + rng.uniform(0, 1, whole.shape).astype(np.float32)
    new, old = open_session(composed), open_session(traced)
    for pixels in (whole, fractional):
        (p_new, l_new), (p_old, l_old) = (
            new.run(None, {"pixels": pixels}),
            old.run(None, {"pixels": pixels}),
        )
        assert np.abs(p_new - p_old).max() <= 1e-6 and (l_new == l_old).all()
        with torch.no_grad():
            expected, _ = model(torch.from_numpy(pixels))
        assert np.abs(p_new - expected.numpy()).max() <= 1e-4


def test_a_body_that_does_not_start_with_a_cast_is_refused(tmp_path):
    source = onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.UINT8, ["batch", 3])
    out = onnx.helper.make_tensor_value_info("features", onnx.TensorProto.UINT8, ["batch", 3])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["pixels"], ["features"])], "g", [source], [out]
    )
    path = tmp_path / "body.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="not a Cast to float"):
        float_input_body(path)  # export_onnx then traces the whole model instead
