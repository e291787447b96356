"""``mrn bench model`` on a tiny configuration (figures present, positive, consistent)."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner

from mrn_engine.config import get_preset
from mrn_engine.models.bench import bench_model, format_result

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: the two ratios the benchmark reports: full MRN forward / bare DINOv2 forward over the same
#: slices, and the 16-subset masking analysis / one plain forward
RATIOS = {
    "forward_over_dinov2": ("forward_s", "dinov2_s"),
    "masking16_over_forward": ("masking16_s", "forward_s"),
    "explain_over_forward": ("explain_s", "forward_s"),  # per-slice evidence (issue 15)
    "explain_leave_out_over_forward": ("explain_leave_out_s", "forward_s"),
    "explain_over_forward_flops": ("explain_GFLOP", "forward_GFLOP"),
}

TINY_ROI = {
    "image_size": 28,
    "slices": {"nm_sn": 2, "qsm_bg": 2, "qsm_midbrain": 2, "qsm_dentate": 2},
}


@pytest.mark.slow  # ~50 s on the loaded shared VM (profiled training step)
def test_bench_model_figures():
    cfg = get_preset("cpu-tiny").replace(
        roi={
            "image_size": 28,
            "slices": {"nm_sn": 2, "qsm_bg": 2, "qsm_midbrain": 2, "qsm_dentate": 2},
        }
    )
    result = bench_model(cfg, "cpu", repeats=1, batch=2)
    for key in (
        "forward_s",
        "dinov2_s",
        "masking16_s",
        "masking16_cached_s",
        "train_step_s",
        "train_step_peak_MiB",
    ):
        assert result[key] > 0, key
    assert result["forward_over_dinov2"] == result["forward_s"] / result["dinov2_s"]
    assert result["masking16_over_forward"] == result["masking16_s"] / result["forward_s"]
    for key in RATIOS:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["slices"] == 8 and result["batch"] == 2
    assert 0.7 < result["params_M"] < 0.8  # the tiny MRN (~0.75 M parameters)
    assert "| forward_s |" in format_result(result)


def run_bench_cli(cfg_path, out, *extra: str):
    """``mrn bench model`` on one config, one repeat, no training step; (result, JSON)."""
    from mrn_engine.cli import cli

    args = ["bench", "model", "--config", str(cfg_path), *extra, "--repeats", "1", "--no-train"]
    res = CliRunner().invoke(cli, [*args, "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    return res, json.loads(out.read_text())


def test_bench_cli_registered(tmp_path):
    from mrn_engine.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["bench", "model", "--help"])
    assert res.exit_code == 0 and "--preset" in res.output
    cfg = get_preset("cpu-tiny").replace(
        roi={
            "image_size": 28,
            "slices": {"nm_sn": 2, "qsm_bg": 2, "qsm_midbrain": 2, "qsm_dentate": 2},
        },
        model={"arch": "seres10"},
    )
    res, data = run_bench_cli(cfg.save(tmp_path / "config.json"), tmp_path / "bench.json")
    assert data["arch"] == "seres10" and "train_step_s" not in data and data["forward_s"] > 0
    assert data["forward_GFLOP"] > 0 and "dinov2_GFLOP" not in data


def test_bench_cli_mrn_prints_both_ratios(tmp_path):
    """``mrn bench model`` for MRN prints (and writes) both ratios, finite and positive."""

    cfg_path = get_preset("cpu-tiny").replace(roi=TINY_ROI).save(tmp_path / "config.json")
    res, data = run_bench_cli(cfg_path, tmp_path / "bench.json", "--arch", "mrn")
    assert data["arch"] == "mrn" and "train_step_s" not in data
    for key, (num, den) in RATIOS.items():
        assert math.isfinite(data[key]) and data[key] > 0, key
        assert data[key] == pytest.approx(data[num] / data[den]), key
        printed = re.search(rf"^\| {key} \| ([^|]+) \|$", res.stdout, re.MULTILINE)
        assert printed, f"{key} missing from the printed table:\n{res.stdout}"
        value = float(printed[1])
        assert math.isfinite(value) and value > 0
        assert value == pytest.approx(data[key], abs=5e-4)  # printed with 3 decimals
