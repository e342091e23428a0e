"""``torchvision/<model>``: every torchvision classifier, cut at its stages by torch.fx."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from headswap.backbones.base import FamilyBuilder, torch_hub_checkpoints
from headswap.backbones.registry import TORCHVISION
from headswap.backbones.spec import Preprocessing, scaled_preprocessing
from headswap.errors import ConfigError

# torchvision families whose stage outputs are not NCHW maps (tokens or NHWC): 'head' tap only.
_HEAD_ONLY = ("vit_", "swin_", "maxvit_")


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


def _weights_enum(model: str):
    import torchvision

    if model not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"backbone.name: torchvision has no classification model '{model}' "
            "(see `headswap backbones --all`)"
        )
    return torchvision.models.get_model_weights(model).DEFAULT


def _stage_nodes(model: str, module: nn.Module) -> list[str]:
    """Module names of the stages whose outputs are NCHW maps, shallow to deep."""
    if model.startswith(_HEAD_ONLY):
        return []
    for container in ("features", "trunk_output"):  # mobilenets/efficientnets/convnext; regnets
        stages = getattr(module, container, None)
        if isinstance(stages, nn.Sequential):
            return [f"{container}.{child}" for child, _ in stages.named_children()]
    return [layer for layer in ("layer1", "layer2", "layer3", "layer4") if hasattr(module, layer)]


def _head_node(module: nn.Module) -> str:
    """The node just before the classifier's global pooling: the last spatial feature map."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, nodes = get_graph_node_names(module.eval())
    pool_nodes = [n for n in nodes if "avgpool" in n or n.endswith("pool")]
    if not pool_nodes:
        raise ConfigError("backbone.name: cannot locate the global pooling layer of this model")
    return nodes[nodes.index(pool_nodes[-1]) - 1]


class TorchvisionBuilder(FamilyBuilder):
    def weights_location(self, model: str, weights: str | None) -> tuple[Path, str]:
        enum = _weights_enum(model)
        default = torch_hub_checkpoints() / Path(enum.url).name
        return (Path(weights) if weights else default), f"download {enum.url}"

    def architecture(self, model: str) -> tuple[nn.Module, list[str]]:
        import torchvision

        classifier = torchvision.models.get_model(model, weights=None)
        stages = _stage_nodes(model, classifier)
        return classifier, [*map(str, range(len(stages))), "head"]

    def trunk(self, model: str, module: nn.Module, taps: list[str]) -> nn.Module:
        stages = _stage_nodes(model, module)
        nodes = {tap: stages[int(tap)] for tap in taps if tap != "head"}
        if "head" in taps:
            head = _head_node(module)
            # A node inside the last stage is that stage's output: name it by the stage.
            nodes["head"] = stages[-1] if stages and head.startswith(f"{stages[-1]}.") else head
        return TorchvisionTaps(module, nodes)

    def preprocessing(
        self, model: str, image_size: int | None, module: nn.Module | None = None
    ) -> Preprocessing:
        transforms = _weights_enum(model).transforms()
        size = image_size or transforms.crop_size[0]
        interpolation = transforms.interpolation.value
        return scaled_preprocessing(size, transforms.mean, transforms.std, interpolation)

    def known(self, include_all: bool) -> list[str]:
        """Every classifier whose weights are in the torch hub cache (all with include_all)."""
        import torchvision

        checkpoints = torch_hub_checkpoints()
        return [
            f"{TORCHVISION.prefix}{model}"
            for model in torchvision.models.list_models(module=torchvision.models)
            if include_all
            or (
                checkpoints / Path(torchvision.models.get_model_weights(model).DEFAULT.url).name
            ).is_file()
        ]
