"""No code from a bundle: crafted pickles never run, nnU-Net models load without unpickling.

Every crafted file's ``__reduce__`` opens (creates) a marker file when unpickled; each test
asserts that the marker does not exist afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrn_engine.data import file_sha256
from mrn_engine.errors import WeightsError
from mrn_engine.segmentation.safe_model import (
    PROVENANCE_FILE,
    check_plans_safe,
)
from test_data import write_case


class Payload:
    """Unpickling this creates ``marker`` (stand-in for any code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(path: Path, marker: Path) -> None:
    """An nnU-Net-looking checkpoint whose unpickling creates ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "network_weights": {"w": torch.zeros(2)},
            "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres"},
            "payload": Payload(marker),
        },
        path,
    )


PLANS = {
    "image_reader_writer": "SimpleITKIO",
    "configurations": {
        "3d_fullres": {
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"conv_op": "torch.nn.modules.conv.Conv3d"},
                "_kw_requires_import": ["conv_op"],
            }
        }
    },
}


def model_dir(root: Path, modality: str, marker: Path, *, record: bool = True) -> Path:
    d = root / "nnunet" / modality
    d.mkdir(parents=True)
    (d / "plans.json").write_text(json.dumps(PLANS))
    labels = {"background": 0, "SN_R": 1, "SN_L": 2} if modality == "NM" else {"background": 0}
    (d / "dataset.json").write_text(json.dumps({"labels": labels}))
    ckpt = d / "fold_0" / "checkpoint_final.pth"
    crafted_checkpoint(ckpt, marker)
    if record:  # an attacker can record the right hash of their own file
        sums = {"fold_0/checkpoint_final.pth": file_sha256(ckpt)}
        (d / PROVENANCE_FILE).write_text(json.dumps({"sha256": sums}))
    return d


@pytest.fixture
def evil_bundle(tmp_path):
    marker = tmp_path / "PWNED"
    bundle = tmp_path / "bundle"
    for mod in ("NM", "QSM"):
        model_dir(bundle, mod, marker)
    return bundle, marker


def test_crafted_nnunet_checkpoint_never_runs(evil_bundle):
    from mrn_engine.segmentation import NNUNetSegmenter

    bundle, marker = evil_bundle
    seg = NNUNetSegmenter.from_bundle(bundle, device="cpu")
    with pytest.raises(WeightsError, match=r"checkpoint_final\.pth: refused to load") as e:
        seg.load()
    assert "--trust-pickled-nnunet" in str(e.value)
    assert not marker.exists()


def test_unrecorded_checkpoint_is_not_loaded(tmp_path):
    from mrn_engine.segmentation import NNUNetSegmenter

    marker = tmp_path / "PWNED"
    for mod in ("NM", "QSM"):
        model_dir(tmp_path / "b", mod, marker, record=False)
    with pytest.raises(WeightsError, match=rf"{PROVENANCE_FILE}: missing"):
        NNUNetSegmenter.from_bundle(tmp_path / "b", device="cpu").load()
    assert not marker.exists()


def test_modified_checkpoint_fails_the_hash_check(evil_bundle):
    from mrn_engine.segmentation import NNUNetSegmenter

    bundle, marker = evil_bundle
    ckpt = bundle / "nnunet" / "NM" / "fold_0" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match=r"checkpoint_final\.pth: sha256 .* does not match"):
        NNUNetSegmenter.from_bundle(bundle, device="cpu").load()
    assert not marker.exists()


def test_opt_in_really_unpickles(evil_bundle):
    """The loudly named opt-in is what the default protects against (marker appears)."""
    from mrn_engine.segmentation.safe_model import read_pickled_checkpoint

    bundle, marker = evil_bundle
    ckpt = bundle / "nnunet" / "NM" / "fold_0" / "checkpoint_final.pth"
    with pytest.warns(UserWarning, match="full trust"):
        read_pickled_checkpoint(ckpt, trust_pickled=True)
    assert marker.exists()


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("network_class_name", "os.system", "network class 'os.system'"),
        ("network_class_name", "dynamic_network_architectures.architectures.x;y", "network class"),
        ("conv_op", "subprocess.Popen", "conv_op = 'subprocess.Popen'"),
    ],
)
def test_plans_naming_foreign_code_are_refused(tmp_path, field, value, problem):
    plans = json.loads(json.dumps(PLANS))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    if field == "conv_op":
        arch["arch_kwargs"]["conv_op"] = value
    else:
        arch[field] = value
    with pytest.raises(WeightsError, match=rf"plans\.json: configuration '3d_fullres': {problem}"):
        check_plans_safe(plans, tmp_path / "plans.json")
    check_plans_safe(PLANS, tmp_path / "plans.json")  # the real layout passes


def test_crafted_weights_file_never_runs(tmp_path):
    from mrn_engine.models.weights import read_state_dict

    marker = tmp_path / "PWNED"
    evil = tmp_path / "dinov2.pth"
    torch.save({"pos_embed": torch.zeros(1), "x": Payload(marker)}, evil)
    with pytest.raises(WeightsError) as e:
        read_state_dict(evil)
    msg = str(e.value)
    assert msg.startswith(f"{evil}: refused")
    assert msg.endswith("instead")  # a whole sentence, no advice to switch weights_only off
    assert "weights_only" not in msg
    assert not marker.exists()


def test_crafted_optimizer_state_in_training_checkpoint_never_runs(tmp_path):
    from mrn_engine.training.checkpoint import load_torch

    marker = tmp_path / "PWNED"
    evil = tmp_path / "optimizer.pt"
    torch.save({"state": Payload(marker)}, evil)
    with pytest.raises(WeightsError, match="optimizer.pt"):
        load_torch(evil)
    assert not marker.exists()


def test_cli_seg_predict_with_crafted_bundle(evil_bundle, tmp_path):
    """The command fails with one line naming the file, no traceback, no marker, no output."""
    bundle, marker = evil_bundle
    cases = tmp_path / "cases" / "RJPD_001"
    cases.mkdir(parents=True)
    write_case(cases, masks=False, t1=False)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mrn_engine.cli import main; main()",
            "seg",
            "predict",
            str(cases.parent),
            "--model",
            str(bundle),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "checkpoint_final.pth: refused to load" in proc.stderr
    assert not marker.exists()


def legit_checkpoint(path: Path) -> None:
    """What nnU-Net's trainer saves: tensors plus numpy scalars, a torch.device, plain data."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    shared = torch.ones(3)
    torch.save(
        {
            "network_weights": {"encoder.w": shared, "decoder.encoder.w": shared},
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float32(0.4)]},
            "_best_ema": np.float64(0.4),
            "current_epoch": 1,
            "init_args": {"configuration": "3d_fullres", "fold": 0, "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainerMRN",
            "inference_allowed_mirroring_axes": (0, 1),
        },
        path,
    )


def test_mrn_seg_convert_makes_a_pickle_free_model(tmp_path):
    from click.testing import CliRunner

    from mrn_engine.cli import cli
    from mrn_engine.segmentation.safe_model import load_fold, verify_hashes

    src = tmp_path / "nnUNet_results" / "model"
    legit_checkpoint(src / "fold_0" / "checkpoint_final.pth")
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        (src / name).write_text(json.dumps(PLANS if name == "plans.json" else {"labels": {}}))
    res = CliRunner().invoke(
        cli, ["seg", "convert", str(src), "--out", str(tmp_path / "b"), "--modality", "nm"]
    )
    assert res.exit_code == 0, res.output
    d = tmp_path / "b" / "nnunet" / "NM"
    assert not list(d.rglob("*.pth"))
    verify_hashes(
        d, ["plans.json", "dataset.json", "fold_0/model.safetensors", "fold_0/model.json"]
    )
    state, meta = load_fold(d, 0)
    assert torch.equal(state["decoder.encoder.w"], torch.ones(3))
    assert meta == {
        "trainer_name": "nnUNetTrainerMRN",
        "configuration": "3d_fullres",
        "inference_allowed_mirroring_axes": [0, 1],
    }
    # a crafted checkpoint is refused by the converter too, and never runs
    marker = tmp_path / "PWNED"
    crafted_checkpoint(src / "fold_0" / "checkpoint_final.pth", marker)
    res = CliRunner().invoke(
        cli, ["seg", "convert", str(src), "--out", str(tmp_path / "c"), "--modality", "nm"]
    )
    assert res.exit_code != 0 and "refused to load" in str(res.exception)
    assert not marker.exists() and not (tmp_path / "c" / "nnunet" / "NM").exists()
