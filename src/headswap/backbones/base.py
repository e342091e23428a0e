"""What every backbone family provides, and the weight-file helpers they share.

A family builds its architecture with random initialisation and then *must* load a weights file
from disk; a missing file is an error naming that file, never a silent fallback to random
weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from headswap.backbones.spec import Preprocessing
from headswap.errors import WeightsNotFoundError


class FamilyBuilder(ABC):
    """How one family (``headswap.backbones.registry.Family``) finds, builds and feeds a body.

    ``model`` is always the family's own name for the backbone (``Family.model``).
    """

    @abstractmethod
    def weights_location(self, model: str, weights: str | None) -> tuple[Path, str]:
        """(the weights file: ``weights`` if set, else the default; how to obtain it)."""

    @abstractmethod
    def architecture(self, model: str) -> tuple[nn.Module, list[str]]:
        """The randomly initialised classifier and the taps it offers."""

    @abstractmethod
    def trunk(self, model: str, module: nn.Module, taps: list[str]) -> nn.Module:
        """Wrap ``module`` (weights already loaded) so that it returns the maps of ``taps``."""

    @abstractmethod
    def preprocessing(
        self, model: str, image_size: int | None, module: nn.Module | None = None
    ) -> Preprocessing:
        """Input size, mean/std (0..255 units) and interpolation from the model's own config."""

    @abstractmethod
    def known(self, include_all: bool) -> list[str]:
        """Full backbone names of this family whose weights are on disk (all with include_all)."""

    def load_weights(self, name: str, module: nn.Module, path: Path) -> None:
        """Load every tensor strictly: a partial load would be random weights in disguise."""
        try:
            module.load_state_dict(read_state_dict(path), strict=True)
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0]
            raise WeightsNotFoundError(
                f"{path}: does not hold the weights of {name} ({first}). Set backbone.weights to "
                f"a state dict saved from {name} itself."
            ) from None


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Some checkpoints wrap the tensors: {"state_dict": {...}} or {"model": {...}}.
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            return state[wrapper]
    return state
