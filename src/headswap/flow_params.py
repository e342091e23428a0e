"""The typed parameters a person sets in the Prefect UI's run form.

Each field maps to one params.yaml key. Defaults come from params.yaml (``from_params``), so the
form shows what `dvc repro` would use. Validation is strict: an invalid value fails the run with
a message naming the field, and never falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from headswap.config import Params, Tap

# Flow field -> params.yaml key, as `dvc exp run -S key=value` would set it.
FIELD_TO_PARAM = {
    "backbone": "backbone.name",
    "taps": "backbone.taps",
    "views": "features.views",
    "head_type": "head.type",
    "C": "head.C",
    "class_weight": "head.class_weight",
    "split_seed": "data.split.seed",
    "auto_promote": "registry.auto_promote",
}


class TrainParameters(BaseModel):
    """Parameters of the `train` flow; each overrides one params.yaml key."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("efficientnet_lite0", description="backbone.name")
    taps: Annotated[list[Tap], Field(min_length=1)] = Field(["head"], description="backbone.taps")
    views: Literal["none", "flip", "d4"] = Field("none", description="features.views")
    head_type: Literal["logistic", "mlp"] = Field("logistic", description="head.type")
    C: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(1.0, description="head.C")
    class_weight: Literal["none", "balanced"] = Field("none", description="head.class_weight")
    split_seed: int = Field(0, description="data.split.seed")
    auto_promote: bool = Field(False, description="registry.auto_promote")

    @classmethod
    def from_params(cls, params: Params) -> TrainParameters:
        """The values params.yaml holds now: the defaults the UI form shows."""
        return cls(
            backbone=params.backbone.name, taps=list(params.backbone.taps),
            views=params.features.views, head_type=params.head.type, C=params.head.C,
            class_weight=params.head.class_weight, split_seed=params.data.split.seed,
            auto_promote=params.registry.auto_promote,
        )

    def overrides(self) -> dict[str, object]:
        """Dotted params.yaml keys and values, for ``workspace.apply_overrides``."""
        values = self.model_dump(mode="json")
        return {FIELD_TO_PARAM[field]: values[field] for field in FIELD_TO_PARAM}
