"""benchmarks/features.py: the ratios and targets it reports are computed as documented."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.helpers.workspace import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_features", REPO / "benchmarks" / "features.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def figures(cold_s=100.0, cold_cpu=180.0, incremental_s=8.0, incremental_cpu=12.0):
    return {
        "cold_run": {"seconds": cold_s, "cpu_seconds": cold_cpu, "images": 1000},
        "incremental_run": {"seconds": incremental_s, "cpu_seconds": incremental_cpu},
        "pipeline_img_s": 10.0,
        "pipeline_cpu_s_per_img": 0.18,
        "limit_img_s": 12.5,
        "limit_cpu_s_per_img": 0.15,
        "torch_eager_img_s": 4.0,
        "torch_eager_cpu_s_per_img": 0.45,
        "peak_rss_mb": 1000.0,
        "doubled_peak_rss_mb": 1010.0,
    }


def test_ratios_divide_the_tutorials_epochs_by_one_headswap_run(bench):
    # The tutorial: 0.5 s per train image and 0.25 s per val image, 10 epochs over 100 + 20.
    tutorial = {"train": (0.5, 0.9), "val": (0.25, 0.4)}
    result = bench.ratios(figures(), tutorial, (0.2, 0.3), (2.0, 3.0), {"train": 100, "val": 20})
    naive = 10 * (100 * 0.5 + 20 * 0.25)
    assert result["naive_epochs_s"] == pytest.approx(naive)
    assert result["speedup_vs_naive"] == pytest.approx(naive / (100 + 8 + 2))
    assert result["speedup_vs_naive_cpu"] == pytest.approx(10 * (90 + 8) / (180 + 12 + 3))
    assert result["pipeline_vs_limit"] == pytest.approx(10 / 12.5)
    # In CPU time a higher cost per image is worse: the limit's cost over the stage's.
    assert result["pipeline_vs_limit_cpu"] == pytest.approx(0.15 / 0.18)
    assert result["ort_vs_torch_cpu"] == pytest.approx(0.45 / 0.15)
    assert result["doubled_rss_ratio"] == pytest.approx(1.01)


def test_targets_report_met_missed_and_unmeasured(bench):
    default = {
        "pipeline_vs_limit_cpu": 0.79,
        "incremental_vs_cold": 0.10,
        "doubled_rss_ratio": 1.2,
        "speedup_vs_naive": 31.0,
    }
    checked = {
        (t["configuration"], t["figure"]): t["met"]
        for t in bench.check_targets({"default": default})
    }
    assert checked[("default", "pipeline_vs_limit_cpu")] is False
    assert checked[("default", "incremental_vs_cold")] is True  # the bound itself holds
    assert checked[("default", "doubled_rss_ratio")] is False
    assert checked[("default", "speedup_vs_naive")] is True
    assert checked[("reference", "incremental_vs_cold")] is None  # not measured in this run


def test_the_default_row_is_the_params_file_and_the_reference_is_fixed(bench, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "backbone: {name: efficientnet_lite1, image_size: 256, taps: [6, head], ensemble: []}\n"
        "features: {views: d4, workers: 1, batch_size: 8}\n"
    )
    default, reference = bench.configurations(params, tmp_path / "cache")
    assert (default.backbone.name, default.backbone.image_size) == ("efficientnet_lite1", 256)
    assert (default.features.views, default.features.batch_size) == ("d4", 8)
    assert reference.backbone.name == "efficientnet_lite0" and reference.features.views == "none"
    # Same decoding settings for both rows, and always ONNX Runtime into the bench's own cache.
    assert reference.features.workers == default.features.workers == 1
    assert {default.features.engine, reference.features.engine} == {"onnxruntime"}
    assert default.features.cache_dir == str(tmp_path / "cache")
    assert bench.Configuration.from_json(default.to_json()) == default
