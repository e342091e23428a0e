"""The train flow's typed parameters: params.yaml defaults, strict validation, dvc -S overrides."""

from __future__ import annotations

import pytest

from headswap.config import Params, parse_params
from headswap.errors import ConfigError
from headswap.flow_params import (
    FIELD_TO_PARAM,
    Backbone,
    TrainParameters,
    parse_train_parameters,
)
from headswap.workspace import get_dotted


def _params(**sections) -> Params:
    return parse_params(sections)


def test_defaults_are_the_values_params_yaml_holds():
    params = _params(
        head={"type": "mlp", "C": "auto"},
        data={"split": {"seed": 7}},
        backbone={"name": "torchvision/resnet50", "taps": [3, "head"]},
    )
    values = TrainParameters.from_params(params)
    assert values.backbone is Backbone.resnet50
    assert (values.head_type, values.C, values.split_seed, values.taps) == (
        "mlp",
        "auto",
        7,
        [3, "head"],
    )


def test_overrides_round_trip_to_the_same_params():
    params = _params(head={"C": 0.3, "class_weight": "balanced"}, features={"views": "d4"})
    overrides = TrainParameters.from_params(params).overrides()
    dumped = params.model_dump(mode="json")
    assert set(overrides) == set(FIELD_TO_PARAM.values())
    assert all(get_dotted(dumped, key) == value for key, value in overrides.items())


def test_schema_has_no_defaults_and_offers_the_registered_backbones():
    schema = TrainParameters.model_json_schema()
    assert set(schema["required"]) == set(FIELD_TO_PARAM)
    assert all("default" not in field for field in schema["properties"].values())
    assert schema["$defs"]["Backbone"]["enum"][0] == "efficientnet_lite0"


def test_a_missing_field_is_an_error_not_a_default():
    with pytest.raises(ConfigError, match=r"'views' \(features.views\) is required"):
        parse_train_parameters(_without("views"))


def test_invalid_values_name_field_and_params_key():
    with pytest.raises(ConfigError) as error:
        parse_train_parameters({**_valid(), "C": -2, "backbone": "resnet-9000", "extra": 1})
    text = str(error.value)
    assert "invalid value for 'C' (head.C)" in text and "(got -2)" in text
    assert "invalid value for 'backbone' (backbone.name)" in text and "efficientnet_lite0" in text
    assert "unknown field 'extra'" in text


def test_params_yaml_value_the_form_cannot_offer_is_refused():
    params = _params(backbone={"name": "timm/convnext_nano", "weights": "w.safetensors"})
    with pytest.raises(ConfigError, match="params.yaml .*'backbone' .*timm/convnext_nano"):
        TrainParameters.from_params(params)


def _valid() -> dict:
    return TrainParameters.from_params(Params()).model_dump(mode="json")


def _without(field: str) -> dict:
    return {key: value for key, value in _valid().items() if key != field}
