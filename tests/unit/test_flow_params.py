"""The train flow's typed parameters: empty means params.yaml at run time; set means an override."""

from __future__ import annotations

import pytest

from headswap.errors import ConfigError
from headswap.flow_params import FIELD_TO_PARAM, Backbone, TrainParameters, parse_train_parameters
from headswap.workspace import apply_overrides


def test_an_empty_form_overrides_nothing():
    assert parse_train_parameters({}).overrides() == {}
    assert TrainParameters().overrides() == {}


def test_only_the_fields_set_become_overrides():
    values = parse_train_parameters({"C": 0.5, "backbone": "torchvision/resnet50", "taps": [3]})
    assert values.backbone is Backbone.resnet50
    assert values.overrides() == {
        "head.C": 0.5,
        "backbone.name": "torchvision/resnet50",
        "backbone.taps": [3],
    }


def test_schema_fields_are_optional_and_say_what_empty_means():
    schema = TrainParameters.model_json_schema()
    assert not schema.get("required")
    assert set(schema["properties"]) == set(FIELD_TO_PARAM)
    for field in schema["properties"].values():
        assert field.get("default") is None
        assert field["description"].startswith("None: as in params.yaml")
    assert schema["$defs"]["Backbone"]["enum"][0] == "efficientnet_lite0"


def test_invalid_values_name_field_and_params_key():
    with pytest.raises(ConfigError) as error:
        parse_train_parameters({"C": -2, "backbone": "resnet-9000", "extra": 1})
    text = str(error.value)
    assert "invalid value for 'C' (head.C)" in text and "(got -2)" in text
    assert "invalid value for 'backbone' (backbone.name)" in text and "efficientnet_lite0" in text
    assert "unknown field 'extra'" in text


def test_overrides_land_on_the_file_as_it_is_now(tmp_path):
    """A person's edit made after the deployments were served survives a UI run."""
    params = tmp_path / "params.yaml"
    params.write_text(
        "head:\n  C: 0.01  # tuned by hand\n  type: logistic\ndata:\n  split:\n    seed: 4\n"
    )
    _, changes = apply_overrides(parse_train_parameters({}).overrides(), params)
    assert changes == [] and "tuned by hand" in params.read_text()

    _, changes = apply_overrides(parse_train_parameters({"head_type": "mlp"}).overrides(), params)
    text = params.read_text()
    assert [(c.key, c.old, c.new) for c in changes] == [("head.type", "logistic", "mlp")]
    assert "C: 0.01  # tuned by hand" in text and "seed: 4" in text and "type: mlp" in text


def test_a_bad_override_leaves_params_yaml_untouched(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("head:\n  C: 0.01\n")
    with pytest.raises(ConfigError):
        apply_overrides({"head.C": -1.0}, params)
    assert params.read_text() == "head:\n  C: 0.01\n"
