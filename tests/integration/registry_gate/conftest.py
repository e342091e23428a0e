"""Fixtures for the registry tests: a real `mlflow server`, tiny real ONNX models, real images.

The tiny models are genuine ONNX graphs with headswap's interface (float32 NCHW pixels in,
``probabilities`` + ``label`` out, ``headswap.*`` metadata): p(bright) = sigmoid(slope *
(mean brightness - cut)). They go through the real register code (``register.log_onnx_model``
+ ``register.finish_registration``), so promotion, rollback and prediction are exercised on real
MLflow stores in seconds; the slow tests do the same with models built by the real pipeline.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from headswap.ui import free_port
from tests.helpers.servers import start_mlflow, stop
from tests.helpers.synthetic import brightness_onnx

REPO = Path(__file__).resolve().parents[3]
TINY_SIZE = 16
TINY_CLASSES = ["dark", "bright"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (free port), sqlite backend + proxied artifacts in a tmp dir.

    Yields the tracking URI; the server is stopped (its whole process group) afterwards.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = start_mlflow(
        f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", port, root / "server.log"
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


def tiny_model(path: Path, slope: float, cut: float) -> Path:
    """A real ONNX classifier on mean brightness, with the metadata headswap models carry."""
    metadata = {
        "headswap.classes": json.dumps(TINY_CLASSES),
        "headswap.image_size": str(TINY_SIZE),
        "headswap.interpolation": "bilinear",
    }
    return brightness_onnx(path, metadata, slope, cut)


def write_images(raw: Path, per_class: int = 20, seed: int = 0) -> list[dict]:
    """Noisy grey images whose brightness overlaps between the classes; manifest rows (all test)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for label, (low, high) in {"dark": (40, 150), "bright": (110, 220)}.items():
        (raw / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            level = rng.uniform(low, high)
            pixels = np.clip(rng.normal(level, 20, (24, 24)), 0, 255).astype(np.uint8)
            path = raw / label / f"{label}{i:03d}.png"
            Image.fromarray(pixels, mode="L").save(path)
            rows.append(
                {
                    "path": f"{label}/{path.name}",
                    "label": label,
                    "split": "test",
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                }
            )
    return rows


def manifest_text(rows: list[dict]) -> str:
    """Manifest CSV text: the columns of the first row, in order."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_manifest(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest_text(rows))


NO_MANIFEST: list[dict] = []  # register(..., manifest=NO_MANIFEST): as before split records


@dataclass
class TinyRegistry:
    """A workspace (images + manifest) and a model name in one MLflow store."""

    root: Path
    rows: list[dict]
    registry: object  # RegistryConfig
    files: object  # PromotionFiles
    split: object  # SplitConfig: the workspace's data.split

    def register(
        self,
        slope: float,
        cut: float,
        manifest: list[dict] | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Register a tiny model through the register stage's own functions; returns its version.

        The version records ``manifest`` (default: the workspace's rows) as its run's
        ``data/manifest.csv``, and the lineage tags the register stage writes, ``onnx_sha256``
        included (``tags`` override them).
        """
        import mlflow

        from headswap.io import file_sha256
        from headswap.lineage import split_tags, test_fingerprint
        from headswap.register import finish_registration, log_onnx_model
        from headswap.tracking import MANIFEST_ARTIFACT, client, ensure_experiment, tracking_uri

        mlflow_client = client()
        path = tiny_model(self.root / f"model-{uuid.uuid4().hex[:8]}.onnx", slope, cut)
        rows = self.rows if manifest is None else manifest
        lineage = {
            "onnx_sha256": file_sha256(path),  # as the register stage tags every version
            "test_fingerprint": test_fingerprint(rows),
            "backbone": "tiny-brightness",
            **split_tags(self.split),
            "classes": json.dumps(TINY_CLASSES),
            **(tags or {}),
        }
        experiment = ensure_experiment(mlflow_client, "headswap-tests", self.root)
        mlflow.set_tracking_uri(tracking_uri())

        def log_manifest() -> None:
            if rows:
                mlflow.log_text(manifest_text(rows), MANIFEST_ARTIFACT)

        _, version = log_onnx_model(
            experiment, self.registry.model_name, path, lineage, log_manifest
        )
        finish_registration(mlflow_client, self.registry, version)
        return version

    def promote(self, files=None, **options):
        """``promote_version`` on this workspace (or on ``files``) with its split settings."""
        from headswap.promotion.promote import promote_version

        return promote_version(self.registry, files or self.files, split=self.split, **options)


GOOD = (20.0, 0.51)  # slope, cut: the cut sits between the two brightness ranges
WORSE = (20.0, 0.75)  # calls most bright images dark: lower accuracy and bright recall
INVERTED = (-20.0, 0.51)  # backwards: worse than GOOD on every metric and every class


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory):
    """Images + manifest in a tmp folder that is the cwd, so the embedded sqlite default is used;
    promotion's score cache in the folder too (never the user's own ~/.cache/headswap)."""
    root = tmp_path_factory.mktemp("tiny-registry")
    rows = write_images(root / "data" / "raw")
    write_manifest(root / "data" / "prepared" / "manifest.csv", rows)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("HEADSWAP_CACHE_DIR", str(root / "cache"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield root, rows


@pytest.fixture
def tiny_registry(tiny_workspace, request) -> TinyRegistry:
    """A fresh model name per test in the module's store (fast; no cross-test interference)."""
    from headswap.config import RegistryConfig, SplitConfig
    from headswap.promotion.scoring import PromotionFiles

    root, rows = tiny_workspace
    name = (
        f"tiny-{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"
    )
    registry = RegistryConfig(model_name=name, lock_wait_s=60, gate={"bootstrap": 200})
    return TinyRegistry(root, rows, registry, PromotionFiles(), SplitConfig())
