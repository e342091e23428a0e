"""``timm/<model>``: any timm model, its intermediate stages by ``forward_intermediates``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from headswap.backbones.base import FamilyBuilder, torch_hub_checkpoints
from headswap.backbones.registry import TIMM
from headswap.backbones.spec import Preprocessing, scaled_preprocessing
from headswap.errors import ConfigError


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


def _pretrained_cfg(model: str):
    import timm

    if not timm.is_model(model):
        raise ConfigError(f"backbone.name: timm has no model '{model}' (see timm.list_models())")
    return timm.models.get_pretrained_cfg(model)


def timm_weights_file(model: str) -> Path:
    """The conventional place for a timm model's weights: the torch hub checkpoints folder."""
    return torch_hub_checkpoints() / "timm" / f"{model.replace('/', '_')}.safetensors"


def _hf_cached(model: str) -> Path | None:
    """A ``model.safetensors`` that timm itself downloaded into the Hugging Face hub cache."""
    pretrained = _pretrained_cfg(model)
    repo = getattr(pretrained, "hf_hub_id", None) if pretrained else None
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, "model.safetensors")
    return Path(found) if isinstance(found, str) else None


class TimmBuilder(FamilyBuilder):
    def weights_location(self, model: str, weights: str | None) -> tuple[Path, str]:
        hint = (
            f"on a machine with network access run timm.create_model('{model}', "
            "pretrained=True) and save its state_dict() with safetensors.torch.save_file"
        )
        if weights:
            return Path(weights), hint
        return (_hf_cached(model) or timm_weights_file(model)), hint

    def architecture(self, model: str) -> tuple[nn.Module, list[str]]:
        import timm

        classifier = timm.create_model(model, pretrained=False)
        stages = len(classifier.feature_info) if hasattr(classifier, "forward_intermediates") else 0
        return classifier, [*map(str, range(stages)), "head"]

    def trunk(self, model: str, module: nn.Module, taps: list[str]) -> nn.Module:
        module.reset_classifier(0)  # after a strict load, so no tensor of the file goes unused
        return TimmTaps(module)

    def preprocessing(
        self, model: str, image_size: int | None, module: nn.Module | None = None
    ) -> Preprocessing:
        import timm

        pretrained = _pretrained_cfg(model)
        config = timm.data.resolve_data_config(
            pretrained_cfg=pretrained.to_dict() if pretrained else None, model=module
        )
        size = image_size or config["input_size"][-1]
        interpolation = config.get("interpolation", "bilinear")
        return scaled_preprocessing(size, config["mean"], config["std"], interpolation)

    def known(self, include_all: bool) -> list[str]:
        """Every timm model whose weights are on disk: saved by hand, or in the HF hub cache."""
        timm_dir = torch_hub_checkpoints() / "timm"
        names = []
        if timm_dir.is_dir():
            names += sorted(f"{TIMM.prefix}{p.stem}" for p in timm_dir.glob("*.safetensors"))
        hf_root = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache/huggingface/hub"))
        for folder in sorted(hf_root.glob("models--timm--*")):
            name = TIMM.prefix + folder.name.removeprefix("models--timm--")
            if name not in names and list(folder.glob("snapshots/*/model.safetensors")):
                names.append(name)
        return names
