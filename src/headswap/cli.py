"""``headswap``: one subcommand per pipeline stage (what dvc.yaml calls), plus tools.

The CLI is an edge: it loads params.yaml once, hands each stage its own section and paths, and
turns HeadswapError into one readable line and exit status 1.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from headswap.errors import HeadswapError

app = typer.Typer(
    help="Keep the body, swap the head: frozen-backbone transfer learning as a pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read")]
RAW_DIR = Path("data/raw")
PREPARED = Path("data/prepared")
FEATURES = Path("data/features/features.npz")
MODELS = Path("models")
REPORTS = Path("reports")


def friendly_errors(command):
    """Print HeadswapError (and pydantic/YAML problems already turned into one) without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HeadswapError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _params(path: Path):
    from headswap.config import load_params

    return load_params(path)


@app.command()
@friendly_errors
def ingest(params: ParamsOption = Path("params.yaml")) -> None:
    """Copy data.source (ELPV or an ImageFolder) into data/raw, ready for `dvc add data/raw`."""
    from headswap.data import ingest as run_ingest

    result = run_ingest(_params(params).data, RAW_DIR)
    console.print(f"ingested {sum(result.class_counts.values())} files into {result.root}: "
                  f"{result.class_counts}")


@app.command()
@friendly_errors
def prepare(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate data/raw, split it, and write the manifest and validation report."""
    from headswap.data import prepare as run_prepare

    result = run_prepare(_params(params).data, RAW_DIR, PREPARED)
    console.print(f"manifest: {result.manifest} {result.class_counts}")
    if result.skipped:
        console.print(f"[yellow]skipped {result.skipped} unreadable file(s) (data.on_bad_image: "
                      f"skip); listed in {result.report}:[/]", highlight=False)
        for item in result.skipped_files:
            console.print(f"  skipped {item['path']}: {item['reason']}", highlight=False,
                          markup=False, soft_wrap=True)


@app.command()
@friendly_errors
def features(params: ParamsOption = Path("params.yaml")) -> None:
    """Embed every manifest image with the frozen body (cached per image and configuration)."""
    from headswap.features import extract_features

    config = _params(params)
    result = extract_features(config.backbone, config.features, PREPARED / "manifest.csv",
                              RAW_DIR, FEATURES)
    console.print(f"features: {result.images} images x {result.views} view(s) x {result.dim} dims "
                  f"({result.cache_hits} from cache, engine {result.engine})")


@app.command()
@friendly_errors
def train(params: ParamsOption = Path("params.yaml")) -> None:
    """Train the head on the train split; fit temperature and threshold on the val split."""
    from headswap.data import read_classes
    from headswap.features import load_features
    from headswap.heads import save_head, train_head

    config = _params(params)
    classes = read_classes(PREPARED / "validation.json")
    head, meta = train_head(load_features(FEATURES), classes, config.head, config.evaluate)
    save_head(head, meta, MODELS / "head.pt", MODELS / "head.json")
    console.print(f"head: {meta.type} C={meta.C:g} on {meta.device} in {meta.train_seconds:.2f}s, "
                  f"temperature {meta.temperature:.3f}, threshold {meta.threshold}")


@app.command()
@friendly_errors
def evaluate(params: ParamsOption = Path("params.yaml")) -> None:
    """Score the test split: metrics.json, predictions.csv and plots."""
    from headswap.evaluate import evaluate_head
    from headswap.features import load_features
    from headswap.heads import load_head

    config = _params(params)
    head, meta = load_head(MODELS / "head.pt", MODELS / "head.json")
    result = evaluate_head(head, meta, load_features(FEATURES), PREPARED / "manifest.csv",
                           config.evaluate, REPORTS)
    m = result.metrics
    console.print(f"test: accuracy {m['accuracy']:.4f}, roc_auc {m['roc_auc']}, "
                  f"balanced_accuracy {m['balanced_accuracy']:.4f} (n={m['n']})")


@app.command()
@friendly_errors
def export(params: ParamsOption = Path("params.yaml")) -> None:
    """Export body + head to models/model.onnx and check it against torch."""
    from headswap.export import export_onnx
    from headswap.heads import load_head

    config = _params(params)
    head, meta = load_head(MODELS / "head.pt", MODELS / "head.json")
    result = export_onnx(config.backbone, config.features, config.export, head, meta,
                         REPORTS / "predictions.csv", RAW_DIR, MODELS / "model.onnx",
                         REPORTS / "export_parity.json")
    console.print(f"exported {result.model_path} (max |onnx - torch| = {result.max_abs_diff:.2e})")


@app.command()
@friendly_errors
def register(params: ParamsOption = Path("params.yaml")) -> None:
    """Log the MLflow run, register the ONNX model, set aliases; writes models/registry.json."""
    from headswap.registry import StageFiles, register_model

    registration = register_model(_params(params), StageFiles(), MODELS / "registry.json")
    console.print(f"registered {registration.model_name} v{registration.version} "
                  f"aliases {registration.aliases} (run {registration.run_id})")


@app.command()
@friendly_errors
def repro(targets: Annotated[list[str] | None, typer.Argument(help="stages (default: all)")] = None
          ) -> None:
    """`dvc repro` that waits while another run holds the workspace lock, instead of failing."""
    from headswap.workspace import repro as run_repro

    raise typer.Exit(run_repro(targets or []))


@app.command("check-params")
@friendly_errors
def check_params(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate params.yaml and print the resolved configuration."""
    print(json.dumps(_params(params).model_dump(mode="json"), indent=2))


def main() -> None:
    sys.exit(app())
