"""The typed parameters a person sets in the Prefect UI's run form.

Each field maps to one params.yaml key. The model has no defaults of its own: the values the form
shows are the deployment's parameters, read from params.yaml when the deployments are served
(``from_params``). A field the caller leaves out is therefore an error, never a silent fallback to
a class default (Prefect issues #16184, #9018, #12566), and an invalid value fails the run with a
message naming the field.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headswap.config import Params, Tap
from headswap.errors import ConfigError


class Backbone(StrEnum):
    """Frozen bodies the UI offers (torchvision weights load from the torch hub cache)."""

    efficientnet_lite0 = "efficientnet_lite0"
    efficientnet_lite1 = "efficientnet_lite1"
    efficientnet_lite2 = "efficientnet_lite2"
    resnet18 = "torchvision/resnet18"
    resnet50 = "torchvision/resnet50"
    efficientnet_b0 = "torchvision/efficientnet_b0"
    mobilenet_v3_large = "torchvision/mobilenet_v3_large"
    convnext_tiny = "torchvision/convnext_tiny"


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
    """Each field overrides one params.yaml key (None: run params.yaml exactly as it is)."""

    model_config = ConfigDict(extra="forbid", title="Train parameters")

    backbone: Backbone = Field(
        description="Main frozen body (backbone.name); any backbone.ensemble members in "
        "params.yaml are kept and concatenated after it"
    )
    taps: Annotated[list[Tap], Field(min_length=1)] = Field(
        description="Depths to pool features from: block indices and/or 'head' (backbone.taps)"
    )
    views: Literal["none", "flip", "d4"] = Field(
        description="Flip/rotation views embedded per image (features.views)"
    )
    head_type: Literal["logistic", "mlp"] = Field(description="Trained head (head.type)")
    C: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        description="Inverse L2 strength, or 'auto' to cross-validate (head.C)"
    )
    class_weight: Literal["none", "balanced"] = Field(description="head.class_weight")
    split_seed: int = Field(description="Seed of the train/val/test split (data.split.seed)")
    auto_promote: bool = Field(
        description="Promote to champion if the gate passes (registry.auto_promote)"
    )

    @classmethod
    def from_params(cls, params: Params) -> TrainParameters:
        """The values params.yaml holds now: the defaults the UI form shows.

        Raises:
            ConfigError: params.yaml holds a value the form cannot offer (e.g. a backbone that
                is not in ``Backbone``); the message says which key and what is allowed.
        """
        values = {
            "backbone": params.backbone.name,
            "taps": list(params.backbone.taps),
            "views": params.features.views,
            "head_type": params.head.type,
            "C": params.head.C,
            "class_weight": params.head.class_weight,
            "split_seed": params.data.split.seed,
            "auto_promote": params.registry.auto_promote,
        }
        return parse_train_parameters(values, source="params.yaml (as train-flow defaults)")

    def overrides(self) -> dict[str, object]:
        """Dotted params.yaml keys and values, for ``workspace.apply_overrides``."""
        values = self.model_dump(mode="json")
        return {FIELD_TO_PARAM[field]: values[field] for field in FIELD_TO_PARAM}


def parse_train_parameters(values: object, source: str = "train parameters") -> TrainParameters:
    """Validate raw form/API values, raising ConfigError with one line per bad field."""
    if isinstance(values, TrainParameters):
        return values
    try:
        return TrainParameters.model_validate(values)
    except ValidationError as error:
        raise ConfigError("\n".join(_describe(item, source) for item in error.errors())) from None


def _describe(item: dict, source: str) -> str:
    """One readable line per pydantic error, naming the field and its params.yaml key."""
    field = str(item["loc"][0]) if item["loc"] else "(top level)"
    where = f"'{field}' ({FIELD_TO_PARAM[field]})" if field in FIELD_TO_PARAM else f"'{field}'"
    if item["type"] == "extra_forbidden":
        return f"{source}: unknown field {where} (allowed: {', '.join(FIELD_TO_PARAM)})"
    if item["type"] == "missing":
        return f"{source}: field {where} is required (no silent default)"
    got = item.get("input")
    return f"{source}: invalid value for {where}: {item['msg']} (got {got!r})"
