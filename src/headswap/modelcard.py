"""A model card per registered version, written from its lineage and its evaluation.

The card is plain markdown: it is logged beside the run's other artifacts and set as the model
version's description, so the MLflow UI shows it on the version's page. Names that come from
data or from people (class names, slice values, the model name, lineage values) are escaped
(``md_text``, ``md_cell``, ``md_code``): a class called ``a|b`` or ``<script>`` cannot break a
table or put HTML on that page.
"""

from __future__ import annotations

import html
import re

from headswap.backbones.registry import family_of
from headswap.io import markdown_table
from headswap.lineage import SPLIT_TAGS

# The model registry stores a version description in a 5000-character column.
DESCRIPTION_LIMIT = 5000

INTENDED_USE = (
    "Screening of electroluminescence images of solar cells (or the images of the ImageFolder it "
    "was trained on) for the classes listed under Data, as a decision aid that a person reviews. "
    "Inputs must look like the training data: same imaging modality, framing and resolution range."
)
LIMITATIONS = [
    "The body is frozen ImageNet features; only the head was trained, on the data listed here.",
    "Metrics come from one held-out test split; the intervals show how much they could move.",
    "Slices with few images (see n) have wide uncertainty; absent slices were not evaluated.",
    "Probabilities are temperature-calibrated on the validation split; recalibrate after a "
    "shift in data.",
    "Not evaluated on other cell technologies, cameras or image corruptions.",
]


# Markdown that would change how the text around it renders: escapes, code, emphasis, links and
# images, table cells, strikethrough; and an underscore not between two letters or digits
# (emphasis). One inside a word (cell_type) never starts emphasis, and names are full of them.
_MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]~]|(?<![^\W_])_|_(?![^\W_])")


def md_text(value: object) -> str:
    """``value`` as markdown text that renders as itself: one line, no HTML, no markup."""
    return md_cell(value).replace("|", "\\|")


def md_cell(value: object) -> str:
    """``md_text`` but for ``|``: for a table cell, whose pipes ``io.markdown_table`` escapes."""
    flat = " ".join(str(value).split())  # a newline would end a table row or a list item
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match[0], html.escape(flat, quote=False))


def md_code(value: object) -> str:
    """``value`` as an inline code span on one line, fenced by more backticks than it holds."""
    flat = " ".join(str(value).split())
    runs = re.findall(r"`+", flat)
    if not runs:
        return f"`{flat}`"
    fence = "`" * (max(map(len, runs)) + 1)
    return f"{fence} {flat} {fence}"


def backbone_license(backbone: str) -> str:
    """The licence of the backbone's weights, as far as headswap knows it."""
    family = family_of(backbone)
    if family and family.license:
        return family.license
    return "as published with the weights (torchvision / timm model docs): check before use"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _ci(metrics: dict, name: str) -> str:
    interval = metrics.get("ci95", {}).get(name)
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "-"


def _data_section(lineage: dict, validation: dict) -> list[str]:
    classes, counts = validation["classes"], validation["counts"]
    rows = [[md_cell(split), *[str(counts[split].get(c, 0)) for c in classes]] for split in counts]
    split = ", ".join(
        f"{key.removeprefix('split_')} {md_code(lineage[key])}"
        for key in SPLIT_TAGS
        if key in lineage
    )
    return [
        "## Data",
        f"- data version (DVC md5): {md_code(lineage.get('data_md5', 'unknown'))}",
        *([f"- split: {split}; the manifest is `data/manifest.csv` in the run"] if split else []),
        f"- test-split fingerprint: {md_code(lineage.get('test_fingerprint', 'unknown'))}",
        f"- images: {validation.get('images')}, skipped as unreadable: "
        f"{len(validation.get('skipped', []))}",
        "",
        markdown_table(["split", *map(md_cell, classes)], rows),
    ]


def _changes_section(changes: dict | None) -> list[str]:
    """What changed in the data since the champion's (``register.changes_since_champion``),
    followed by a blank line; nothing when the card is rendered without it."""
    if not changes:
        return []
    if not changes.get("per_class"):
        return ["## Data changes since the champion", changes.get("note") or "Not compared.", ""]
    kinds = ("added", "removed", "changed")
    rows = [
        [md_cell(name), *[str(c[k]) for k in kinds]] for name, c in changes["per_class"].items()
    ]
    rows.append(["total", *[str(changes["total"][k]) for k in kinds]])
    return [
        f"## Data changes since the champion (v{changes['since_version']})",
        f"Compared with the champion's data (DVC md5 {md_code(changes.get('since_data_md5'))}); "
        "changed = same path with other content, or an image moved to another class.",
        "",
        markdown_table(["class", *kinds], rows),
        "",
    ]


def _metrics_section(metrics: dict) -> list[str]:
    rows = [
        [name, _num(metrics.get(name)), _ci(metrics, name)]
        for name in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "pr_auc")
    ]
    per_class = [
        [md_cell(name), _num(v["precision"]), _num(v["recall"]), _num(v["f1"]), str(v["support"])]
        for name, v in metrics["per_class"].items()
    ]
    return [
        "## Test metrics",
        f"On {metrics['n']} held-out test images (95% bootstrap intervals).",
        "",
        markdown_table(["metric", "value", "95% CI"], rows),
        "",
        markdown_table(["class", "precision", "recall", "f1", "support"], per_class),
    ]


def _slices_section(metrics: dict) -> list[str]:
    rows = [
        [
            md_cell(f"{column}={value}"),
            str(v["n"]),
            _num(v["accuracy"]),
            _num(v["balanced_accuracy"]),
            _num(v["roc_auc"]),
        ]
        for column, values in metrics.get("slices", {}).items()
        for value, v in values.items()
    ]
    if not rows:
        return ["## Per-slice metrics", "No slice columns were evaluated."]
    return [
        "## Per-slice metrics",
        markdown_table(["slice", "n", "accuracy", "balanced acc.", "ROC-AUC"], rows),
    ]


def _confusion_section(metrics: dict) -> list[str]:
    classes = metrics["classes"]
    rows = [
        [md_cell(f"true {name}"), *map(str, counts)]
        for name, counts in zip(classes, metrics["confusion_matrix"], strict=True)
    ]
    header = ["", *[md_cell(f"pred {name}") for name in classes]]
    return ["## Confusion matrix", markdown_table(header, rows)]


def _calibration_section(metrics: dict) -> list[str]:
    return [
        "## Calibration",
        f"- ECE {_num(metrics['ece'])} after temperature scaling "
        f"(T = {metrics.get('temperature', 1.0):.3f}); before: "
        f"{_num(metrics.get('ece_uncalibrated'))}",
        f"- decision threshold: {metrics.get('threshold')}",
        "- reliability diagram: `plots/reliability.png` in the run's artifacts",
    ]


def render_model_card(
    model_name: str,
    version: str,
    run_id: str,
    lineage: dict,
    metrics: dict,
    validation: dict,
    head: dict,
    changes: dict | None = None,
) -> str:
    """The markdown card for ``model_name`` version ``version``.

    ``changes`` is what changed in the data since the champion's, shown as a short table.
    """
    backbone = lineage.get("backbone", "unknown")
    dirty = " (uncommitted changes)" if lineage.get("git_dirty") == "true" else ""
    lines = [
        f"# {md_text(model_name)} v{md_text(version)}",
        "",
        f"Frozen **{md_text(backbone)}** body + trained **{md_text(head.get('type', '?'))}** head "
        f"(C={md_text(head.get('C'))}), exported to ONNX. MLflow run {md_code(run_id)}.",
        "",
        "## Model",
        f"- backbone: {md_code(backbone)}, weights sha256 "
        f"{md_code(lineage.get('weights_sha256', '?')[:16])}",
        *(
            [
                "- ensemble (features concatenated after the backbone's): "
                + md_text(lineage["ensemble"])
            ]
            if lineage.get("ensemble")
            else []
        ),
        f"- backbone licence: {backbone_license(backbone)}",
        f"- feature-cache key: {md_code(lineage.get('feature_cache_key'))}",
        f"- code: git {md_code(lineage.get('git_commit', 'unknown')[:12])}{dirty}",
        f"- DVC experiment: {md_code(lineage.get('dvc_experiment'))}; Prefect flow run: "
        f"{md_code(lineage.get('prefect_flow_run_id') or 'none')}",
        "",
        *_data_section(lineage, validation),
        "",
        *_changes_section(changes),
        *_metrics_section(metrics),
        "",
        *_slices_section(metrics),
        "",
        *_confusion_section(metrics),
        "",
        *_calibration_section(metrics),
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## Limitations",
        *[f"- {item}" for item in LIMITATIONS],
    ]
    return "\n".join(lines) + "\n"


def as_description(card: str, artifact_path: str) -> str:
    """The card, shortened to the registry's description limit with a pointer to the full file."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    note = f"\n\n(truncated: the full card is `{artifact_path}` in the run's artifacts)"
    return card[: DESCRIPTION_LIMIT - len(note)] + note
