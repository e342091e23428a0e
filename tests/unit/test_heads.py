"""Heads: sklearn-equivalent logistic regression, determinism, no test leakage, calibration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from headswap.config import HeadConfig
from headswap.errors import ConfigError
from headswap.heads import load_head, predict_proba
from headswap.train import (
    choose_threshold,
    class_weights,
    fit_temperature,
    save_head,
    train_head,
)
from tests.helpers.synthetic import CLASSES, make_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def state(head) -> dict[str, np.ndarray]:
    return {name: tensor.numpy().copy() for name, tensor in head.state_dict().items()}


def test_logistic_head_matches_sklearn_with_the_same_C():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features = make_features(dim=8)
    x, names = features.select("train")
    y = (names == "defective").astype(int)
    scaled = StandardScaler().fit_transform(x[:, 0].astype(np.float64))
    reference = LogisticRegression(C=0.3, tol=1e-10, max_iter=10_000).fit(scaled, y)

    head, meta = train_head(features, CLASSES, HeadConfig(C=0.3, device="cpu"))

    assert meta.C == 0.3
    np.testing.assert_allclose(head.net.weight.detach().numpy()[0], reference.coef_[0], atol=2e-4)
    np.testing.assert_allclose(head.net.bias.detach().numpy(), reference.intercept_, atol=2e-4)


@pytest.mark.parametrize(
    "config",
    [
        HeadConfig(C="auto", device="cpu"),
        HeadConfig(type="mlp", hidden=16, max_iter=60, device="cpu"),
    ],
    ids=["logistic-C-auto", "mlp"],
)
def test_same_seed_gives_identical_heads_on_cpu(config):
    features = make_features(views=2)

    first, first_meta = train_head(features, CLASSES, config, "auto")
    second, second_meta = train_head(features, CLASSES, config, "auto")

    for name, value in state(first).items():
        np.testing.assert_array_equal(value, state(second)[name], err_msg=name)
    assert dataclasses.replace(first_meta, train_seconds=0) == dataclasses.replace(
        second_meta, train_seconds=0
    )


def test_a_different_seed_changes_the_mlp():
    features = make_features()
    config = HeadConfig(type="mlp", hidden=16, max_iter=20, device="cpu")
    first, _ = train_head(features, CLASSES, config)
    second, _ = train_head(features, CLASSES, config.model_copy(update={"seed": 1}))
    assert not np.array_equal(state(first)["net.0.weight"], state(second)["net.0.weight"])


def test_training_never_reads_the_test_split():
    """Scrambling every test embedding and label changes nothing: C, weights, T, threshold."""
    features = make_features(views=2)
    test = features.split == "test"
    rng = np.random.default_rng(9)
    scrambled = features.embeddings.copy()
    scrambled[test] = rng.normal(size=scrambled[test].shape) * 50
    labels = features.label.copy()
    labels[test] = labels[test][::-1]
    other = dataclasses.replace(features, embeddings=scrambled, label=labels)
    config = HeadConfig(C="auto", device="cpu")

    head, meta = train_head(features, CLASSES, config, "auto")
    head_other, meta_other = train_head(other, CLASSES, config, "auto")

    assert (meta.C, meta.temperature, meta.threshold) == (
        meta_other.C,
        meta_other.temperature,
        meta_other.threshold,
    )
    for name, value in state(head).items():
        np.testing.assert_array_equal(value, state(head_other)[name], err_msg=name)


def test_C_auto_picks_stronger_regularisation_when_features_are_mostly_noise():
    rng = np.random.default_rng(3)
    noisy = make_features(n=160, dim=4)
    noise = rng.normal(size=(160, 1, 200)).astype(np.float32)
    noisy = dataclasses.replace(noisy, embeddings=np.concatenate([noisy.embeddings, noise], axis=2))
    _, meta = train_head(noisy, CLASSES, HeadConfig(C="auto", device="cpu"))
    assert meta.C < 1.0


def test_saved_head_reloads_to_identical_probabilities(tmp_path):
    features = make_features(views=3)
    head, meta = train_head(
        features, CLASSES, HeadConfig(type="mlp", hidden=8, max_iter=30, device="cpu")
    )
    save_head(head, meta, tmp_path / "head.pt", tmp_path / "head.json")
    loaded, loaded_meta = load_head(tmp_path / "head.pt", tmp_path / "head.json")
    test_x, _ = features.select("test")
    np.testing.assert_array_equal(predict_proba(head, test_x), predict_proba(loaded, test_x))
    assert loaded_meta == meta


def test_balanced_class_weight_raises_minority_recall():
    features = make_features(n=400, positive_share=0.15, seed=4)
    test_x, names = features.select("test")
    positives = names == "defective"

    def recall(config: HeadConfig) -> float:
        head, meta = train_head(features, CLASSES, config, 0.5)
        return float((predict_proba(head, test_x)[positives, 1] >= 0.5).mean())

    assert recall(HeadConfig(class_weight="balanced", device="cpu", C=1.0)) > recall(
        HeadConfig(device="cpu", C=1.0)
    )


def test_class_weights_follow_sklearns_balanced_rule():
    weights = class_weights(np.array([0, 0, 0, 1]), 2, "balanced")
    np.testing.assert_allclose(weights, [4 / 6, 4 / 6, 4 / 6, 2.0])
    np.testing.assert_array_equal(class_weights(np.array([0, 1]), 2, "none"), [1.0, 1.0])


def test_mlp_stops_early_on_validation_loss():
    features = make_features(n=120)
    _, meta = train_head(
        features, CLASSES, HeadConfig(type="mlp", hidden=64, max_iter=2000, device="cpu")
    )
    assert meta.epochs < 2000


def test_temperature_scaling_lowers_validation_nll_of_an_overconfident_head():
    features = make_features()
    head, _ = train_head(features, CLASSES, HeadConfig(device="cpu", C=1.0))
    with torch.no_grad():
        head.net.weight.mul_(8.0)  # make it badly overconfident
    val_x, names = features.select("val")
    y = (names == "defective").astype(np.int64)

    def nll() -> float:
        p = predict_proba(head, val_x)[np.arange(len(y)), y]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())

    head.temperature.fill_(1.0)
    before = nll()
    temperature = fit_temperature(head, val_x, y)
    assert temperature > 2.0
    assert nll() < before


def test_threshold_auto_maximises_validation_accuracy():
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    threshold = choose_threshold(probabilities, labels)
    assert ((probabilities[:, 1] >= threshold) == labels).all()
    assert choose_threshold(np.array([[0.4, 0.6], [0.6, 0.4]]), np.array([1, 0])) == 0.5


def test_three_classes_use_softmax_and_no_threshold():
    features = make_features(n=150)
    rng = np.random.default_rng(0)
    names = np.array(["a", "b", "c"])[rng.integers(0, 3, 150)]
    three = dataclasses.replace(features, label=names)
    head, meta = train_head(three, ["a", "b", "c"], HeadConfig(device="cpu", C=1.0), "auto")
    probabilities = predict_proba(head, three.select("test")[0])
    assert meta.threshold is None
    assert probabilities.shape[1] == 3
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_C_auto_with_an_mlp_head_is_a_config_error():
    with pytest.raises(ConfigError, match="head.C"):
        train_head(make_features(), CLASSES, HeadConfig(type="mlp", C="auto", device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="head.device"):
        train_head(make_features(), CLASSES, HeadConfig(device="cuda", C=1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_head_trains_on_cuda_and_agrees_with_cpu():
    features = make_features(views=2)
    cpu_head, _ = train_head(features, CLASSES, HeadConfig(device="cpu", C=1.0))
    gpu_head, meta = train_head(features, CLASSES, HeadConfig(device="cuda", C=1.0))
    test_x, _ = features.select("test")
    assert meta.device == "cuda"
    np.testing.assert_allclose(
        predict_proba(cpu_head, test_x), predict_proba(gpu_head, test_x), atol=1e-3
    )
