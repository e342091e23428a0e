"""Errors meant for people: each says what was wrong, where, and what to do."""


class HeadswapError(Exception):
    """Base class; the CLI prints these as one clear message, without a traceback."""


class ConfigError(HeadswapError):
    """params.yaml (or a flow parameter) breaks the schema."""


class DataError(HeadswapError):
    """The dataset cannot be used as it stands (bad images under `fail`, too few classes...)."""


class WeightsNotFoundError(HeadswapError):
    """Backbone weights are not on disk and cannot be downloaded."""


class ParityError(HeadswapError):
    """The exported ONNX model disagrees with the torch model it was exported from."""


class RegistryError(HeadswapError):
    """The MLflow tracking server or model registry refused or could not be reached."""


class PromotionError(HeadswapError):
    """A promotion or rollback cannot be carried out (nothing to promote, nothing to roll back)."""


# How the CLI prints a HeadswapError: one line, so a driver that ran a stage as a subprocess can
# find the reason in the stage's output.
ERROR_PREFIX = "error: "
