"""``headswap``: one subcommand per pipeline stage (what dvc.yaml calls), plus tools.

The CLI is an edge: it loads params.yaml once, hands each stage its own section and paths, and
turns HeadswapError into one readable line and exit status 1.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from headswap import paths
from headswap.errors import ERROR_PREFIX, HeadswapError
from headswap.runlock import refuse_if_held

app = typer.Typer(
    help="Keep the body, swap the head: frozen-backbone transfer learning as a pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read")]


# The dvc.yaml stages: a bare `dvc repro` runs them outside any driver's workspace lock.
STAGE_COMMANDS = frozenset(
    {"ingest", "prepare", "features", "train", "evaluate", "export", "register"}
)


def print_error(error: HeadswapError) -> None:
    """One line, ``error: <what was wrong and what to do>``; drivers look for the prefix."""
    console.print(f"[bold red]{ERROR_PREFIX.strip()}[/] {error}", highlight=False, soft_wrap=True)


@app.callback()
def _guard_workspace(ctx: typer.Context) -> None:
    """Refuse a pipeline stage while another run (make run, the UI, make repro) holds the
    workspace, unless that run started this stage itself."""
    if ctx.invoked_subcommand in STAGE_COMMANDS:
        try:
            refuse_if_held()
        except HeadswapError as error:
            print_error(error)
            raise typer.Exit(1) from None


def friendly_errors(command):
    """Print a HeadswapError as one line and exit 1, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HeadswapError as error:
            print_error(error)
            raise typer.Exit(1) from None

    return wrapper


def _params(path: Path):
    from headswap.config import load_params

    return load_params(path)


@app.command()
@friendly_errors
def ingest(params: ParamsOption = paths.PARAMS) -> None:
    """Sync data.source (ELPV or an ImageFolder) into data/raw: added, removed and replaced
    images are mirrored, unchanged ones are left alone (the `ingest` stage of dvc.yaml)."""
    from headswap.ingest import ingest as run_ingest

    result = run_ingest(_params(params).data, paths.RAW_DIR)
    total = sum(result.class_counts.values())
    if not result.changed:
        console.print(f"data/raw is up to date with data.source: {total} files, nothing changed")
        return
    console.print(f"synced data.source into {result.root}: {total} files", highlight=False)
    for label, change in sorted(result.changes.items()):
        console.print(
            f"  {label}: +{change.added} added, -{change.removed} removed, "
            f"~{change.replaced} replaced, {change.unchanged} unchanged",
            highlight=False,
            markup=False,
        )
    if result.renamed:
        console.print(
            f"  {len(result.renamed)} file name(s) not valid UTF-8, copied with each undecodable "
            "byte as %XX (listed in data/raw/ingest_report.json)",
            highlight=False,
            markup=False,
        )


@app.command()
@friendly_errors
def prepare(params: ParamsOption = paths.PARAMS) -> None:
    """Validate data/raw, split it, and write the manifest and validation report."""
    from headswap.prepare import prepare as run_prepare

    result = run_prepare(_params(params).data, paths.RAW_DIR, paths.PREPARED_DIR)
    console.print(f"manifest: {result.manifest} {result.class_counts}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if result.skipped:
        console.print(
            f"[yellow]skipped {result.skipped} unreadable file(s) (data.on_bad_image: "
            f"skip); listed in {result.report}:[/]",
            highlight=False,
        )
        for item in result.skipped_files:
            console.print(
                f"  skipped {item['path']}: {item['reason']}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )


@app.command()
@friendly_errors
def features(params: ParamsOption = paths.PARAMS) -> None:
    """Embed every manifest image with the frozen body (cached per image and configuration)."""
    from headswap.features import extract_features

    config = _params(params)
    result = extract_features(
        config.backbone, config.features, paths.MANIFEST, paths.RAW_DIR, paths.FEATURES
    )
    shape = f"{result.images} images x {result.views} view(s) x {result.dim} dims"
    console.print(f"features: {shape} ({result.cache_hits} from cache, engine {result.engine})")


@app.command()
@friendly_errors
def train(params: ParamsOption = paths.PARAMS) -> None:
    """Train the head on the train split; fit temperature and threshold on the val split."""
    from headswap.feature_set import load_features
    from headswap.manifest import read_classes
    from headswap.train import save_head, train_head

    config = _params(params)
    classes = read_classes(paths.VALIDATION)
    head, meta = train_head(load_features(paths.FEATURES), classes, config.head, config.evaluate)
    save_head(head, meta, paths.HEAD_WEIGHTS, paths.HEAD_META)
    console.print(
        f"head: {meta.type} C={meta.C:g} on {meta.device} in {meta.train_seconds:.2f}s, "
        f"temperature {meta.temperature:.3f}, threshold {meta.threshold}"
    )


@app.command()
@friendly_errors
def evaluate(params: ParamsOption = paths.PARAMS) -> None:
    """Score the test split: metrics.json, predictions.csv and plots."""
    from headswap.evaluate import evaluate_head
    from headswap.feature_set import load_features
    from headswap.heads import load_head

    evaluation = _params(params).evaluate
    head, meta = load_head(paths.HEAD_WEIGHTS, paths.HEAD_META)
    features = load_features(paths.FEATURES)
    result = evaluate_head(head, meta, features, paths.MANIFEST, evaluation, paths.REPORTS_DIR)
    m = result.metrics
    console.print(
        f"test: accuracy {m['accuracy']:.4f}, roc_auc {_four_places(m['roc_auc'])}, "
        f"balanced_accuracy {m['balanced_accuracy']:.4f} (n={m['n']})"
    )


@app.command()
@friendly_errors
def export(params: ParamsOption = paths.PARAMS) -> None:
    """Export body + head to models/model.onnx and check it against torch."""
    from headswap.export import export_onnx
    from headswap.heads import load_head

    config = _params(params)
    head, meta = load_head(paths.HEAD_WEIGHTS, paths.HEAD_META)
    sections = (config.backbone, config.features, config.export)
    result = export_onnx(
        *sections, head, meta, paths.PREDICTIONS, paths.RAW_DIR, paths.MODEL, paths.PARITY
    )
    console.print(f"exported {result.model_path} (max |onnx - torch| = {result.max_abs_diff:.2e})")


@app.command()
@friendly_errors
def register(params: ParamsOption = paths.PARAMS) -> None:
    """Log the MLflow run, register the ONNX model, set aliases; writes models/registry.json."""
    from headswap.register import StageFiles, register_model

    registration = register_model(_params(params), StageFiles(), paths.REGISTRATION)
    if registration.reused:
        console.print(
            f"already registered: {registration.model_name} v{registration.version} in "
            f"{registration.tracking_uri}",
            highlight=False,
            soft_wrap=True,
        )
        return
    console.print(
        f"registered {registration.model_name} v{registration.version} "
        f"aliases {registration.aliases} (run {registration.run_id})"
    )


@app.command()
@friendly_errors
def promote(
    params: ParamsOption = paths.PARAMS,
    version: Annotated[int | None, typer.Option(help="version (default: @challenger)")] = None,
    force: Annotated[
        bool, typer.Option(help="promote even if gate rules fail (needs --reason; recorded)")
    ] = False,
    allow_split_conflict: Annotated[
        bool,
        typer.Option(
            "--allow-split-conflict",
            help="compare although a test image was in a version's training data or the split "
            "settings differ (needs --reason; recorded)",
        ),
    ] = False,
    reason: Annotated[str, typer.Option(help="why, for the audit history")] = "",
) -> None:
    """Re-score challenger and champion on the test split; move @champion if the gate passes.

    Scores are cached per (model bytes, image bytes) in the feature-cache folder, so a repeated
    promotion scores only images a model has not scored before (docs/promotion.md).
    """
    from headswap.promotion.promote import promote_version
    from headswap.promotion.scoring import PromotionFiles

    config = _params(params)
    files = PromotionFiles(paths.MANIFEST, paths.RAW_DIR, config.features.cache_dir)
    outcome = promote_version(
        config.registry,
        files,
        version=version,
        force=force,
        reason=reason,
        split=config.data.split,
        allow_split_conflict=allow_split_conflict,
    )
    for line in outcome.scoring_lines():
        console.print(line, highlight=False, soft_wrap=True)
    if outcome.note:
        console.print(f"[yellow]note:[/] {outcome.note}", highlight=False, soft_wrap=True)
    if outcome.comparison is not None:
        _print_comparison(outcome.comparison)
    colour = "green" if outcome.promoted else "yellow"
    console.print(f"[bold {colour}]{outcome.message}[/]", highlight=False, soft_wrap=True)
    if not outcome.promoted and outcome.entry:
        raise typer.Exit(1)


def _print_comparison(comparison) -> None:
    from rich.table import Table

    rows = comparison.table_rows()
    n = len(comparison.champion.labels)
    new = comparison.new_to_champion
    table = Table(
        title=f"challenger v{comparison.challenger.version} vs champion "
        f"v{comparison.champion.version} on {n} test images"
        + ("" if new is None else f" ({new} new to the champion)")
    )
    for column in rows[0]:
        table.add_column(
            column, justify="right" if column in ("champion", "challenger", "delta") else "left"
        )
    for row in rows:
        style = "red" if row["result"] == "FAIL" else None
        table.add_row(*row.values(), style=style)
    _table_console().print(table)


@app.command()
@friendly_errors
def history(params: ParamsOption = paths.PARAMS) -> None:
    """List the promotion audit history (who moved @champion, when, why, and the gate's result).

    Moves of @champion made outside headswap (the MLflow UI's alias pencil) show as out-of-band
    rows, with the window in which they happened as far as the registry can tell.
    """
    from rich.table import Table

    from headswap.promotion.audit import audit_view

    config = _params(params).registry
    view = audit_view(config)
    table = Table(title=f"{config.model_name}: promotion history")
    for column in ("#", "time (UTC)", "action", "outcome", "from", "to", "user", "reason", "gate"):
        table.add_column(column)
    moves = {move.position: move for move in view.out_of_band}
    for position, entry in enumerate(view.entries):
        if position in moves:
            table.add_row(*_out_of_band_row(moves[position]), style="yellow")
        table.add_row(
            str(entry["seq"]),
            entry["time"],
            entry["action"],
            entry["outcome"],
            f"v{entry['old_version']}" if entry["old_version"] else "-",
            f"v{entry['new_version']}",
            entry["user"],
            entry["reason"],
            _audit_verdict(entry),
        )
    if len(view.entries) in moves:
        table.add_row(*_out_of_band_row(moves[len(view.entries)]), style="yellow")
    _table_console().print(table)
    if view.warning:
        console.print(f"[yellow]warning:[/] {view.warning}", highlight=False, soft_wrap=True)


def _out_of_band_row(move) -> list[str]:
    """A history row for a move of @champion that no audit entry records."""
    window = f"after {move.after or 'the start'}" + (
        f", before {move.before}" if move.before else ""
    )
    return [
        "-",
        window,
        "alias moved outside headswap",
        "out-of-band",
        f"v{move.old}" if move.old else "-",
        f"v{move.new}" if move.new else "(alias removed)",
        "?",
        "not audited (e.g. the MLflow UI's alias pencil); MLflow records no time for it",
        "never gated",
    ]


def _audit_verdict(entry: dict) -> str:
    """The gate's result of one audit entry, and any override a person took."""
    gate = entry.get("gate") or {}
    verdict = entry.get("refusal") or (
        "" if not gate else "passed" if gate["passed"] else "failed: " + ", ".join(gate["failed"])
    )
    if not entry.get("forced"):
        return verdict
    # Entries written before overrides were named carry the refused reason in `override`.
    override = entry.get("override") or "?"
    conflicts = entry.get("split_conflicts") or []
    split = f"; split conflicts: {'; '.join(conflicts)}" if conflicts else ""
    return f"OVERRIDE {override}: {verdict}{split}"


@app.command()
@friendly_errors
def rollback(
    params: ParamsOption = paths.PARAMS,
    reason: Annotated[str, typer.Option(help="why, for the audit history")] = "",
) -> None:
    """Move @champion back to the previous champion (recorded in the audit history)."""
    from headswap.promotion.promote import rollback as run_rollback

    entry = run_rollback(_params(params).registry, reason=reason)
    console.print(f"champion rolled back: v{entry['old_version']} -> v{entry['new_version']}")


@app.command()
@friendly_errors
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="image files and/or folders (recursive)")],
    model: Annotated[
        str | None,
        typer.Option(
            help="models:/<name>@<alias>, models:/<name>/<n> "
            "or a .onnx file (default: the champion)"
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="CSV to write (rows as they are scored, renamed into place at the end); "
            "default predictions.csv under predict.out_dir in params.yaml. An --out you give "
            "may be any file you can write"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 32,
    params: ParamsOption = paths.PARAMS,
) -> None:
    """Batch-predict images with a registered ONNX model; one CSV row per image."""
    from headswap.predict import (
        DEFAULT_OUT_NAME,
        champion_uri,
        pin_alias,
        predict_images,
        printable,
        served_output,
    )

    # The command line is the user's own: the files it names are read as given, and an explicit
    # --out is written where it says. Only the default output is kept under predict.out_dir.
    config = _params(params) if model is None or out is None else None
    target = out if out is not None else served_output(DEFAULT_OUT_NAME, config.predict)
    uri, shown = pin_alias(model or champion_uri(config.registry))
    result = predict_images(uri, inputs, target, batch_size=batch_size)
    console.print(
        f"wrote {printable(str(result.out))}: {result.rows} rows, {result.errors} unreadable; "
        f"predicted {result.class_counts} with {shown}",
        highlight=False,
    )


@app.command()
@friendly_errors
def repro(
    targets: Annotated[list[str] | None, typer.Argument(help="stages (default: all)")] = None,
) -> None:
    """`dvc repro` that waits while another run holds the workspace, instead of failing."""
    from headswap.workspace import repro as run_repro

    raise typer.Exit(run_repro(targets or []))


@app.command("learning-curve")
@friendly_errors
def learning_curve(
    params: ParamsOption = paths.PARAMS,
    sizes: Annotated[str, typer.Option(help="training images per class; 'all' = whole split")] = (
        "10,25,50,100,200,all"
    ),
    seeds: Annotated[int, typer.Option(help="subsamples (and head seeds) per size")] = 5,
    mlflow_log: Annotated[bool, typer.Option("--mlflow/--no-mlflow", help="log a run")] = True,
) -> None:
    """Test accuracy and ROC-AUC against training-set size, from the cached features."""
    from headswap.feature_set import load_features
    from headswap.learning_curve import learning_curve as run_curve
    from headswap.learning_curve import log_to_mlflow, parse_sizes, write_outputs
    from headswap.manifest import read_classes

    config = _params(params)
    if not paths.FEATURES.is_file():
        from headswap.errors import DataError

        raise DataError(
            f"{paths.FEATURES} not found: run `dvc repro features` (or `make run`) first"
        )
    classes = read_classes(paths.VALIDATION)
    points = run_curve(
        load_features(paths.FEATURES),
        classes,
        config.head,
        config.evaluate.threshold,
        parse_sizes(sizes),
        seeds,
    )
    title = f"{config.backbone.name} + {config.head.type} head: learning curve ({seeds} seeds)"
    outputs = write_outputs(points, paths.REPORTS_DIR, title)
    for p in points:
        auc = "n/a" if p.roc_auc_mean is None else f"{p.roc_auc_mean:.4f} ± {p.roc_auc_std:.4f}"
        console.print(
            f"{p.per_class or 'all':>5}/class ({p.train_images} images): accuracy "
            f"{p.accuracy_mean:.4f} ± {p.accuracy_std:.4f}, roc_auc {auc}"
        )
    console.print(f"wrote {outputs.plot}, {outputs.table_csv}, {outputs.table_json}")
    if mlflow_log:
        console.print(f"MLflow run {log_to_mlflow(points, outputs, config, seeds)}")


@app.command("check-params")
@friendly_errors
def check_params(params: ParamsOption = paths.PARAMS) -> None:
    """Validate params.yaml and print the resolved configuration."""
    print(json.dumps(_params(params).model_dump(mode="json"), indent=2))


@app.command()
@friendly_errors
def ui(
    prefect_port: Annotated[int, typer.Option(help="Prefect server/UI port")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow UI port")] = 5000,
    host: Annotated[
        str, typer.Option(help="interface to bind; anything but loopback needs --auth")
    ] = "127.0.0.1",
    auth: Annotated[
        bool,
        typer.Option(
            "--auth",
            help="basic auth on both servers; the user and password are generated once into "
            ".headswap/auth/credentials.json (mode 0600)",
        ),
    ] = False,
    attach: Annotated[
        bool,
        typer.Option(
            "--attach",
            help="serve the deployments to a server already on the port that this command did "
            "not start (it may be another user's)",
        ),
    ] = False,
) -> None:
    """Prefect UI + MLflow UI + the train/promote/predict deployments; Ctrl-C stops them."""
    from headswap.ui import UiConfig, run_ui

    config = UiConfig(host, prefect_port, mlflow_port, auth=auth, attach=attach)
    raise typer.Exit(run_ui(config))


@app.command()
@friendly_errors
def backbones(
    names: Annotated[list[str] | None, typer.Argument(help="backbones to describe")] = None,
    all_torchvision: Annotated[
        bool, typer.Option("--all", help="every torchvision classifier, weights or not")
    ] = False,
    params: ParamsOption = paths.PARAMS,
) -> None:
    """List backbones: the taps they offer, the feature size for the configured taps and pool,
    and whether their weights are on disk (and where they are expected)."""
    from rich.table import Table

    from headswap.backbones.loader import describe_backbone, known_backbones
    from headswap.config import BackboneConfig

    config = _params(params).backbone if params.is_file() else BackboneConfig()
    wanted = list(names or known_backbones(all_torchvision))
    if not names and config.name not in wanted:
        wanted.insert(0, config.name)
    table = Table(title=f"backbones (dim = taps {list(map(str, config.taps))}, pool {config.pool})")
    for column in ("name", "taps offered", "dim", "weights", "expected at"):
        table.add_column(column, overflow="fold")
    for name in wanted:
        weights = config.weights if name == config.name else None
        info = describe_backbone(name, list(config.taps), config.pool, weights)
        taps = ", ".join(info.taps) if len(info.taps) < 6 else f"0..{len(info.taps) - 2}, head"
        table.add_row(
            name,
            taps,
            str(info.dim) if info.dim else "taps not offered",
            "[green]yes[/]" if info.weights_present else "[red]no[/]",
            str(info.weights_path),
        )
    _table_console().print(table)


def _table_console() -> Console:
    """Tables on stdout; when piped or captured, wide enough that no cell, path or key wraps."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=240)


cache_app = typer.Typer(help="The shared per-image embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="cache root (default: features.cache_dir, $HEADSWAP_CACHE_DIR or ~/.cache/headswap)",
    ),
]


def _cache_root(cache_dir: Path | None, params: Path) -> Path:
    from headswap.feature_cache import default_cache_dir

    if cache_dir:
        return cache_dir
    configured = _params(params).features.cache_dir if params.is_file() else None
    return Path(configured) if configured else default_cache_dir()


@cache_app.command("info")
@friendly_errors
def cache_info(cache_dir: CacheDirOption = None, params: ParamsOption = paths.PARAMS) -> None:
    """Size, entries per key, and the hit rate of the last run."""
    from rich.table import Table

    from headswap.feature_cache import summarize_cache

    summary = summarize_cache(_cache_root(cache_dir, params))
    table = Table(
        title=f"{summary.root}: {summary.entries} entries, "
        f"{summary.bytes / 1e6:.1f} MB ({summary.bodies} ONNX bodies)"
    )
    for column in ("key", "backbone", "taps/pool/views", "entries", "MB", "last run hit rate"):
        table.add_column(column)
    for key in summary.keys:
        ident, run = key.identity, key.last_run
        rate = "-"
        if run and run["hits"] + run["misses"]:
            rate = (
                f"{run['hits'] / (run['hits'] + run['misses']):.1%} ({run['hits']} hits, "
                f"{run['misses']} misses)"
            )
        what = f"{ident.get('taps', '?')}/{ident.get('pool', '?')}/{ident.get('views', '?')}"
        table.add_row(
            key.key,
            ident.get("backbone", "?"),
            what,
            str(key.entries),
            f"{key.bytes / 1e6:.1f}",
            rate,
        )
    _table_console().print(table)
    if summary.last_run:
        key, run = summary.last_run
        total = run["hits"] + run["misses"]
        print(
            f"last run: key {key}, {run['hits']}/{total} hits "
            f"({run['hits'] / max(total, 1):.1%}), {run['seconds']:.1f}s"
        )


@cache_app.command("prune")
@friendly_errors
def cache_prune(
    older_than: Annotated[
        float | None,
        typer.Option("--older-than", help="remove entries and bodies not used for this many days"),
    ] = None,
    unreferenced: Annotated[
        bool,
        typer.Option(
            "--unreferenced",
            help="keep only the current params' key and manifest images "
            "(removes every other configuration's entries)",
        ),
    ] = False,
    apply: Annotated[bool, typer.Option("--apply", help="delete (default: dry run)")] = False,
    cache_dir: CacheDirOption = None,
    params: ParamsOption = paths.PARAMS,
) -> None:
    """Remove stale entries (dry run unless --apply). Torn entries and crashed writers' temp
    files are always removed."""
    from headswap.feature_cache import prune_cache

    keep = None
    if unreferenced:
        from headswap.backbones.loader import resolve_backbone
        from headswap.features import feature_cache_key
        from headswap.manifest import read_manifest

        config = _params(params)
        key = feature_cache_key(resolve_backbone(config.backbone), config.backbone, config.features)
        keep = {key: {row["sha256"] for row in read_manifest(paths.MANIFEST)}}
    root = _cache_root(cache_dir, params)
    report = prune_cache(root, keep=keep, older_than_days=older_than, apply=apply)
    verb = "removed" if apply else "would remove (dry run; --apply to delete)"
    print(
        f"{root}: {verb} {report.entries} entries ({report.corrupt} corrupt), "
        f"{report.bodies} ONNX bodies, {report.temp_files} temp files, "
        f"{report.bytes / 1e6:.1f} MB; keys emptied: {len(report.keys)}"
    )


def _four_places(value: float | None) -> str:
    """A metric for the console; ROC-AUC is None when the test split has a single class."""
    return "n/a" if value is None else f"{value:.4f}"
