"""Backbone registry: real torchvision/timm architectures loaded from weights files on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from headswap.backbones.loader import describe_backbone, load_body
from headswap.config import BackboneConfig
from headswap.errors import ConfigError, WeightsNotFoundError
from headswap.imaging import load_model_input, load_pixels, open_rgb


def single_body(name: str, **keys) -> BackboneConfig:
    """One body at its own input size, its head tap mean-pooled, without the project's ensemble
    (params.yaml fills in the keys a config leaves out)."""
    defaults = {"image_size": None, "taps": ["head"], "pool": "mean", "ensemble": []}
    return BackboneConfig(**{"name": name, **defaults, **keys})


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """Random-init resnet18 weights saved to a file: exercises the file-loading path only."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_torchvision_multi_depth_taps_match_the_model_itself(resnet18_weights):
    path, reference = resnet18_weights
    config = single_body("torchvision/resnet18", weights=str(path), taps=[1, "head"], image_size=64)
    body, spec = load_body(config)
    assert spec.preprocessing.size == 64
    assert spec.preprocessing.interpolation == "bilinear"
    assert spec.preprocessing.mean == pytest.approx((0.485 * 255, 0.456 * 255, 0.406 * 255))
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    features = body(pixels)
    assert features.shape == (2, 128 + 512)  # layer2 (tap 1) + layer4 ('head'), mean-pooled
    x = (pixels.float() - body.mean) / body.std
    with torch.no_grad():
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        layer2 = reference.layer2(reference.layer1(stem))
        layer4 = reference.layer4(reference.layer3(layer2))
    torch.testing.assert_close(features[:, :128], layer2.mean(dim=(2, 3)))
    torch.testing.assert_close(features[:, 128:], layer4.mean(dim=(2, 3)))


def test_listing_reports_the_same_dim_as_the_loaded_body(resnet18_weights):
    path, _ = resnet18_weights
    info = describe_backbone("torchvision/resnet18", [0, 3, "head"], "meanmax", str(path))
    config = single_body(
        "torchvision/resnet18",
        weights=str(path),
        taps=[0, 3, "head"],
        pool="meanmax",
        image_size=64,
    )
    body, _ = load_body(config)
    assert info.taps == ["0", "1", "2", "3", "head"]
    assert info.weights_present and info.weights_path == path
    assert info.dim == body(torch.zeros(1, 3, 64, 64)).shape[1] == 2 * (64 + 512 + 512)


def test_missing_default_weights_name_the_exact_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as error:
        load_body(single_body("torchvision/mobilenet_v3_small"))
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert str(expected) in str(error.value)
    assert "never falls back to random weights" in str(error.value)
    info = describe_backbone("torchvision/mobilenet_v3_small", ["head"], "mean")
    assert not info.weights_present and info.weights_path == expected


def test_missing_configured_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        load_body(single_body("torchvision/resnet18", weights=str(missing)))


def test_weights_of_another_model_are_refused(resnet18_weights):
    path, _ = resnet18_weights
    with pytest.raises(WeightsNotFoundError, match="does not hold the weights"):
        load_body(single_body("torchvision/mobilenet_v3_small", weights=str(path)))


def test_timm_taps_and_preprocessing_from_its_config(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file(model.state_dict(), str(path))
    body, spec = load_body(
        single_body("timm/resnet18", weights=str(path), taps=[2, "head"], image_size=64)
    )
    assert spec.preprocessing.std == pytest.approx((0.229 * 255, 0.224 * 255, 0.225 * 255))
    assert body(torch.zeros(3, 3, 64, 64)).shape == (3, 128 + 512)  # feature_info[2] = layer2


def test_unknown_names_and_taps_are_config_errors(resnet18_weights):
    path, _ = resnet18_weights
    with pytest.raises(ConfigError, match="torchvision has no classification model"):
        load_body(
            BackboneConfig(
                name="torchvision/not_a_model",
                image_size=None,
                taps=["head"],
                pool="mean",
                ensemble=[],
            )
        )
    with pytest.raises(ConfigError, match="timm has no model"):
        load_body(
            BackboneConfig(
                name="timm/not_a_model", image_size=None, taps=["head"], pool="mean", ensemble=[]
            )
        )
    with pytest.raises(ConfigError, match=r"\[7\] not offered"):
        load_body(
            BackboneConfig(
                name="torchvision/resnet18",
                weights=str(path),
                taps=[7],
                image_size=None,
                pool="mean",
                ensemble=[],
            )
        )


def test_bundled_lite0_offers_every_block():
    info = describe_backbone("efficientnet_lite0", [3, 4, 5, 6, "head"], "mean")
    assert info.weights_present
    assert info.dim == 80 + 112 + 192 + 320 + 1280


@pytest.mark.parametrize(
    ("name", "size"),
    [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)],
)
def test_bundled_bodies_carry_real_imagenet_weights(name, size):
    """Each bundled body, loaded offline from its package, recognises a real photo.

    matplotlib ships Grace Hopper's portrait; ImageNet class 652 is 'military uniform'. Random
    or misaligned weights would not put it first.
    """
    from matplotlib import cbook

    from headswap.backbones.lite import BUNDLED_BODIES
    from headswap.backbones.loader import build_architecture, load_weights, resolve_backbone

    spec = resolve_backbone(
        BackboneConfig(name=name, image_size=None, taps=["head"], pool="mean", ensemble=[])
    )
    assert spec.preprocessing.size == size and BUNDLED_BODIES[name].native_size == size
    classifier, _ = build_architecture(name)
    load_weights(name, classifier, spec.weights_path)
    photo = (
        Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((size, size))
    )
    pixels = torch.from_numpy(np.asarray(photo, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        logits = classifier.eval()((pixels - 127.0) / 128.0)
    assert int(logits.argmax()) == 652


def test_config_and_registry_agree_on_the_bundled_bodies():
    from headswap.backbones.lite import BUNDLED_BODIES
    from headswap.backbones.registry import LITE

    assert tuple(BUNDLED_BODIES) == LITE.names


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_uint8_decoding_equals_the_shared_float_decoder(tmp_path, mode):
    rng = np.random.default_rng(0)
    shape = (90, 70) if mode == "L" else (90, 70, 3)
    path = tmp_path / f"image_{mode}.png"
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    for interpolation in ("bilinear", "bicubic"):
        fast = load_pixels(path, 48, interpolation)
        assert fast.dtype == np.uint8 and fast.shape == (3, 48, 48)
        np.testing.assert_array_equal(
            fast.astype(np.float32), load_model_input(path, 48, interpolation)
        )
        # The greyscale fast path gives the pixels of resizing the full RGB decode.
        resample = getattr(Image.Resampling, interpolation.upper())
        rgb = np.asarray(open_rgb(path).resize((48, 48), resample)).transpose(2, 0, 1)
        np.testing.assert_array_equal(fast, rgb)


@pytest.mark.parametrize("shared_memory", [True, False])
def test_decoding_workers_deliver_every_image_in_order(tmp_path, monkeypatch, shared_memory):
    """Batches from worker processes equal decoding in-process, by shared memory or by pipe
    (the fallback when /dev/shm is too small to hold the batches in flight)."""
    from headswap import engine

    monkeypatch.setattr(engine, "_shared_memory_fits", lambda *_: shared_memory)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 52), dtype=np.uint8), mode="L").save(paths[-1])
    _, spec = load_body(
        BackboneConfig(
            image_size=32, name="efficientnet_lite0", taps=["head"], pool="mean", ensemble=[]
        )
    )
    batches = list(engine.pixel_batches(paths, spec, batch_size=3, workers=1))
    assert [indices for indices, _ in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    pixels = np.concatenate([batch for _, batch in batches])
    assert all(isinstance(batch, np.ndarray) for _, batch in batches)
    np.testing.assert_array_equal(pixels, np.stack([load_pixels(p, 32) for p in paths]))


def test_shared_memory_is_refused_when_dev_shm_is_too_small():
    from headswap.engine import _shared_memory_fits

    assert not _shared_memory_fits(batch_bytes=1 << 50, batches=5)


def test_an_ensemble_concatenates_its_bodies_on_one_input():
    """Members see the main body's pixels resized inside the module (to whole grey levels, as
    their own decoder would give them), so one image feeds all."""
    from headswap.config import parse_params
    from headswap.features import feature_cache_key

    main = {"name": "efficientnet_lite0", "image_size": 64, "taps": [6, "head"], "pool": "mean"}
    member = {"name": "efficientnet_lite1", "image_size": 96, "taps": ["head"], "pool": "max"}
    params = parse_params({"backbone": {**main, "ensemble": [member]}})
    single = parse_params({"backbone": {**main, "ensemble": []}})
    body, spec = load_body(params.backbone)
    main_body, main_spec = load_body(single.backbone)
    member_body, _ = load_body(parse_params({"backbone": {**member, "ensemble": []}}).backbone)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        resized = torch.nn.functional.interpolate(
            pixels.float(), size=(96, 96), mode="bilinear", align_corners=False
        )
        expected = torch.cat([main_body(pixels), member_body(resized.round())], dim=1)
        torch.testing.assert_close(body(pixels), expected)
    assert spec.describe() == "efficientnet_lite0 + efficientnet_lite1@96"
    identity = spec.identity(params.backbone.taps, params.backbone.pool)
    assert [m["pool"] for m in identity["ensemble"]] == ["max"]
    assert identity["member_pixels"] == "rounded"
    # A single body's identity (and so its cache) is what it was before ensembles existed.
    assert "ensemble" not in main_spec.identity(single.backbone.taps, single.backbone.pool)
    assert feature_cache_key(spec, params.backbone, params.features) != feature_cache_key(
        main_spec, single.backbone, single.features
    )


@pytest.mark.parametrize("size", [224, 300])
def test_fixed_same_padding_changes_no_number(size):
    """The constant-pad rewrite the ONNX exports use gives the body's own outputs, ensemble too
    (the member sees 300 px resized to 260, whose stages have odd sizes and asymmetric pads)."""
    from headswap.backbones.body import fix_same_padding
    from headswap.config import parse_params

    member = {"name": "efficientnet_lite2", "image_size": None, "taps": [2, "head"], "pool": "max"}
    main = {"name": "efficientnet_lite0", "image_size": size, "taps": [4, "head"], "pool": "mean"}
    config = parse_params({"backbone": {**main, "ensemble": [member]}}).backbone
    body, _ = load_body(config)
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        before = body(pixels)
    assert fix_same_padding(body, size) > 0
    with torch.inference_mode():
        torch.testing.assert_close(body(pixels), before, rtol=0, atol=1e-5)
