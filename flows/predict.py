"""The ``predict`` flow: batch inference with the registered champion ONNX model.

A thin wrapper over ``headswap.predict.predict_images`` (the same code as ``headswap predict``):
it writes the CSV and publishes the predicted-class counts as a table artifact.

Anyone who can reach the Prefect API can start this flow, so it reads and writes only where
params.yaml's ``predict`` section allows: ``folder`` under one of ``predict.input_roots`` and
``out`` under ``predict.out_dir``, after resolving ``..`` and symlinks. Anything else is refused
with one line before a file is read, a model is downloaded or a row is written.

    python -m flows.predict data/raw [batch-1.csv]   # ephemeral Prefect, no server needed
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact


@flow(name="predict", log_prints=True)
def predict(folder: str, out: str = "predictions.csv") -> dict:
    """Predict every image under ``folder`` with ``models:/<registry.model_name>@champion``.

    Args:
        folder: a folder of images (searched recursively), under one of ``predict.input_roots``;
            a relative path is taken from the workspace (e.g. ``data/raw``).
        out: the CSV to write, a file under ``predict.out_dir`` (``predictions/`` by default):
            path, predicted class, probabilities, error.
    """
    from headswap.config import load_params
    from headswap.predict import champion_uri, pin_alias, predict_images, served_paths

    params = load_params("params.yaml")
    source, target = served_paths(folder, out, params.predict)
    uri, shown = pin_alias(champion_uri(params.registry))
    result = predict_images(uri, [source], target)
    create_table_artifact(
        key="predicted-class-counts",
        table=[{"class": name, "images": count} for name, count in result.class_counts.items()]
        + [{"class": "(unreadable)", "images": result.errors}],
        description=f"{result.rows} image(s) from {source} scored by {shown}",
    )
    print(f"wrote {result.out} ({result.rows} rows, {result.errors} unreadable)")
    return {
        "out": str(result.out),
        "rows": result.rows,
        "errors": result.errors,
        "class_counts": result.class_counts,
        "model_uri": result.model_uri,
    }


if __name__ == "__main__":
    import os
    import sys

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    predict(sys.argv[1], *(sys.argv[2:3]))
