"""The typed parameters a person sets in the Prefect UI's run form.

Each field overrides one params.yaml key. Every field is None by default, and None means "as
params.yaml holds it when the run starts": the form never carries a copy of params.yaml taken when
the deployments were served, so a default run (or the nightly schedule) can never write an old
value back over a person's later edit. An invalid value fails the run with a message naming the
field and its params.yaml key.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headswap.config import Tap
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


AS_IN_PARAMS = "None: as in params.yaml when the run starts. "


class TrainParameters(BaseModel):
    """Each field overrides one params.yaml key; a field left None keeps params.yaml's value."""

    model_config = ConfigDict(extra="forbid", title="Train parameters")

    backbone: Backbone | None = Field(
        None,
        description=AS_IN_PARAMS + "Main frozen body (backbone.name); any backbone.ensemble "
        "members in params.yaml are kept and concatenated after it",
    )
    taps: Annotated[list[Tap], Field(min_length=1)] | None = Field(
        None,
        description=AS_IN_PARAMS
        + "Depths to pool features from: block indices and/or 'head' (backbone.taps)",
    )
    views: Literal["none", "flip", "d4"] | None = Field(
        None, description=AS_IN_PARAMS + "Flip/rotation views embedded per image (features.views)"
    )
    head_type: Literal["logistic", "mlp"] | None = Field(
        None, description=AS_IN_PARAMS + "Trained head (head.type)"
    )
    C: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        None,
        description=AS_IN_PARAMS + "Inverse L2 strength, or 'auto' to cross-validate (head.C)",
    )
    class_weight: Literal["none", "balanced"] | None = Field(
        None, description=AS_IN_PARAMS + "head.class_weight"
    )
    split_seed: int | None = Field(
        None, description=AS_IN_PARAMS + "Seed of the train/val/test split (data.split.seed)"
    )
    auto_promote: bool | None = Field(
        None,
        description=AS_IN_PARAMS + "Promote to champion if the gate passes (registry.auto_promote)",
    )

    def overrides(self) -> dict[str, object]:
        """Dotted params.yaml keys and values of the fields that were set."""
        values = self.model_dump(mode="json", exclude_none=True)
        return {FIELD_TO_PARAM[field]: value for field, value in values.items()}


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
    got = item.get("input")
    return f"{source}: invalid value for {where}: {item['msg']} (got {got!r})"
