"""Promotion scores each (model bytes, image bytes) pair once.

Real MLflow (the embedded sqlite store), real tiny ONNX models run by ONNX Runtime, real images
(see conftest). Each test has its own score cache folder, so the counts are its own.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from registry_gate.conftest import GOOD, WORSE, write_manifest

N_TEST = 40  # conftest's write_images: 20 per class, all test rows


@pytest.fixture
def cached(tiny_registry, tmp_path):
    """The tiny registry with its own score cache (and its own copy of the images, which the
    tests change), a refused challenger (WORSE) and a champion (GOOD)."""
    from headswap.promotion.scoring import PromotionFiles

    raw = tmp_path / "raw"
    shutil.copytree(tiny_registry.root / "data" / "raw", raw)
    write_manifest(tmp_path / "manifest.csv", tiny_registry.rows)
    tiny_registry.files = PromotionFiles(tmp_path / "manifest.csv", raw, tmp_path / "cache")
    tiny_registry.register(*GOOD)
    tiny_registry.register(*WORSE)
    return tiny_registry


def counts(outcome) -> dict[str, tuple[int, int]]:
    """role -> (images scored now, images from the cache)."""
    return {role: (t.scored, t.cached) for role, t in outcome.scoring.items()}


def assert_same_decision(first, second) -> None:
    """Same verdict, same table, and bit-identical scores for both models."""
    assert (first.promoted, first.message) == (second.promoted, second.message)
    assert first.comparison.table_rows() == second.comparison.table_rows()
    assert first.comparison.failed == second.comparison.failed
    for role in ("champion", "challenger"):
        a, b = getattr(first.comparison, role), getattr(second.comparison, role)
        assert a.probabilities.dtype == b.probabilities.dtype == np.float32
        assert a.probabilities.tobytes() == b.probabilities.tobytes()
        assert np.array_equal(a.predictions, b.predictions)
        assert a.metrics == b.metrics
    assert first.entry["gate"] == second.entry["gate"]


def test_a_repeated_promotion_scores_nothing_and_decides_the_same(cached):
    first = cached.promote()
    assert not first.promoted and "refused" in first.message
    assert counts(first) == {"champion": (N_TEST, 0), "challenger": (N_TEST, 0)}

    second = cached.promote()
    assert counts(second) == {"champion": (0, N_TEST), "challenger": (0, N_TEST)}
    assert_same_decision(first, second)


def test_cached_scores_equal_fresh_scores_and_the_decision_without_a_cache(cached, tmp_path):
    cached.promote()
    from_cache = cached.promote()
    assert counts(from_cache)["challenger"] == (0, N_TEST)

    fresh = cached.promote(replace(cached.files, cache_dir=tmp_path / "empty-cache"))
    assert counts(fresh)["challenger"] == (N_TEST, 0)
    assert_same_decision(fresh, from_cache)


def change_image(files, rows: list[dict], index: int) -> list[dict]:
    """Rewrite test image ``index`` with other pixels; the manifest rows that describe it now."""
    path = files.raw_dir / rows[index]["path"]
    pixels = np.asarray(Image.open(path))
    Image.fromarray((255 - pixels).astype(np.uint8)).save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return [{**row, "sha256": digest} if i == index else row for i, row in enumerate(rows)]


def test_a_changed_image_is_scored_again_and_only_it(cached):
    first = cached.promote()
    rows = change_image(cached.files, cached.rows, 3)
    write_manifest(cached.files.manifest, rows)  # as `dvc repro prepare` would

    second = cached.promote()
    assert counts(second) == {"champion": (1, N_TEST - 1), "challenger": (1, N_TEST - 1)}
    before = first.comparison.champion.probabilities
    after = second.comparison.champion.probabilities
    assert not np.array_equal(before[3], after[3])  # its inverted pixels score otherwise
    assert np.array_equal(np.delete(before, 3, axis=0), np.delete(after, 3, axis=0))


def test_an_image_changed_since_the_manifest_is_refused_not_scored(cached):
    from headswap.errors import PromotionError

    cached.promote()
    change_image(cached.files, cached.rows, 5)  # the manifest still has the old sha256
    with pytest.raises(PromotionError, match=r"changed since .*dvc repro prepare"):
        cached.promote()


def test_corrupt_cache_entries_are_scored_again_never_trusted(cached):
    first = cached.promote()
    entries = sorted((cached.files.cache_dir / "scores").glob("*/??/*.npy"))
    assert len(entries) == 2 * N_TEST  # two models, one entry per test image each
    entries[0].write_bytes(entries[0].read_bytes()[:-5])  # torn
    blob = bytearray(entries[1].read_bytes())
    blob[-1] ^= 0xFF  # a flipped bit in the stored probabilities
    entries[1].write_bytes(bytes(blob))

    second = cached.promote()
    scored = sum(tally.scored for tally in second.scoring.values())
    assert scored == 2
    assert sum(tally.cached for tally in second.scoring.values()) == 2 * N_TEST - 2
    assert_same_decision(first, second)

    third = cached.promote()  # the recomputed entries were written back, intact
    assert sum(tally.scored for tally in third.scoring.values()) == 0


def test_the_cli_says_how_many_images_each_model_scored(cached, tmp_path):
    from headswap.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(
        f"registry:\n  model_name: {cached.registry.model_name}\n  gate: {{bootstrap: 200}}\n"
        f"features:\n  cache_dir: {tmp_path / 'cli-cache'}\n"
    )
    runner = CliRunner()
    first = runner.invoke(app, ["promote", "--params", str(params)])
    second = runner.invoke(app, ["promote", "--params", str(params)])
    assert first.exit_code == second.exit_code == 1  # refused: WORSE is worse
    assert f"champion v1: {N_TEST} test image(s) scored, 0 from the score cache" in first.output
    assert f"challenger v2: 0 test image(s) scored, {N_TEST} from the score cache" in (
        second.output
    )
    assert str(tmp_path / "cli-cache" / "scores") in second.output
