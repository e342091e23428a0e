"""Synthetic feature sets for the head, evaluation and learning-curve unit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headswap.feature_set import FeatureSet

CLASSES = ["functional", "defective"]


def make_features(
    n: int = 240, dim: int = 12, views: int = 1, seed: int = 0, positive_share: float = 0.35
) -> FeatureSet:
    """Two overlapping Gaussian classes; views are small perturbations of each image's vector."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_share).astype(int)
    centre = rng.normal(size=(n, dim)) + labels[:, None] * np.linspace(1.2, 0.0, dim)
    embeddings = centre[:, None, :] + 0.1 * rng.normal(size=(n, views, dim))
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    return FeatureSet(
        embeddings=embeddings.astype(np.float32),
        sha256=np.array([f"{i:064x}" for i in range(n)]),
        path=np.array([f"{CLASSES[y]}/img{i}.png" for i, y in enumerate(labels)]),
        label=np.array([CLASSES[y] for y in labels]),
        split=split,
    )


def brightness_onnx(path: Path, metadata: dict[str, str], slope: float, cut: float) -> Path:
    """A real ONNX classifier with headswap's interface, on mean brightness.

    Float32 NCHW ``pixels`` of any size in, ``probabilities`` [N, 2] and ``label`` [N] out: the
    second class's probability rises with the mean brightness (0..1) past ``cut``, faster for a
    larger ``slope``. ``metadata`` is written as the model's ``headswap.*`` properties as given.
    """
    import onnx
    from onnx import TensorProto, helper

    tensors = [
        helper.make_tensor("W", TensorProto.FLOAT, [1, 2], [0.0, slope]),
        helper.make_tensor("B", TensorProto.FLOAT, [2], [0.0, -slope * cut]),
        helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0]),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape"], ["mean"]),
        helper.make_node("Div", ["mean", "scale"], ["x"]),
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("Add", ["z", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, "h", "w"])
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 2]),
        helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [pixels], outputs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
