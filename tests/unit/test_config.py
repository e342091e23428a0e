"""params.yaml is one typed model: defaults load, and every mistake is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from headswap.config import (
    PROJECT_PARAMS,
    BodyConfig,
    HeadConfig,
    Params,
    load_params,
    parse_params,
)
from headswap.errors import ConfigError
from headswap.io import flatten

REPO = Path(__file__).resolve().parents[2]


def test_committed_params_yaml_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.split.test_size == 0.25
    assert params.registry.model_name == "elpv-defects"


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as error:
        parse_params({"head": {"Cc": 1.0}})
    message = str(error.value)
    assert "head.Cc" in message
    assert "allowed here: type, C, hidden" in message
    assert len(message.splitlines()) == 1


def test_unknown_key_in_an_ensemble_member_names_its_index():
    with pytest.raises(
        ConfigError, match=r"'backbone\.ensemble\.1\.size'.*allowed here: name, weights"
    ):
        parse_params({"backbone": {"ensemble": [{}, {"size": 300}]}})


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'heads'.*allowed here: data, backbone"):
        parse_params({"heads": {}})


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"head": {"C": -1}}, "head.C"),
        ({"head": {"type": "svm"}}, "head.type"),
        ({"data": {"split": {"test_size": 1.0}}}, "data.split.test_size"),
        ({"data": {"split": {"test_size": 0.6, "val_size": 0.5}}}, "data.split"),
        ({"features": {"views": "rot"}}, "features.views"),
        ({"backbone": {"taps": []}}, "backbone.taps"),
        ({"backbone": {"ensemble": [{"name": "resnet9000"}]}}, "backbone.ensemble.0.name"),
        ({"backbone": {"ensemble": [{"taps": [9]}]}}, "backbone.ensemble.0.taps"),
    ],
)
def test_invalid_values_name_their_key(raw, key):
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert f"'{key}" in str(error.value)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("head: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_params_flatten_to_dotted_keys():
    params = Params(head={"C": 1.0}, backbone={"taps": ["head"]})
    flat = flatten(params.model_dump(mode="json"))
    assert flat["head.C"] == 1.0
    assert flat["data.split.seed"] == 0
    assert flat["backbone.taps"] == ["head"]


def test_params_built_in_code_are_the_params_yaml_pipeline():
    """No defaults of its own: what a caller leaves out comes from the project's params.yaml."""
    assert PROJECT_PARAMS == REPO / "params.yaml"
    assert Params() == load_params(REPO / "params.yaml")
    assert Params().head.C == load_params(REPO / "params.yaml").head.C


def test_a_section_built_in_code_takes_the_rest_from_params_yaml():
    committed = load_params(REPO / "params.yaml")
    head = HeadConfig(C=0.5)
    assert head.C == 0.5
    assert head.model_dump(exclude={"C"}) == committed.head.model_dump(exclude={"C"})
    member = BodyConfig(name="efficientnet_lite0")
    assert member.taps == committed.backbone.taps and member.pool == committed.backbone.pool
