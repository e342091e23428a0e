"""The feature-cache identity carries a version of the decoding and preprocessing code.

Edits are made to copies of the source text and hashed through the same normaliser as the
installed package; the package itself is never edited.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from headswap import engine, features
from headswap.backbones.spec import BackboneSpec, Preprocessing
from headswap.codeversion import (
    EMBEDDING_CODE,
    code_version,
    normalized_definition,
    source_version,
)
from headswap.config import BackboneConfig, FeaturesConfig


def installed_sources() -> dict[str, str]:
    modules = {module for module, _ in EMBEDDING_CODE} | {"headswap.imaging"}
    return {name: inspect.getsource(importlib.import_module(name)) for name in modules}


def edited(module: str, old: str, new: str) -> str:
    """The version with ``old`` replaced by ``new`` (once) in ``module``'s source."""
    sources = installed_sources()
    assert sources[module].count(old) == 1, f"{old!r} is not unique in {module}: update the test"
    sources[module] = sources[module].replace(old, new)
    return source_version(sources, EMBEDDING_CODE)


def spec() -> BackboneSpec:
    prep = Preprocessing(224, (127.0,) * 3, (128.0,) * 3)
    return BackboneSpec("efficientnet_lite0", Path("w.pth"), "0" * 64, prep, "Apache-2.0")


def test_the_installed_source_gives_the_code_version():
    assert source_version(installed_sources(), EMBEDDING_CODE) == code_version()
    assert len(code_version()) == 16 and code_version() == code_version()


def test_the_feature_identity_and_the_body_path_carry_the_code_version(monkeypatch, tmp_path):
    backbone, config = (
        BackboneConfig(
            name="efficientnet_lite0", image_size=None, taps=["head"], pool="mean", ensemble=[]
        ),
        FeaturesConfig(views="none"),
    )
    identity = features.feature_identity(spec(), backbone, config)
    assert identity["code_version"] == code_version()
    key = features.feature_cache_key(spec(), backbone, config)
    body = engine.body_onnx_path(tmp_path, spec(), backbone)
    monkeypatch.setattr(features, "code_version", lambda: "another version")
    monkeypatch.setattr(engine, "code_version", lambda: "another version")
    assert features.feature_cache_key(spec(), backbone, config) != key
    assert engine.body_onnx_path(tmp_path, spec(), backbone) != body


# (module, old text, new text, whether the code version stays the same)
EDITS = [
    pytest.param(
        "headswap.imaging",
        '"""Decode a file fully into an RGB image with its EXIF orientation applied.',
        '"""Decode a file into RGB (the docstring reworded).',
        True,
        id="docstring",
    ),
    pytest.param(
        "headswap.imaging",
        "# Composite transparent pixels onto white rather than the undefined colour under them.",
        "# A reworded comment.\n        # Over two lines.",
        True,
        id="comment",
    ),
    pytest.param(
        "headswap.imaging",
        '    return image.convert("RGB")\n',
        "    return image.convert(\n        'RGB'\n    )\n\n",
        True,
        id="formatting",
    ),
    pytest.param(
        "headswap.imaging",
        "return load_pixels(path, size, interpolation).astype(np.float32)",
        "return load_pixels(path, size, interpolation).astype(np.float64)",
        True,
        id="unrelated-function-beside-load-pixels",
    ),
    pytest.param(
        "headswap.views",
        "return torch.rot90(out, k=turns, dims=(2, 3)) if turns else out",
        "return torch.rot90(out, k=turns, dims=(3, 2)) if turns else out",
        True,
        id="unrelated-function-beside-the-views",
    ),
    pytest.param(
        "headswap.backbones.body",
        '"""Raw pixels -> concatenated pooled features from the requested taps. Always in eval',
        '"""Pixels in, features out. Always in eval',
        True,
        id="class-docstring",
    ),
    pytest.param(
        "headswap.imaging",
        "(255, 255, 255, 255)",
        "(0, 0, 0, 255)",
        False,
        id="decoding-statement",
    ),
    pytest.param(
        "headswap.imaging",
        "return np.repeat(plane[None], 3, axis=0)",
        "return np.repeat(plane[None], 3, axis=0)[::-1]",
        False,
        id="resize-fast-path",
    ),
    pytest.param(
        "headswap.imaging",
        '    "bilinear": Image.Resampling.BILINEAR,\n    "bicubic"',
        '    "bilinear": Image.Resampling.BICUBIC,\n    "bicubic"',
        False,
        id="resampling-constant",
    ),
    pytest.param(
        "headswap.views",
        "return [(0, False), (0, True)]",
        "return [(0, False), (2, True)]",
        False,
        id="views",
    ),
    pytest.param(
        "headswap.backbones.body",
        "x = (pixels.to(self.mean.dtype) - self.mean) / self.std",
        "x = pixels.to(self.mean.dtype) / 255.0",
        False,
        id="in-graph-normalisation",
    ),
    pytest.param(
        "headswap.backbones.body",
        "features.append(body(resized.round().clamp(0, 255)))",
        "features.append(body(resized.clamp(0, 255)))",
        False,
        id="ensemble-member-pixels",
    ),
]


@pytest.mark.parametrize(("module", "old", "new", "kept"), EDITS)
def test_only_a_changed_statement_in_decoding_or_preprocessing_changes_the_version(
    module, old, new, kept
):
    """Docstrings, comments, formatting and other code keep the version; the rest changes it."""
    assert (edited(module, old, new) == code_version()) is kept


def test_a_method_is_found_in_its_class_and_a_missing_name_is_an_error():
    source = (
        "def forward(x):\n    return x\n"
        "class Body:\n    def forward(self, x):\n        '''doc'''\n        return x + 1\n"
    )
    method = normalized_definition(source, "Body.forward")
    assert "BinOp" in method and "doc" not in method
    assert "BinOp" not in normalized_definition(source, "forward")
    with pytest.raises(LookupError, match="Body.backward"):
        normalized_definition(source, "Body.backward")
    with pytest.raises(LookupError, match="headswap.imaging"):
        source_version(installed_sources(), [("headswap.imaging", "no_such_function")])
