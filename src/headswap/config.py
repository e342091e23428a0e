"""The one typed configuration object, loaded once from params.yaml.

Every stage takes only its own section. Unknown keys are errors (``extra="forbid"``) so a typo in
params.yaml can never silently fall back to a default.

The models hold no default values of their own: a key left out (of a file, or of a section built
in code, like ``HeadConfig(C=0.1)``) takes its value from the project's own params.yaml
(``PROJECT_PARAMS``), so ``Params()`` is exactly the pipeline ``make run`` runs. An ensemble
member's left-out keys take the main body's values there.
"""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

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

from headswap.backbones.registry import family_of, unknown_backbone
from headswap.errors import ConfigError
from headswap.paths import PARAMS

Tap = int | Literal["head"]


# The params.yaml beside src/ in the project (or in a workspace holding a copy of src/).
PROJECT_PARAMS = Path(__file__).resolve().parents[2] / PARAMS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Where this section sits in params.yaml, whose values fill the keys a caller leaves out.
    defaults_at: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _fill_from_params_yaml(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # a built section, or a wrong type that validation reports
        defaults = project_defaults(cls.defaults_at)
        return {**{k: v for k, v in defaults.items() if k in cls.model_fields}, **data}


class SplitConfig(_Section):
    """Deterministic stratified split; fractions are of the whole dataset."""

    defaults_at = ("data", "split")

    seed: int
    test_size: Annotated[float, Field(gt=0, lt=1)]
    val_size: Annotated[float, Field(ge=0, lt=1)]

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.test_size + self.val_size >= 1:
            raise ValueError(
                f"test_size + val_size must be below 1 (got {self.test_size} + {self.val_size})"
            )
        return self


class DataConfig(_Section):
    """Where the images come from and how they are split."""

    defaults_at = ("data",)

    source: str
    max_per_class: Annotated[int, Field(ge=2)] | None
    positive_class: str | None
    on_bad_image: Literal["skip", "fail"]
    min_per_class: Annotated[int, Field(ge=1)]
    split: SplitConfig


class BodyConfig(_Section):
    """One frozen body: which network, which weights, which depths to pool from."""

    defaults_at = ("backbone",)

    name: str
    weights: str | None
    image_size: Annotated[int, Field(ge=32, le=1024)] | None
    taps: Annotated[list[Tap], Field(min_length=1)]
    pool: Literal["mean", "max", "meanmax", "gem"]

    @field_validator("name")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if family_of(name) is None:
            raise ValueError(unknown_backbone(name))
        return name

    @field_validator("taps")
    @classmethod
    def _taps_unique(cls, taps: list[Tap], info: ValidationInfo) -> list[Tap]:
        if len(set(map(str, taps))) != len(taps):
            raise ValueError(f"taps must not repeat (got {taps})")
        # A family whose stages are known without building it is checked here; other bodies'
        # taps depend on the model and are checked when it is built (load_body names them).
        family = family_of(info.data.get("name"))
        valid = list(family.taps) if family and family.taps else []
        bad = [tap for tap in taps if tap not in valid]
        if bad and valid:
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

    ensemble: list[BodyConfig]


class FeaturesConfig(_Section):
    """How embeddings are computed and cached."""

    defaults_at = ("features",)

    engine: Literal["auto", "onnxruntime", "torch"]
    views: Literal["none", "flip", "d4"]
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    workers: Annotated[int, Field(ge=0, le=64)]
    cache_dir: str | None
    # dask: shard across a Dask cluster; torchrun: one shard per rank (run under torchrun)
    executor: Literal["local", "dask", "torchrun"]
    dask_address: str | None  # a running scheduler (tcp://host:8786); None = LocalCluster
    dask_workers: Annotated[int, Field(ge=1, le=1024)]  # LocalCluster size and shard count


class HeadConfig(_Section):
    """The only trained part: a logistic regression or a small MLP on the embeddings."""

    defaults_at = ("head",)

    type: Literal["logistic", "mlp"]
    C: Annotated[float, Field(gt=0)] | Literal["auto"]
    hidden: Annotated[int, Field(ge=1)]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    class_weight: Literal["none", "balanced"]
    device: Literal["auto", "cpu", "cuda"]
    seed: int
    max_iter: Annotated[int, Field(ge=1)]


class EvaluateConfig(_Section):
    """Test-split metrics and plots."""

    defaults_at = ("evaluate",)

    threshold: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"]
    slices: list[str]
    bootstrap: Annotated[int, Field(ge=0)]


class ExportConfig(_Section):
    """The deployable ONNX model and its parity check against torch."""

    defaults_at = ("export",)

    opset: Annotated[int, Field(ge=13, le=23)]
    parity_atol: Annotated[float, Field(gt=0)]


class PromotionGateConfig(_Section):
    """How much worse than the champion a challenger may be and still be promoted."""

    defaults_at = ("registry", "gate")

    accuracy_tolerance: Annotated[float, Field(ge=0, le=1)]
    roc_auc_tolerance: Annotated[float, Field(ge=0, le=1)]
    recall_tolerance: Annotated[float, Field(ge=0, le=1)]
    ece_tolerance: Annotated[float, Field(ge=0, le=1)]
    bootstrap: Annotated[int, Field(ge=0)]


class RegistryConfig(_Section):
    """Where the model is registered in MLflow, and how the champion is promoted."""

    defaults_at = ("registry",)

    model_name: Annotated[str, Field(min_length=1)]
    experiment: Annotated[str, Field(min_length=1)]
    auto_promote: bool
    gate: PromotionGateConfig
    lock_wait_s: Annotated[float, Field(ge=0)]
    lock_stale_s: Annotated[float, Field(gt=0)]


class PredictConfig(_Section):
    """Where the served ``predict`` flow may read images and write its CSV.

    Relative paths are taken from the workspace (the folder the flow runs in, beside
    params.yaml). The flow refuses a ``folder`` outside ``input_roots`` and an ``out`` outside
    ``out_dir``, after resolving ``..`` and symlinks; ``headswap predict`` writes under
    ``out_dir`` too unless ``--out`` names another file.
    """

    defaults_at = ("predict",)

    out_dir: Annotated[str, Field(min_length=1)]
    input_roots: list[Annotated[str, Field(min_length=1)]]


class ScheduleConfig(_Section):
    """When the served `train` deployment (``make ui``) retrains on its own; off by default."""

    defaults_at = ("schedule",)

    train_cron: str | None
    timezone: str

    @field_validator("train_cron")
    @classmethod
    def _five_fields(cls, cron: str | None) -> str | None:
        # Full cron syntax is checked by Prefect when the deployment is served.
        if cron is not None and len(cron.split()) != 5:
            raise ValueError(f"expected 5 cron fields like '0 2 * * *' (got {cron!r})")
        return cron


class Params(_Section):
    """Everything in params.yaml."""

    data: DataConfig
    backbone: BackboneConfig
    features: FeaturesConfig
    head: HeadConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    registry: RegistryConfig
    predict: PredictConfig
    schedule: ScheduleConfig


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


def load_params(path: str | Path = PARAMS) -> Params:
    """Load and validate params.yaml.

    Raises:
        ConfigError: the file is missing, is not YAML, or breaks the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (run from the project root, or pass --params)")
    return parse_params(_read_mapping(path), source=str(path))


def _read_mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``, unvalidated.

    Raises:
        ConfigError: the file is not YAML, or not a mapping.
    """
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


@functools.lru_cache(maxsize=4)
def _mapping_as_of(path: Path, mtime_ns: int) -> dict[str, Any]:
    """``_read_mapping`` once per version of the file (a run may rewrite params.yaml)."""
    return _read_mapping(path)


def project_defaults(section: tuple[str, ...]) -> dict[str, Any]:
    """The values of the project's params.yaml at ``section`` (``("data", "split")``).

    Without the project's file (the package installed on its own) there are none, and every
    key must be given.
    """
    try:
        mtime_ns = PROJECT_PARAMS.stat().st_mtime_ns
    except FileNotFoundError:
        return {}
    values: Any = _mapping_as_of(PROJECT_PARAMS, mtime_ns)
    for key in section:
        values = values.get(key) if isinstance(values, dict) else None
    return values if isinstance(values, dict) else {}
