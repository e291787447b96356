"""Training engine pieces that need no real model: splits, optimiser groups, checkpoints,
augmentation, the epoch loop with a stand-in objective, resume-after-kill equality."""

from __future__ import annotations

import json
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mrn_engine.config import get_preset
from mrn_engine.errors import InputDataError, MRNWarning, WeightsError
from mrn_engine.training.augment import RoiAugmenter
from mrn_engine.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_state_dict,
    save_checkpoint,
    save_state_dict,
)
from mrn_engine.training.dataset import RoiStackDataset, make_loader
from mrn_engine.training.optim import build_optimizer, parameter_groups
from mrn_engine.training.splits import make_folds, warn_split_duplicates
from mrn_engine.training.trainer import train_fold

ROI_SHAPES = {"nm_sn": 4, "qsm_bg": 6}
SIZE = 16


# ---------------------------------------------------------------- helpers
def synthetic_rois(case_id: str, label: int) -> dict[str, dict[str, np.ndarray]]:
    """Small ROI stacks: a bright square nucleus whose brightness depends on the label."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    out = {}
    for name, s in ROI_SHAPES.items():
        img = rng.normal(60, 8, (s, SIZE, SIZE)).astype(np.float32)
        mask = np.zeros((s, SIZE, SIZE), np.int64)
        mask[:, 5:11, 5:11] = 1
        img[mask == 1] += 80 if label else 30
        out[name] = {"image": np.clip(img, 0, 255), "mask": mask}
    return out


def make_cohort(n: int = 16) -> dict[str, int]:
    return {f"C{i:03d}": i % 2 for i in range(n)}


def make_dataset(labels: dict[str, int], augment: bool = False) -> RoiStackDataset:
    return RoiStackDataset(
        sorted(labels),
        labels,
        lambda c: synthetic_rois(c, labels[c]),
        RoiAugmenter(7) if augment else None,
    )


class TinyNet(nn.Module):
    """Stand-in student: a 'backbone' conv per ROI, a 'seg' head and a 'head' classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm1d(8 * len(ROI_SHAPES))
        self.seg = nn.Conv2d(8, 2, 1)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * len(ROI_SHAPES), 2))

    def forward(self, rois):
        tokens, segs = [], {}
        for name in sorted(rois):
            x = rois[name]
            b, s, h, w = x.shape
            f = torch.relu(self.backbone(x.reshape(b * s, 1, h, w) / 255.0))
            segs[name] = self.seg(f).reshape(b, s, 2, h, w).transpose(1, 2)
            tokens.append(f.amax((2, 3)).reshape(b, s, -1).mean(1))
        return self.head(self.norm(torch.cat(tokens, 1))), segs


class TinyObjective(nn.Module):
    """Objective protocol of ``train_fold`` around ``TinyNet`` (with an EMA 'teacher' buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.student = TinyNet()
        self.register_buffer("teacher_w", self.student.backbone.weight.detach().clone())

    def forward(self, batch, stage):
        logits, segs = self.student({k: v["image"] for k, v in batch["rois"].items()})
        seg = sum(nn.functional.cross_entropy(segs[k], batch["rois"][k]["mask"]) for k in segs)
        cls = nn.functional.cross_entropy(logits, batch["label"])
        loss = seg + (cls if stage == "train" else 0.0)
        return {"loss": loss, "loss_seg": seg, "loss_cls": cls, "logits": logits}

    def predict_logits(self, batch):
        return self.student({k: v["image"] for k, v in batch["rois"].items()})[0]

    @torch.no_grad()
    def after_step(self):
        self.teacher_w.mul_(0.9).add_(self.student.backbone.weight.detach(), alpha=0.1)


def tiny_cfg(pretrain: int = 1, epochs: int = 3):
    cfg = get_preset("cpu-tiny")
    cfg = cfg.replace(
        train={
            "pretrain_epochs": pretrain,
            "epochs": epochs,
            "batch_size": 4,
            "lr_backbone": 3e-3,
            "lr_head": 1e-2,
            "device": "cpu",
        }
    )
    return cfg


# ---------------------------------------------------------------- splits
def test_folds_stratified_deterministic_and_complete():
    labels = {f"C{i:03d}": int(i < 12) for i in range(30)}  # 12 PD, 18 HC
    folds = make_folds(labels, 3, seed=1)
    assert folds == make_folds(labels, 3, seed=1)
    assert folds != make_folds(labels, 3, seed=2)
    val = [c for f in folds for c in f.val_ids]
    assert sorted(val) == sorted(labels)  # every case out-of-fold exactly once
    for f in folds:
        assert set(f.train_ids).isdisjoint(f.val_ids)
        assert sum(labels[c] for c in f.val_ids) == 4  # 12 PD / 3 folds
        assert len(f.val_ids) == 10


def test_folds_reject_too_few_cases():
    with pytest.raises(InputDataError, match="per class"):
        make_folds({"a": 0, "b": 1, "c": 1}, 2)


def test_duplicate_across_folds_warns():
    labels = make_cohort(12)
    folds = make_folds(labels, 3)
    fold_of = {c: f.index for f in folds for c in f.val_ids}
    other = next(c for c in labels if fold_of[c] != fold_of["C000"])
    same = next(c for c in labels if c != "C000" and fold_of[c] == fold_of["C000"])
    with pytest.warns(MRNWarning, match="different folds"):
        split = warn_split_duplicates(folds, [("C000", other)])
    assert split == [("C000", other)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_split_duplicates(folds, [("C000", same)]) == []


# ---------------------------------------------------------------- optimiser
def test_parameter_groups_lrs_and_decay():
    cfg = tiny_cfg().train
    net = TinyNet()
    groups = {g["name"]: g for g in parameter_groups(net, cfg)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert (
        groups["backbone"]["lr"] == cfg.lr_backbone
        and groups["backbone"]["weight_decay"] == cfg.wd_backbone
    )
    assert groups["head"]["lr"] == cfg.lr_head and groups["head"]["weight_decay"] == cfg.wd_head
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(net.backbone.weight) in ids["backbone"]
    assert id(net.backbone.bias) in ids["backbone_no_decay"]
    assert id(net.seg.weight) in ids["head"] and id(net.norm.weight) in ids["head_no_decay"]
    n_all = sum(len(v) for v in ids.values())
    assert n_all == len(list(net.parameters()))
    opt = build_optimizer(net, cfg)
    assert opt.defaults["betas"] == tuple(cfg.betas)


# ---------------------------------------------------------------- augmentation
def test_augmentation_seeded_and_mask_follows_image():
    rois = synthetic_rois("C001", 1)
    aug = RoiAugmenter(3)
    a, b = aug(rois, key=5), aug(rois, key=5)
    for name in rois:
        np.testing.assert_array_equal(a[name]["image"], b[name]["image"])
        assert a[name]["image"].shape == rois[name]["image"].shape
        assert a[name]["image"].min() >= 0 and a[name]["image"].max() <= 255
        assert set(np.unique(a[name]["mask"])) <= {0, 1}
    changed = sum(
        not np.array_equal(aug(rois, key=k)["qsm_bg"]["image"], rois["qsm_bg"]["image"])
        for k in range(10)
    )
    assert changed >= 5


def test_mirror_flips_image_and_mask_together():
    img = np.zeros((3, 8, 8), np.float32)
    img[:, :2, :] = 200.0  # bright band at low H (= low X, subject right)
    mask = (img > 0).astype(np.int64)
    aug = RoiAugmenter(0)
    aug._with_mask.transforms = aug._with_mask.transforms[:1]  # flip only
    aug._with_mask.transforms[0].prob = 1.0
    out = aug({"r": {"image": img, "mask": mask}}, key=0)["r"]
    np.testing.assert_array_equal(out["image"], img[:, ::-1, :])
    np.testing.assert_array_equal(out["mask"], mask[:, ::-1, :])


def test_loader_order_reproducible():
    ds = make_dataset(make_cohort(12), augment=True)
    order = [b["case_id"] for b in make_loader(ds, 4, shuffle=True, seed=1, epoch=3)]
    again = [b["case_id"] for b in make_loader(ds, 4, shuffle=True, seed=1, epoch=3)]
    other = [b["case_id"] for b in make_loader(ds, 4, shuffle=True, seed=1, epoch=4)]
    assert order == again and order != other
    batch = next(iter(make_loader(ds, 4, shuffle=False)))
    assert batch["rois"]["qsm_bg"]["image"].shape == (4, 6, SIZE, SIZE)
    assert batch["rois"]["qsm_bg"]["mask"].dtype == torch.int64


def test_dataset_requires_masks_and_labels():
    labels = make_cohort(4)
    with pytest.raises(InputDataError, match="C009"):
        RoiStackDataset(["C009"], labels, lambda c: {})
    ds = RoiStackDataset(
        ["C000"], labels, lambda c: {"nm_sn": {"image": np.zeros((2, 4, 4)), "mask": None}}
    )
    with pytest.raises(InputDataError, match="C000: ROI nm_sn has no mask"):
        ds[0]


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_pointer(tmp_path):
    net = TinyNet()
    opt = build_optimizer(net, tiny_cfg().train)
    net(synthetic_rois_batch())[0].sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, net.state_dict(), opt.state_dict(), {"metrics": [1]})
    save_checkpoint(tmp_path, 2, net.state_dict(), opt.state_dict(), {"metrics": [1, 2]})
    save_checkpoint(tmp_path, 3, net.state_dict(), opt.state_dict(), {"metrics": [1, 2, 3]})
    target = latest_checkpoint(tmp_path)
    assert target.name == "epoch_0003"
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
    state, opt_state, info = load_checkpoint(target)
    assert info["epoch"] == 3 and info["metrics"] == [1, 2, 3] and "torch" in info["rng"]
    for k, v in net.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    opt2 = build_optimizer(TinyNet(), tiny_cfg().train)
    opt2.load_state_dict(opt_state)
    assert opt2.state_dict()["param_groups"][0]["lr"] == opt.state_dict()["param_groups"][0]["lr"]


def synthetic_rois_batch():
    rois = synthetic_rois("X", 1)
    return {k: torch.as_tensor(v["image"])[None].repeat(2, 1, 1, 1) for k, v in rois.items()}


def test_checkpoint_crash_leaves_no_partial_file(tmp_path, monkeypatch):
    net = TinyNet()
    opt = build_optimizer(net, tiny_cfg().train)
    save_checkpoint(tmp_path, 1, net.state_dict(), opt.state_dict(), {})
    import mrn_engine.training.checkpoint as ck

    def boom(obj, path):  # torch.save dies half-way through writing
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, net.state_dict(), opt.state_dict(), {})
    assert latest_checkpoint(tmp_path).name == "epoch_0001"
    assert not (tmp_path / "epoch_0002").exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    # the same for a single weights file
    good = save_state_dict(net.state_dict(), tmp_path / "w.safetensors")
    before = good.read_bytes()
    monkeypatch.setattr(ck, "save_file", lambda t, p, **kw: (Path(p).write_bytes(b"x"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_state_dict({"a": torch.zeros(2)}, good)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "last.json",
        "w.safetensors",
    ]


def test_damaged_weights_raise_weights_error(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x00" * 10)
    with pytest.raises(WeightsError, match="bad.safetensors"):
        load_state_dict(p)
    (tmp_path / "last.json").write_text(json.dumps({"epoch": 4, "dir": "epoch_0004"}))
    with pytest.raises(WeightsError, match="incomplete or missing"):
        latest_checkpoint(tmp_path)


# ---------------------------------------------------------------- epoch loop
def _train(out, cfg, labels, **kw):
    torch.manual_seed(cfg.train.seed)
    obj = TinyObjective()
    folds = make_folds(labels, 2, seed=1)
    tr = RoiStackDataset(
        folds[0].train_ids, labels, lambda c: synthetic_rois(c, labels[c]), RoiAugmenter(1)
    )
    va = RoiStackDataset(folds[0].val_ids, labels, lambda c: synthetic_rois(c, labels[c]))
    return obj, train_fold(obj, tr, va, cfg, out, progress=False, **kw)


def test_train_fold_writes_fold_outputs_and_learns(tmp_path):
    labels = make_cohort(16)
    cfg = tiny_cfg(pretrain=1, epochs=6)
    obj, res = _train(tmp_path / "fold_0", cfg, labels)
    assert res.finished and res.epochs_done == 7
    d = tmp_path / "fold_0"
    for name in ("model.safetensors", "config.json", "metrics.csv", "oof.csv", "optimizer.pt"):
        assert (d / name).is_file(), name
    state = load_state_dict(d / "model.safetensors")
    assert set(state) == set(obj.student.state_dict())
    rows = res.metrics
    assert [r["stage"] for r in rows] == ["pretrain"] + ["train"] * 6
    assert rows[-1]["loss_cls"] < rows[1]["loss_cls"]
    oof = (d / "oof.csv").read_text().splitlines()
    assert oof[0] == "case_id,label,p_pd,fold" and len(oof) == 1 + 8
    cal = json.loads((d / "calibration.json").read_text())  # per-fold temperature (issue 15)
    assert cal["fold"] == 0 and cal["n_cases"] == 8 and cal["fitted_on"] == "fold_0/oof.csv"
    assert cal["method"] in ("temperature", "identity") and cal["temperature"] > 0
    assert rows[-1]["val_auc"] >= 0.9  # easy task: the nucleus brightness gives the label
    opt_state = torch.load(d / "optimizer.pt", weights_only=True)
    assert len(opt_state["param_groups"]) == 4


def test_resume_after_kill_gives_identical_weights(tmp_path):
    labels = make_cohort(12)
    cfg = tiny_cfg(pretrain=1, epochs=3)
    _, straight = _train(tmp_path / "a", cfg, labels)
    _, killed = _train(tmp_path / "b", cfg, labels, stop_after=2)
    assert not killed.finished and not (tmp_path / "b" / "model.safetensors").exists()
    _, resumed = _train(tmp_path / "b", cfg, labels, resume=True)
    assert resumed.finished and len(resumed.metrics) == 4
    a = load_state_dict(tmp_path / "a" / "model.safetensors")
    b = load_state_dict(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ca = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))[0]
    cb = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))[0]
    torch.testing.assert_close(ca["teacher_w"], cb["teacher_w"], rtol=0, atol=1e-6)


def test_resume_refuses_other_model_config(tmp_path):
    labels = make_cohort(8)
    cfg = tiny_cfg(pretrain=0, epochs=2)
    _train(tmp_path / "f", cfg, labels, stop_after=1)
    other = cfg.replace(model={"head_hidden": 7})
    with pytest.raises(WeightsError, match="another ROI/model configuration"):
        _train(tmp_path / "f", other, labels, resume=True)
    assert os.path.isdir(tmp_path / "f" / "checkpoints" / "epoch_0001")


def test_geometric_augmentation_keeps_the_contrasts_the_full_one_changes():
    """AnatCL views (``intensity=False``): geometry only, so a nucleus's mean grey value (a
    pretraining weak label) stays put; the training augmentation moves it."""
    rois = {"nm_sn": synthetic_rois("RJPD_001", 1)["nm_sn"]}
    rois["nm_sn"]["mask"] = None
    ref = rois["nm_sn"]["image"].mean()
    geo, full = RoiAugmenter(3, mirror=False, intensity=False), RoiAugmenter(3, mirror=False)
    shift_geo = [abs(geo(rois, key=k)["nm_sn"]["image"].mean() - ref) for k in range(40)]
    shift_full = [abs(full(rois, key=k)["nm_sn"]["image"].mean() - ref) for k in range(40)]
    assert max(shift_geo) < 2.0  # rotation with border padding + zero-mean noise
    assert max(shift_full) > 5.0 and np.mean(shift_full) > 3 * np.mean(shift_geo)
    changed = [
        not np.allclose(geo(rois, key=k)["nm_sn"]["image"], rois["nm_sn"]["image"])
        for k in range(10)
    ]
    assert any(changed)  # the views still differ


def test_fold_augmenter_follows_the_train_config():
    """``train.augment_intensity = False`` trains with the geometric views only (the saved
    config says so); ``augment = False`` with none; configs without the field keep the full
    augmentation."""
    from mrn_engine.config import RunConfig
    from mrn_engine.training.cv import fold_augmenter

    cfg = get_preset("cpu-tiny")
    assert cfg.train.augment_intensity is True
    rois = {"nm_sn": synthetic_rois("RJPD_001", 1)["nm_sn"]}
    rois["nm_sn"]["mask"] = None
    ref = rois["nm_sn"]["image"].mean()

    def shift(aug):
        return max(abs(aug(rois, key=k)["nm_sn"]["image"].mean() - ref) for k in range(40))

    assert shift(fold_augmenter(cfg, 0)) > 5.0
    geo = cfg.replace(train={"augment_intensity": False})
    assert shift(fold_augmenter(geo, 0)) < 2.0
    assert fold_augmenter(cfg.replace(train={"augment": False}), 0) is None
    data = json.loads(json.dumps(geo.to_dict()))
    assert data["train"]["augment_intensity"] is False
    assert RunConfig.from_dict(data).train.augment_intensity is False
    del data["train"]["augment_intensity"]  # a config saved before the field existed
    assert RunConfig.from_dict(data).train.augment_intensity is True
