"""The collapse check: a pretraining run that did not get below ``log(2B - 1)`` is flagged in
its card, warned about by ``mrn pretrain`` and when ``mrn train`` loads it, and not used by
``mrn demo``."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from mrn_engine.cli import cli
from mrn_engine.config import get_preset
from mrn_engine.errors import MRNWarning
from mrn_engine.models import build_model
from mrn_engine.pretraining.collapse import COLLAPSE_MARGIN, collapse_note, is_collapsed
from mrn_engine.pretraining.loop import PretrainOptions, card_path, pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"image_size": 28, "slices": {"nm_sn": 2, "qsm_bg": 3, "qsm_midbrain": 2, "qsm_dentate": 2}}
U = math.log(31)  # the collapsed value for batches of 16


def _curve(*losses):
    return [{"epoch": i + 1, "loss": v, "uniform": U} for i, v in enumerate(losses)]


def test_the_rule_on_measured_curves():
    # runs measured in docs/results.md: the challenge-size demos ended collapsed, the atlas
    # runs learned (30 epochs: 2.85; 12 epochs: 3.30)
    assert is_collapsed(_curve(4.405, 3.601, 3.431))
    assert is_collapsed(_curve(4.22, 3.497))
    assert not is_collapsed(_curve(4.37, 2.85))
    assert not is_collapsed(_curve(4.365, 3.301))
    # only the last epoch counts, and a run that never got below the value has not learned
    assert is_collapsed(_curve(3.0, U - COLLAPSE_MARGIN / 2))
    assert not is_collapsed(_curve(4.4, U - 2 * COLLAPSE_MARGIN))
    assert is_collapsed(_curve(4.6))
    assert is_collapsed([])
    note = collapse_note(_curve(4.4, 3.44))
    assert "3.440" in note and f"{U:.3f}" in note and "random initialisation" in note


@pytest.fixture(scope="module")
def cohort(unlabelled_cases):
    return unlabelled_cases


def test_an_uninformative_kernel_is_flagged_and_warned_about(cohort, tmp_path):
    """With a kernel this wide every pair weighs the same, so the loss cannot go below the
    collapsed value (its floor is that value): the check must say so, every time."""
    cfg = get_preset("cpu-tiny").replace(roi=dict(SMALL))
    opts = PretrainOptions(epochs=2, batch_size=4, device="cpu", sigma=1e4)
    out = tmp_path / "w.safetensors"
    with pytest.warns(MRNWarning, match="pretraining did not learn"):
        card = pretrain(cohort, out, cfg, opts, cache_dir=tmp_path / "c", progress=False)
    last = card["loss_curve"][-1]
    assert last["floor"] == pytest.approx(last["uniform"], abs=1e-4)
    assert last["loss"] >= last["uniform"] - 1e-4
    written = json.loads(card_path(out).read_text())
    assert written["collapsed"] is True and "log(2B - 1)" in written["collapse_rule"]
    # mrn train --weights: loaded (the user may insist), with a warning and the flag recorded
    with pytest.warns(MRNWarning, match="collapsed"):
        model = build_model(
            get_preset("cpu-tiny").replace(roi=dict(SMALL), model={"backbone_weights": str(out)})
        )
    assert model.weights_provenance["card"]["collapsed"] is True
    # the CLI says it in words on stderr
    args = ["pretrain", str(cohort), "--out", str(tmp_path / "cli.safetensors"), "--epochs", "1"]
    args += ["--batch-size", "4", "--sigma", "10000", "--device", "cpu", "--threads", "1"]
    args += ["--quiet", "--cache", str(tmp_path / "c")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "COLLAPSED: the loss ended" in res.output and "did not learn" in res.output


def test_anatcl3d_trunk_from_a_collapsed_run_warns_on_loading(cohort, tmp_path):
    cfg = get_preset("cpu-tiny").replace(roi=dict(SMALL), model={"arch": "anatcl3d"})
    opts = PretrainOptions(arch="anatcl3d", epochs=1, batch_size=4, device="cpu", sigma=1e4)
    out = tmp_path / "r3d.safetensors"
    with pytest.warns(MRNWarning, match="pretraining did not learn"):
        card = pretrain(cohort, out, cfg, opts, cache_dir=tmp_path / "c", progress=False)
    assert card["collapsed"] is True
    with pytest.warns(MRNWarning, match="collapsed"):
        model = build_model(cfg.replace(model={"backbone_weights": str(out)}))
    assert model.weights_provenance["card"]["collapsed"] is True


def test_a_card_that_learned_loads_without_a_warning(cohort, tmp_path, recwarn):
    cfg = get_preset("cpu-tiny").replace(roi=dict(SMALL))
    out = tmp_path / "w.safetensors"
    opts = PretrainOptions(epochs=1, batch_size=4, device="cpu")
    pretrain(cohort, out, cfg, opts, cache_dir=tmp_path / "c", progress=False)
    card = json.loads(card_path(out).read_text())
    card["loss_curve"][-1]["loss"] = card["loss_curve"][-1]["uniform"] - 0.5
    card["collapsed"] = is_collapsed(card["loss_curve"])
    card_path(out).write_text(json.dumps(card))
    recwarn.clear()
    model = build_model(cfg.replace(model={"backbone_weights": str(out)}))
    assert model.weights_provenance["card"]["collapsed"] is False
    assert not [w for w in recwarn if issubclass(w.category, MRNWarning)]
