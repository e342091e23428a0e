"""The ``promote`` flow: gate the challenger against the champion and move the alias if it passes.

A thin wrapper over ``headswap.promotion.promote.promote_version`` (the same code as
``headswap promote``): it publishes the side-by-side comparison as a table artifact and returns
the audit entry.

    python -m flows.promote        # ephemeral Prefect, no server needed
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact


@flow(name="promote", log_prints=True)
def promote(
    version: int | None = None,
    force: bool = False,
    reason: str = "",
    allow_split_conflict: bool = False,
) -> dict:
    """Re-score challenger (or ``version``) and champion on the test split; promote on a pass.

    Args:
        version: registered version to promote; default the one with the ``challenger`` alias.
        force: promote even if gate rules fail (needs ``reason``; recorded as an override).
        reason: why, for the audit history.
        allow_split_conflict: compare although the test split is not fair to one of the versions
            (needs ``reason``; recorded as an override).
    """
    from headswap.config import load_params
    from headswap.promotion.promote import promote_version
    from headswap.promotion.scoring import PromotionFiles

    params = load_params("params.yaml")
    outcome = promote_version(
        params.registry,
        PromotionFiles(cache_dir=params.features.cache_dir),
        version=version,
        force=force,
        reason=reason,
        split=params.data.split,
        allow_split_conflict=allow_split_conflict,
    )
    if outcome.comparison is not None:
        create_table_artifact(
            key="promotion-comparison",
            table=outcome.comparison.table_rows(),
            description=f"v{outcome.entry['new_version']} against v{outcome.entry['old_version']}",
        )
    create_markdown_artifact(key="promotion-decision", markdown=outcome.markdown())
    print(outcome.summary())
    return outcome.entry


if __name__ == "__main__":
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    promote()
