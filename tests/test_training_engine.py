"""Training engine: the real MRN objective end to end, the paper's defaults and
parameter groups, baselines without a pretraining objective, ``mrn compare``, TensorBoard
logging, the MONAI augmentations, canonical SE placement and the ``bundle.json`` lock."""

from __future__ import annotations

import csv
import json
import sys
import threading
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

import mrn_engine.bundle as bundle_mod
from mrn_engine.config import RunConfig, get_preset
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import ConfigError
from mrn_engine.models import build_model, build_training_wrapper
from mrn_engine.models.losses import compute_losses, loss_terms
from mrn_engine.training import cv
from mrn_engine.training.augment import RoiAugmenter, build_roi_transform
from mrn_engine.training.checkpoint import latest_checkpoint, load_checkpoint
from mrn_engine.training.dataset import RoiStackDataset
from mrn_engine.training.objective import MRNObjective
from mrn_engine.training.optim import build_optimizer
from mrn_engine.training.trainer import train_fold
from mrn_engine.workflows.compare import VARIANTS, variant_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL_SLICES = {"nm_sn": 2, "qsm_bg": 3, "qsm_midbrain": 2, "qsm_dentate": 2}


def small_model_cfg(preset: str = "cpu-tiny", image: int = 28, **model) -> RunConfig:
    """A preset at tiny slices (model overrides as keywords), random init allowed."""
    cfg = get_preset(preset).replace(roi={"image_size": image, "slices": dict(SMALL_SLICES)})
    return cfg.replace(model={"allow_random_init": True, **model})


def run_cfg(**train) -> RunConfig:
    """cpu-tiny on the phantom cohort: 2 folds, 1 + 2 epochs, CPU."""
    base = {"folds": 2, "pretrain_epochs": 1, "epochs": 2, "batch_size": 4, "device": "cpu"}
    return get_preset("cpu-tiny").replace(train={**base, **train})


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- 4. paper defaults
def test_paper_vitb_preset_pins_the_papers_values():
    cfg = get_preset("paper-vitb")
    t, m = cfg.train, cfg.model
    assert cfg.preset == "paper-vitb"
    assert (t.pretrain_epochs, t.epochs) == (400, 200)
    assert (t.lr_backbone, t.lr_head) == (1e-5, 1e-4)
    assert (t.wd_backbone, t.wd_head) == (0.1, 0.05)
    assert tuple(t.betas) == (0.9, 0.999)
    assert t.batch_size == 4
    assert (t.folds, t.cv_seed) == (5, 1)
    assert m.arch == "mrn" and m.backbone == "vit_base_patch14_reg4_dinov2"
    assert m.drop_path == 0.2
    assert (m.ffa_depth, m.sfa_depth) == (3, 2)
    assert m.moco_temperature == 0.1
    assert m.moco_bank_size == 1024
    assert m.moco_momentum == 0.999
    assert m.dropout == 0.5
    assert tuple(m.dpt_channels) == (96, 192, 384, 768)
    assert m.dpt_fusion == 256
    assert m.use_ffa and m.use_sfa and m.use_dpt and m.use_moco and not m.dinov2_only
    assert m.dpt_features == "local"
    # the preset survives the config.json round trip unchanged
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------- 3. parameter groups
#: where each trainable parameter of ``MRNObjective`` (MRN + mSupMoCo) belongs (paper 4.1.2)
BACKBONE_PREFIXES = (
    "wrapper.model.res.patchnizer.",  # DINOv2
    "wrapper.model.res.slice_pos",  # learned slice position embedding
    "wrapper.model.res.ffa.",
    "wrapper.model.res.sfa.",
)
HEAD_PREFIXES = (
    "wrapper.model.res.dpt.",
    "wrapper.model.head.",  # classification head
    "wrapper.projection.",  # mSupMoCo projection head
)


def check_paper_groups(cfg: RunConfig) -> None:
    obj = MRNObjective(cfg, pretrained=False)
    opt = build_optimizer(obj, cfg.train)  # the trainer's optimiser factory
    t = cfg.train
    expected = {
        "backbone": (t.lr_backbone, t.wd_backbone),
        "backbone_no_decay": (t.lr_backbone, 0.0),
        "head": (t.lr_head, t.wd_head),
        "head_no_decay": (t.lr_head, 0.0),
    }
    group_of: dict[int, str] = {}
    for g in opt.param_groups:
        assert (g["lr"], g["weight_decay"]) == expected[g["name"]], g["name"]
        assert tuple(g["betas"]) == tuple(t.betas)
        for p in g["params"]:
            assert id(p) not in group_of, "a parameter is in two groups"
            group_of[id(p)] = g["name"]
    trainable = [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable)  # every trainable parameter exactly once
    seen = {"backbone": set(), "head": set()}
    for name, p in trainable:
        kind = group_of[id(p)].removesuffix("_no_decay")
        if name.startswith(BACKBONE_PREFIXES):
            assert kind == "backbone", name
        elif name.startswith(HEAD_PREFIXES):
            assert kind == "head", name
        else:
            pytest.fail(f"unexpected trainable parameter {name}")
        seen[kind] |= {pre for pre in BACKBONE_PREFIXES + HEAD_PREFIXES if name.startswith(pre)}
    assert seen["backbone"] == set(BACKBONE_PREFIXES)  # every component is present
    assert seen["head"] == set(HEAD_PREFIXES)
    # the EMA teacher is not optimised
    teacher = [p for n, p in obj.named_parameters() if n.startswith("wrapper.teacher")]
    assert teacher and all(id(p) not in group_of for p in teacher)
    # weight decay goes to matrices; biases/norms/slice positions get none
    by_name = dict(trainable)
    for token in ("slice_pos", "sfa.roi_token", "patchnizer.vit.cls_token"):
        assert group_of[id(by_name[f"wrapper.model.res.{token}"])] == "backbone_no_decay", token
    ffa_matrix = next(
        n for n, p in trainable if n.startswith("wrapper.model.res.ffa.") and p.ndim == 2
    )
    assert group_of[id(by_name[ffa_matrix])] == "backbone"


def test_parameter_groups_of_the_real_cpu_tiny_model():
    cfg = get_preset("cpu-tiny")
    assert cfg.model.use_moco
    check_paper_groups(cfg)


def test_parameter_groups_of_the_real_paper_vitb_model():
    cfg = small_model_cfg("paper-vitb", image=28)  # ViT-B/14 at 28 px: the paper's modules
    assert (cfg.train.lr_backbone, cfg.train.wd_backbone) == (1e-5, 0.1)
    assert (cfg.train.lr_head, cfg.train.wd_head) == (1e-4, 0.05)
    check_paper_groups(cfg)


def test_lr_fusion_moves_slice_positions_ffa_and_sfa_out_of_the_vit_group():
    cfg = small_model_cfg("cpu-tiny", image=28)
    cfg = cfg.replace(train={"lr_fusion": 2e-4})
    obj = MRNObjective(cfg, pretrained=False)
    groups = {g["name"]: g for g in build_optimizer(obj, cfg.train).param_groups}
    assert set(groups) == {
        "backbone",
        "backbone_no_decay",
        "fusion",
        "fusion_no_decay",
        "head",
        "head_no_decay",
    }
    names = {id(p): n for n, p in obj.named_parameters()}
    for kind in ("backbone", "backbone_no_decay"):
        assert groups[kind]["lr"] == cfg.train.lr_backbone
        assert all(".patchnizer." in names[id(p)] for p in groups[kind]["params"])
    fused = [names[id(p)] for k in ("fusion", "fusion_no_decay") for p in groups[k]["params"]]
    assert groups["fusion"]["lr"] == groups["fusion_no_decay"]["lr"] == 2e-4
    assert groups["fusion"]["weight_decay"] == cfg.train.wd_backbone
    for part in (".ffa.", ".sfa.", ".slice_pos"):
        assert any(part in n for n in fused), part
    assert not any(".patchnizer." in n or ".dpt." in n for n in fused)
    # the same parameters as without it, only regrouped
    plain = build_optimizer(
        MRNObjective(small_model_cfg("cpu-tiny", image=28), pretrained=False), cfg.train
    )
    assert sum(len(g["params"]) for g in groups.values()) == sum(
        len(g["params"]) for g in plain.param_groups
    )
    # a model without fusion modules keeps its groups: the 3D trunk stays at lr_backbone
    cfg3d = small_model_cfg(arch="anatcl3d").replace(train={"lr_fusion": 2e-4})
    names3d = {
        g["name"]
        for g in build_optimizer(MRNObjective(cfg3d, pretrained=False), cfg3d.train).param_groups
    }
    assert "backbone" in names3d and not names3d & {"fusion", "fusion_no_decay"}


def test_seres10_trains_every_parameter_at_the_head_rate():
    cfg = small_model_cfg(arch="seres10", use_moco=True)
    obj = MRNObjective(cfg, pretrained=False)
    groups = {g["name"]: g for g in build_optimizer(obj, cfg.train).param_groups}
    assert set(groups) == {"head", "head_no_decay"}  # documented in training/optim.py
    n = sum(len(g["params"]) for g in groups.values())
    assert n == sum(p.requires_grad for p in obj.parameters())


# ---------------------------------------------------------------- 1. empty pretraining stage
def test_loss_terms_of_the_variants():
    base = get_preset("cpu-tiny")
    terms = {v: loss_terms(variant_config(base, v).model, "pretrain") for v in VARIANTS}
    assert terms == {
        "mrn": ("seg", "con"),
        "seres10": (),
        "seres10-moco": ("con",),
        "dinov2-only": (),
        "anatcl3d": (),
    }
    assert loss_terms(variant_config(base, "seres10").model, "train") == ("cls",)
    assert loss_terms(base.model.__class__(lambda_seg=0.0, use_moco=False), "pretrain") == ()
    with pytest.raises(ConfigError, match="stage"):
        loss_terms(base.model, "finetune")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_terms_match_the_gradient_of_compute_losses(variant):
    """``loss_terms(cfg, "pretrain") == ()`` exactly when the pretraining loss has no gradient."""
    cfg = variant_config(small_model_cfg(), variant)
    torch.manual_seed(0)
    wrapper = build_training_wrapper(build_model(cfg, pretrained=False), cfg)
    g = torch.Generator().manual_seed(0)
    s = cfg.roi.image_size
    batch = {
        "images": {n: torch.rand(4, k, s, s, generator=g) * 255 for n, k in SMALL_SLICES.items()},
        "masks": {
            n: torch.randint(0, ROI_BY_NAME[n].num_classes, (4, k, s, s), generator=g)
            for n, k in SMALL_SLICES.items()
        },
        "label": torch.tensor([0, 1, 0, 1]),
    }
    out = wrapper.step(batch)
    total = compute_losses(out, batch, "pretrain", cfg.model)["total"]
    total.backward()
    grad = sum(float(p.grad.abs().sum()) for p in wrapper.parameters() if p.grad is not None)
    if loss_terms(cfg.model, "pretrain"):
        assert grad > 0
    else:
        assert float(total.detach()) == 0.0 and grad == 0.0  # nothing to learn: only weight decay


def test_variant_config_skips_an_empty_pretraining_stage():
    base = get_preset("paper-vitb")
    epochs = {
        v: (variant_config(base, v).train.pretrain_epochs, variant_config(base, v).train.epochs)
        for v in VARIANTS
    }
    assert epochs == {
        "mrn": (400, 200),
        "seres10": (0, 200),
        "seres10-moco": (400, 200),
        "dinov2-only": (0, 200),
        "anatcl3d": (0, 200),
    }
    # the model section is still only the variant's change; everything else is the base's
    s = variant_config(base, "seres10")
    assert s.model.arch == "seres10" and not s.model.use_moco
    assert s.replace(train={"pretrain_epochs": 400}).train == base.train
    assert s.roi == base.roi


def test_train_bundle_refuses_a_pretraining_stage_with_nothing_to_learn(phantom_root, tmp_path):
    cfg = run_cfg().replace(model={"arch": "seres10", "use_moco": False})
    with pytest.raises(ConfigError, match="no pretraining objective"):
        cv.train_bundle(phantom_root, tmp_path / "b", cfg, folds=[0], progress=False)
    assert not (tmp_path / "b").exists()
    cv.check_stages(cfg.replace(train={"pretrain_epochs": 0}))  # fine without the stage
    cv.check_stages(cfg.replace(model={"use_moco": True}))  # SERes10-mSupMoCo pretrains


# ---------------------------------------------------------------- 2. resume on the real model
@pytest.mark.slow
def test_resume_after_kill_real_objective_gives_identical_weights(phantom_root, tmp_path):
    cfg = run_cfg()  # cpu-tiny MRN with mSupMoCo: 1 pretraining + 2 full-loss epochs
    assert cfg.model.use_moco and loss_terms(cfg.model, "pretrain") == ("seg", "con")
    cache = tmp_path / "cache"
    kw = {"folds": [0], "cache_dir": cache, "progress": False}
    (straight,) = cv.train_bundle(phantom_root, tmp_path / "a", cfg, **kw)
    (killed,) = cv.train_bundle(phantom_root, tmp_path / "b", cfg, stop_after=2, **kw)
    assert straight.finished and straight.epochs_done == 3
    assert not killed.finished and killed.epochs_done == 2
    assert not (tmp_path / "b" / "fold_0" / "model.safetensors").exists()
    (resumed,) = cv.train_bundle(phantom_root, tmp_path / "b", cfg, resume=True, **kw)
    assert resumed.finished and resumed.epochs_done == 3

    fa, fb = tmp_path / "a" / "fold_0", tmp_path / "b" / "fold_0"
    a, b = load_file(str(fa / "model.safetensors")), load_file(str(fb / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the whole training state (student, projection, EMA teacher, memory banks) as well
    sa = load_checkpoint(latest_checkpoint(fa / "checkpoints"))[0]
    sb = load_checkpoint(latest_checkpoint(fb / "checkpoints"))[0]
    assert sa.keys() == sb.keys() and any("bank" in k for k in sa)
    assert any(k.startswith("wrapper.teacher.") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the resumed epoch did change the weights (the equality above is not trivial)
    epoch2 = load_checkpoint(fa / "checkpoints" / "epoch_0002")[0]
    assert any(not torch.equal(epoch2[k], sa[k]) for k in sa if k.startswith("wrapper.model."))

    ma, mb = read_csv(fa / "metrics.csv"), read_csv(fb / "metrics.csv")
    assert [m["stage"] for m in ma] == ["pretrain", "train", "train"]
    for ra, rb in zip(ma, mb, strict=True):
        ra.pop("seconds"), rb.pop("seconds")
        assert ra == rb
    assert float(ma[0]["loss_con"]) > 0 and float(ma[0]["loss_seg"]) > 0
    assert (fa / "oof.csv").read_text() == (fb / "oof.csv").read_text()


# ---------------------------------------------------------------- 5. mrn compare (CLI)
@pytest.mark.slow
def test_mrn_compare_cli_end_to_end(phantom_root, tmp_path):
    from mrn_engine.cli import cli

    out = tmp_path / "cmp"
    args = ["compare", str(phantom_root), "--variants", "mrn,seres10", "--out", str(out)]
    args += ["--preset", "cpu-tiny", "--folds", "2", "--pretrain-epochs", "1", "--epochs", "1"]
    args += ["--batch-size", "4", "--device", "cpu", "--threads", "1", "--quiet"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "comparison.csv")
    assert [row["variant"] for row in rows] == ["mrn", "seres10"]
    for row in rows:
        for k in ("oof_accuracy", "oof_auc", "oof_f1"):
            assert 0.0 <= float(row[k]) <= 1.0, (row["variant"], k, row[k])
        assert int(row["n_oof"]) == 8 and int(row["n_heldout"]) == 0
        assert row["heldout_accuracy"] == "nan"
    assert [(row["pretrain_epochs"], row["epochs"]) for row in rows] == [("1", "1"), ("0", "1")]
    md = (out / "comparison.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "%" in line]
    assert [line.split("|")[1].strip() for line in table] == ["MRN", "SERes10"]
    for line in table:
        cells = [c.strip() for c in line.split("|")[2:-1]]
        oof = [float(c.rstrip("%")) for c in cells[:3]]
        assert all(0.0 <= v <= 100.0 for v in oof) and cells[3:] == ["N/A"] * 3
    assert "pretraining stage skipped" in md and "SERes10" in md.split("skipped")[-1]
    assert "| MRN |" in r.output and "comparison.md" in r.output
    # one bundle per variant on the same folds; SERes10 had no (empty) pretraining stage
    folds = [json.loads((out / v / "bundle.json").read_text())["folds"] for v in ("mrn", "seres10")]
    assert folds[0] == folds[1]
    assert RunConfig.load(out / "seres10" / "config.json").train.pretrain_epochs == 0
    assert RunConfig.load(out / "mrn" / "config.json").train.pretrain_epochs == 1
    for k in (0, 1):
        stages = [m["stage"] for m in read_csv(out / "seres10" / f"fold_{k}" / "metrics.csv")]
        assert stages == ["train"]
        stages = [m["stage"] for m in read_csv(out / "mrn" / f"fold_{k}" / "metrics.csv")]
        assert stages == ["pretrain", "train"]


# ---------------------------------------------------------------- 6. TensorBoard
SIZE = 12


def synthetic_rois(case_id: str, label: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    img = rng.normal(60, 8, (3, SIZE, SIZE)).astype(np.float32)
    mask = np.zeros((3, SIZE, SIZE), np.int64)
    mask[:, 4:8, 4:8] = 1
    img[mask == 1] += 80 if label else 30
    return {"nm_sn": {"image": np.clip(img, 0, 255), "mask": mask}}


class StandIn(nn.Module):
    """A minimal training objective (the trainer's protocol) with seg + cls losses."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.ModuleDict({"backbone": nn.Conv2d(3, 4, 3, padding=1)})
        self.student["head"] = nn.Linear(4, 2)
        self.student["seg"] = nn.Conv2d(4, 2, 1)

    def _run(self, batch):
        x = batch["rois"]["nm_sn"]["image"] / 255.0
        f = torch.relu(self.student["backbone"](x))
        return self.student["head"](f.mean((2, 3))), self.student["seg"](f)

    def forward(self, batch, stage):
        logits, seg_logits = self._run(batch)
        target = batch["rois"]["nm_sn"]["mask"][:, 1]  # the middle slice
        seg = nn.functional.cross_entropy(seg_logits, target)
        cls = nn.functional.cross_entropy(logits, batch["label"])
        loss = seg + (cls if stage == "train" else 0.0)
        return {"loss": loss, "loss_seg": seg.detach(), "loss_cls": cls.detach(), "logits": logits}

    def predict_logits(self, batch):
        return self._run(batch)[0]

    def after_step(self):
        pass


class FakeSummaryWriter:
    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir=None, **kwargs) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step=None, *args, **kwargs) -> None:
        self.scalars.append((tag, float(value), int(global_step)))

    def close(self) -> None:
        self.closed = True


def stand_in_fold(out: Path):
    labels = {f"C{i:02d}": i % 2 for i in range(12)}
    load = lambda c: synthetic_rois(c, labels[c])  # noqa: E731
    train_ds = RoiStackDataset(sorted(labels)[:8], labels, load)
    val_ds = RoiStackDataset(sorted(labels)[8:], labels, load)
    cfg = get_preset("cpu-tiny").replace(train={"pretrain_epochs": 1, "epochs": 2, "device": "cpu"})
    torch.manual_seed(0)
    return train_fold(StandIn(), train_ds, val_ds, cfg, out, progress=False)


def test_tensorboard_scalars_per_epoch(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.instances.clear()
    res = stand_in_fold(tmp_path / "fold_0")
    assert res.finished and len(res.metrics) == 3
    (writer,) = FakeSummaryWriter.instances
    assert Path(writer.log_dir) == tmp_path / "fold_0" / "tensorboard"
    assert writer.closed
    for row in res.metrics:
        epoch = row["epoch"]
        logged = {tag: v for tag, v, step in writer.scalars if step == epoch}
        for name in ("loss", "loss_seg", "loss_cls", "val_loss", "val_acc", "lr_head"):
            assert name in logged, (epoch, name)
            assert logged[name] == pytest.approx(row[name]), (epoch, name)
        assert ("train_acc" in logged) == (row["stage"] == "train")  # NaN in pretraining: skipped
    assert sorted({step for _, _, step in writer.scalars}) == [1, 2, 3]


def test_no_tensorboard_installed_means_no_event_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    res = stand_in_fold(tmp_path / "fold_0")
    assert res.finished and not (tmp_path / "fold_0" / "tensorboard").exists()


def test_tensorboard_is_an_optional_extra():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(d.startswith("tensorboard") for d in extras["tb"])
    assert not any("tensorboard" in d for d in extras["all"] + extras["test"])


# ---------------------------------------------------------------- 7. augmentations
def test_training_transform_holds_the_papers_monai_transforms():
    from monai.transforms import (
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandHistogramShiftd,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    t = build_roi_transform(with_mask=True)
    by_type = {type(x): x for x in t.transforms}
    wanted = {
        RandFlipd: "mirror",
        RandRotated: "rotation",
        RandScaleIntensityd: "intensity scale",
        RandShiftIntensityd: "intensity shift",
        RandAdjustContrastd: "contrast",
        RandGaussianNoised: "Gaussian noise",
        RandHistogramShiftd: "histogram shift",
    }
    missing = [name for cls, name in wanted.items() if cls not in by_type]
    assert not missing
    # spatial transforms move the mask with the image; intensity ones touch the image only
    for cls in (RandFlipd, RandRotated):
        assert set(by_type[cls].keys) == {"image", "mask"}
    assert by_type[RandFlipd].flipper.spatial_axis == 0  # left/right (H = X)
    for cls in wanted:
        if cls not in (RandFlipd, RandRotated):
            assert tuple(by_type[cls].keys) == ("image",), cls
    # the trainer's augmenter uses this transform
    assert [type(x) for x in RoiAugmenter(0)._with_mask.transforms] == [
        type(x) for x in t.transforms
    ]


def phantom_like_roi(name: str) -> dict[str, np.ndarray]:
    """A stack with every nucleus class of the ROI as a block (labels 0..C-1)."""
    n = ROI_BY_NAME[name].num_classes
    rng = np.random.default_rng(5)
    image = rng.normal(50, 5, (6, 24, 24)).astype(np.float32)
    mask = np.zeros((6, 24, 24), np.int64)
    for c in range(1, n):
        mask[1:5, 3 + 4 * (c - 1) : 6 + 4 * (c - 1), 8:16] = c
    image[mask > 0] += 100
    return {"image": np.clip(image, 0, 255), "mask": mask}


def test_augmented_roi_differs_and_mask_keeps_valid_labels():
    rois = {name: phantom_like_roi(name) for name in ROI_NAMES}
    aug = RoiAugmenter(seed=11)
    mask_moved = 0
    for key in range(8):
        out = aug(rois, key=key)
        for name in ROI_NAMES:
            src, got = rois[name], out[name]
            assert got["image"].shape == src["image"].shape
            assert got["mask"].shape == src["mask"].shape and got["mask"].dtype == np.int64
            assert 0.0 <= got["image"].min() and got["image"].max() <= 255.0
            labels = set(np.unique(got["mask"]).tolist())
            assert labels <= set(range(ROI_BY_NAME[name].num_classes)), (name, labels)
            assert labels - {0}  # the nuclei are not lost by the spatial transforms
            mask_moved += not np.array_equal(got["mask"], src["mask"])
    first, again = aug(rois, key=0), aug(rois, key=0)  # fixed seed and key: reproducible
    for n in ROI_NAMES:
        np.testing.assert_array_equal(first[n]["image"], again[n]["image"])
        np.testing.assert_array_equal(first[n]["mask"], again[n]["mask"])
    assert any(not np.array_equal(first[n]["image"], rois[n]["image"]) for n in ROI_NAMES)
    assert mask_moved > 0  # a mirror/rotation moved some mask (with its image)


# ---------------------------------------------------------------- 8. SE-ResNet block
def test_seres10_squeeze_excitation_is_on_the_residual_branch():
    from mrn_engine.models.seres import SEBasicBlock, SEResNet10Trunk

    trunk = SEResNet10Trunk((32, 32, 64, 64)).eval()  # SE reduction 16 needs >= 32 channels
    blocks = list(trunk.stages)
    assert len(blocks) == 4 and all(isinstance(b, SEBasicBlock) for b in blocks)
    first = blocks[0]
    assert first.block.downsample is None  # identity shortcut (32 -> 32 channels, stride 1)
    # an SE gate shut to 0 silences the residual branch: the block passes relu(x) through
    # (with the SE after the sum, as before, the output would be 0)
    with torch.no_grad():
        last_fc = [m for m in first.se.modules() if isinstance(m, nn.Linear)][-1]
        last_fc.weight.zero_()
        last_fc.bias.fill_(-1e4)
    x = torch.randn(2, 32, 3, 6, 6)
    torch.testing.assert_close(first(x), torch.relu(x), rtol=0, atol=1e-6)
    # and an open gate (1) gives the plain MONAI basic block
    with torch.no_grad():
        last_fc.bias.fill_(1e4)
    torch.testing.assert_close(first(x), first.block(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 9. bundle.json lock
def test_parallel_fold_updates_of_bundle_json_are_not_lost(tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "bundle.json").write_text(json.dumps({"format": 1, "weights": {}}))
    real_sha = bundle_mod.file_sha256

    def slow_sha(path):  # fold 0's process is slow between reading and writing bundle.json
        if threading.current_thread().name == "fold0":
            time.sleep(0.6)
        return real_sha(path)

    monkeypatch.setattr(bundle_mod, "file_sha256", slow_sha)
    started = threading.Event()
    errors: list[BaseException] = []

    def fold(k: int) -> None:
        try:
            if k == 1:
                started.wait(5)
                time.sleep(0.15)  # fold 0 is inside its update by now
            d = out / f"fold_{k}"
            d.mkdir()
            (d / "model.safetensors").write_bytes(f"weights {k}".encode())
            if k == 0:
                started.set()
            bundle_mod.update_bundle_weights(out)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=fold, args=(k,), name=f"fold{k}") for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    info = json.loads((out / "bundle.json").read_text())
    assert sorted(info["weights"]) == ["fold_0", "fold_1"]
    for k in (0, 1):
        assert info["weights"][f"fold_{k}"] == real_sha(out / f"fold_{k}" / "model.safetensors")
    assert info["format"] == 1 and (out / bundle_mod.LOCK_FILE).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".bundle.json.")]  # no temp files


def test_bundle_lock_without_fcntl_still_updates(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_mod, "fcntl", None)
    out = tmp_path / "bundle"
    (out / "fold_0").mkdir(parents=True)
    (out / "bundle.json").write_text(json.dumps({"weights": {}}))
    (out / "fold_0" / "model.safetensors").write_bytes(b"w")
    info = bundle_mod.update_bundle_weights(out)
    assert list(info["weights"]) == ["fold_0"]
    assert not (out / bundle_mod.LOCK_FILE).exists()


def test_train_fold_refuses_an_empty_pretraining_stage(tmp_path):
    cfg = small_model_cfg(arch="seres10", use_moco=False).replace(
        train={"pretrain_epochs": 1, "epochs": 1, "device": "cpu"}
    )
    obj = MRNObjective(cfg, pretrained=False)
    ds = RoiStackDataset([], {}, lambda c: {})
    with pytest.raises(ConfigError, match="no pretraining objective"):
        train_fold(obj, ds, None, cfg, tmp_path / "f", progress=False)
    assert not (tmp_path / "f").exists()
