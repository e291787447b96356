"""Training must not silently restart, crash on a damaged checkpoint, or leave orphans behind."""

from __future__ import annotations

import csv
import errno
import json
import warnings

import pytest
import torch

import mrn_engine.training.checkpoint as ck
from mrn_engine.errors import ConfigError, MRNWarning, WeightsError
from mrn_engine.training.checkpoint import (
    CheckpointWriteError,
    latest_checkpoint,
    load_checkpoint,
    load_latest_usable,
    save_checkpoint,
)
from mrn_engine.training.optim import build_optimizer
from test_training_core import TinyNet, _train, make_cohort, tiny_cfg


def _two_epochs(folder):
    net = TinyNet()
    opt = build_optimizer(net, tiny_cfg().train)
    for epoch in (1, 2):
        save_checkpoint(folder, epoch, net.state_dict(), opt.state_dict(), {"metrics": []})
    return net, opt


def test_state_file_without_rng_is_a_clear_error(tmp_path):
    _two_epochs(tmp_path)
    state = tmp_path / "epoch_0002" / "state.json"
    info = json.loads(state.read_text())
    del info["rng"]
    state.write_text(json.dumps(info))
    with pytest.raises(WeightsError, match=r"epoch_0002/state\.json: .*lacks its 'rng' entry"):
        load_checkpoint(tmp_path / "epoch_0002")


def test_truncated_newest_checkpoint_falls_back_to_the_older_epoch(tmp_path):
    _two_epochs(tmp_path)
    newest = tmp_path / "epoch_0002" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(MRNWarning, match=r"epoch_0002/state\.safetensors.*older checkpoint"):
        target, (_, _, info) = load_latest_usable(tmp_path)
    assert target.name == "epoch_0001" and info["epoch"] == 1
    # both damaged: the newest epoch's error, no fallback left
    older = tmp_path / "epoch_0001" / "state.safetensors"
    older.write_bytes(b"")
    with pytest.raises(WeightsError, match="epoch_0002"):
        load_latest_usable(tmp_path)


def test_orphans_of_a_killed_write_are_cleaned(tmp_path):
    _two_epochs(tmp_path)
    (tmp_path / ".epoch_0003.abc123").mkdir()
    (tmp_path / ".epoch_0003.abc123" / "state.safetensors").write_bytes(b"half")
    (tmp_path / ".last.json.xyz.tmp").write_text("{")
    target, _ = load_latest_usable(tmp_path)
    assert target.name == "epoch_0002"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fresh_run_over_checkpoints_is_refused_and_resume_truncates_metrics(tmp_path):
    labels = make_cohort(8)
    cfg = tiny_cfg(pretrain=0, epochs=3)
    out = tmp_path / "fold_0"
    _train(out, cfg, labels, stop_after=2)
    with pytest.raises(ConfigError, match=r"checkpoints of an earlier run.*--resume.*--overwrite"):
        _train(out, cfg, labels)
    # killed between metrics.csv and the checkpoint: metrics.csv one epoch ahead
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    state = out / "checkpoints" / "epoch_0002" / "state.json"
    info = json.loads(state.read_text())
    info["metrics"] = info["metrics"][:1]
    info["epoch"] = 1
    (out / "checkpoints" / "epoch_0002").rename(out / "checkpoints" / "epoch_0001x")
    import shutil

    shutil.rmtree(out / "checkpoints" / "epoch_0001")
    (out / "checkpoints" / "epoch_0001x").rename(out / "checkpoints" / "epoch_0001")
    (out / "checkpoints" / "epoch_0001" / "state.json").write_text(json.dumps(info))
    (out / "checkpoints" / "last.json").write_text(json.dumps({"epoch": 1, "dir": "epoch_0001"}))
    (out / "checkpoints" / ".epoch_0002.orphan").mkdir()
    _train(out, cfg, labels, resume=True, stop_after=1)  # loads epoch 1, trains nothing
    with open(out / "metrics.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    assert not (out / "checkpoints" / ".epoch_0002.orphan").exists()


def test_disk_full_while_checkpointing_is_a_clear_error(tmp_path, monkeypatch):
    net, opt = _two_epochs(tmp_path)

    def full(obj, path):  # what torch.save says when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ck.torch, "save", full)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(CheckpointWriteError, match=r"optimizer\.pt: cannot write.*disk is full"):
        save_checkpoint(tmp_path, 3, net.state_dict(), opt.state_dict(), {})
    assert latest_checkpoint(tmp_path).name == "epoch_0002"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", enospc)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        save_checkpoint(tmp_path, 3, net.state_dict(), opt.state_dict(), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_latest_usable(tmp_path)[0].name == "epoch_0002"
    assert torch.is_tensor(next(iter(load_checkpoint(tmp_path / "epoch_0002")[0].values())))


def test_overwrite_discards_only_the_earlier_runs_files(tmp_path):
    from mrn_engine.training.cv import discard_run, train_bundle

    out = tmp_path / "bundle"
    (out / "fold_0" / "checkpoints" / "epoch_0001").mkdir(parents=True)
    (out / "bundle.json").write_text("{}")
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "fold_x").mkdir()
    discard_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["fold_x", "notes.txt"]
    with pytest.raises(ConfigError, match="--resume and --overwrite exclude each other"):
        train_bundle(tmp_path, out, tiny_cfg(), resume=True, overwrite=True)
