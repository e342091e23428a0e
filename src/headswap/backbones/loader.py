"""Resolve and build frozen bodies through the family that owns each backbone name.

``resolve_backbone`` finds the weights and preprocessing without building the network (enough
for the feature-cache key); ``load_body`` builds the frozen body, ensemble members included;
``describe_backbone`` and ``known_backbones`` serve ``headswap backbones``.

This module imports no pydantic model at run time (only for type checking), so GPU scripts
can use it on machines that have torch but not the whole pipeline's dependencies.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from headswap.backbones.base import FamilyBuilder
from headswap.backbones.body import Body, EnsembleBody, FrozenBody
from headswap.backbones.lite import LiteBuilder
from headswap.backbones.registry import LITE, TIMM, TORCHVISION, Family, family_of, unknown_backbone
from headswap.backbones.spec import BackboneInfo, BackboneSpec
from headswap.backbones.timm_models import TimmBuilder
from headswap.backbones.torchvision_models import TorchvisionBuilder
from headswap.errors import ConfigError, WeightsNotFoundError
from headswap.io import file_sha256

if TYPE_CHECKING:
    from headswap.config import BackboneConfig, BodyConfig, Tap

BUILDERS: dict[Family, FamilyBuilder] = {
    LITE: LiteBuilder(),
    TORCHVISION: TorchvisionBuilder(),
    TIMM: TimmBuilder(),
}


def family(name: str) -> tuple[FamilyBuilder, str, Family]:
    """(the builder of ``name``'s family, the family's own name for it, the family).

    Raises:
        ConfigError: unknown backbone name.
    """
    owner = family_of(name)
    if owner is None:
        raise ConfigError(
            f"backbone.name: {unknown_backbone(name, '; `headswap backbones` lists them')}"
        )
    return BUILDERS[owner], owner.model(name), owner


def weights_location(name: str, weights: str | None) -> tuple[Path, str]:
    """(the weights file for ``name``, how to obtain it): ``weights`` if set, else the default.

    Raises:
        ConfigError: unknown backbone name.
    """
    builder, model, _ = family(name)
    return builder.weights_location(model, weights)


def build_architecture(name: str) -> tuple[nn.Module, list[str]]:
    """The randomly initialised classifier for ``name`` and the taps it offers."""
    builder, model, _ = family(name)
    return builder.architecture(model)


def load_weights(name: str, module: nn.Module, path: Path) -> None:
    """Load the weights file of ``name`` into its classifier, every tensor strictly."""
    family(name)[0].load_weights(name, module, path)


@cache
def _sha256(path: Path) -> str:
    return file_sha256(path)


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
    builder, model, owner = family(config.name)
    path, hint = builder.weights_location(model, config.weights)
    _require_file(path, hint)
    prep = builder.preprocessing(model, config.image_size)
    license_ = owner.license or f"see {owner.key}"
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
    builder, model, _ = family(config.name)
    classifier, offered = builder.architecture(model)
    _check_taps(config.name, config.taps, offered)
    builder.load_weights(config.name, classifier, spec.weights_path)
    trunk = builder.trunk(model, classifier, [str(tap) for tap in config.taps])
    return FrozenBody(trunk, list(config.taps), config.pool, spec.preprocessing)


def _feature_dim(name: str, taps: list[Tap], pool: str, device: str) -> tuple[int | None, list]:
    """(feature size for ``taps``, or None where they are not offered; the taps offered)."""
    builder, model, _ = family(name)
    with torch.device(device):
        classifier, offered = builder.architecture(model)
        if not all(str(tap) in offered for tap in taps):
            return None, offered
        trunk = builder.trunk(model, classifier, [str(tap) for tap in taps])
        prep = builder.preprocessing(model, None, classifier)
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
    return [name for builder in BUILDERS.values() for name in builder.known(include_all)]
