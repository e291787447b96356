"""mSupMoCo (EMA teacher, per-class FIFO banks, Eq. 8 loss) and the training losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mrn_engine.config import ModelConfig, get_preset
from mrn_engine.data.labels import ROI_BY_NAME
from mrn_engine.errors import ConfigError
from mrn_engine.models import (
    CategoryMemoryBank,
    MRNOutput,
    MSupMoCo,
    PlainStep,
    build_model,
    build_training_wrapper,
    compute_losses,
    param_groups,
    supervised_contrastive_loss,
    weighted_seg_loss,
)

SLICES = {"nm_sn": 2, "qsm_bg": 2, "qsm_midbrain": 2, "qsm_dentate": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_run(**model):
    cfg = get_preset("cpu-tiny").replace(roi={"image_size": 28, "slices": dict(SLICES)})
    return cfg.replace(model=model)


def make_batch(cfg, labels=(0, 1, 1)):
    g = torch.Generator().manual_seed(3)
    b, s = len(labels), cfg.roi.image_size
    return {
        "images": {n: torch.rand(b, k, s, s, generator=g) * 255 for n, k in cfg.roi.slices.items()},
        "masks": {
            n: torch.randint(0, ROI_BY_NAME[n].num_classes, (b, k, s, s), generator=g)
            for n, k in cfg.roi.slices.items()
        },
        "label": torch.tensor(labels),
    }


def test_ema_update_exact():
    cfg = tiny_run(moco_momentum=0.9)
    wrapper = MSupMoCo(build_model(cfg), cfg.model)
    with torch.no_grad():
        for p in wrapper.model.parameters():
            p.add_(torch.randn_like(p))  # student != teacher
        for p in wrapper.projection.parameters():
            p.mul_(2.0)
    student = [
        p.detach().clone() for p in [*wrapper.model.parameters(), *wrapper.projection.parameters()]
    ]
    teacher = [
        p.detach().clone()
        for p in [*wrapper.teacher.parameters(), *wrapper.teacher_projection.parameters()]
    ]
    wrapper.momentum_update()
    after = [*wrapper.teacher.parameters(), *wrapper.teacher_projection.parameters()]
    assert len(after) == len(student) == len(teacher)
    for t_new, t_old, s in zip(after, teacher, student, strict=True):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s, atol=1e-6, rtol=1e-6)
        assert not t_new.requires_grad
    # and the student is untouched
    for p, s in zip(
        [*wrapper.model.parameters(), *wrapper.projection.parameters()], student, strict=True
    ):
        assert torch.equal(p, s)


def test_fifo_bank_per_class_with_wraparound():
    bank = CategoryMemoryBank(num_classes=2, size=3, dim=2)

    def key(v):
        return torch.tensor([[float(v), -float(v)]])

    bank.enqueue(torch.cat([key(1), key(2), key(10)]), torch.tensor([0, 0, 1]))
    assert bank.ptr.tolist() == [2, 1] and bank.count.tolist() == [2, 1]
    assert bank.keys[0, :2, 0].tolist() == [1.0, 2.0] and bank.keys[1, 0, 0] == 10.0
    bank.enqueue(torch.cat([key(3), key(4)]), torch.tensor([0, 0]))  # wraps: 4 overwrites 1
    assert bank.keys[0, :, 0].tolist() == [4.0, 2.0, 3.0]
    assert bank.ptr.tolist() == [1, 1] and bank.count.tolist() == [3, 1]
    assert bank.keys[1, :, 0].tolist() == [10.0, 0.0, 0.0]  # class 1 untouched
    bank.enqueue(
        torch.cat([key(v) for v in (5, 6, 7, 8)]), torch.zeros(4, dtype=torch.long)
    )  # > size
    assert bank.keys[0, :, 0].tolist() == [8.0, 6.0, 7.0]  # the last 3, written from ptr 1 on
    assert bank.ptr.tolist() == [1, 1]
    keys, labels = bank.entries()
    assert labels.tolist() == [0, 0, 0, 1] and keys.shape == (4, 2)
    assert keys[3, 0] == 10.0


def hand_loss(q, labels, keys, key_labels, tau):
    """Eq. 8 with explicit loops over anchors, positives and negatives."""
    total, anchors = 0.0, 0
    for i in range(len(q)):
        sims = [sum(a * b for a, b in zip(q[i], k, strict=True)) / tau for k in keys]
        pos = [s for s, lab in zip(sims, key_labels, strict=True) if lab == labels[i]]
        neg = [s for s, lab in zip(sims, key_labels, strict=True) if lab != labels[i]]
        if not pos:
            continue
        terms = [math.log(math.exp(p) / (math.exp(p) + sum(math.exp(n) for n in neg))) for p in pos]
        total += -sum(terms) / len(pos)
        anchors += 1
    return total / anchors


def test_contrastive_loss_equals_hand_value():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    keys = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    labels, key_labels = [0, 1, 1], [0, 0, 1, 1, 1]
    got = supervised_contrastive_loss(q, torch.tensor(labels), keys, torch.tensor(key_labels), 0.1)
    expected = hand_loss(q.tolist(), labels, keys.tolist(), key_labels, 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # anchors without positives are skipped; no negatives -> log 1 = 0
    only0 = supervised_contrastive_loss(
        q[:1], torch.tensor([0]), keys[:2], torch.tensor([0, 0]), 0.1
    )
    assert only0.item() == pytest.approx(0.0, abs=1e-6)


def test_step_fills_banks_and_trains_student_only():
    cfg = tiny_run(moco_bank_size=4)
    wrapper = build_training_wrapper(build_model(cfg), cfg)
    assert isinstance(wrapper, MSupMoCo)
    wrapper.train()
    assert not wrapper.teacher.training and wrapper.model.training
    batch = make_batch(cfg, labels=(0, 1, 1))
    out = wrapper.step(batch)
    assert (
        isinstance(out, MRNOutput) and out.contrastive is not None and out.contrastive.requires_grad
    )
    assert wrapper.bank.count.tolist() == [1, 2]
    compute_losses(out, batch, "pretrain", cfg.model)["total"].backward()
    assert all(p.grad is None for p in wrapper.teacher.parameters())
    assert all(p.grad is not None for p in wrapper.projection.parameters())
    wrapper.step(batch)
    wrapper.step(batch)
    assert wrapper.bank.count.tolist() == [3, 4] and wrapper.bank.ptr.tolist() == [3, 2]
    groups = {g["name"]: g for g in param_groups(wrapper, cfg.train)}
    assert (
        groups["backbone"]["lr"] == cfg.train.lr_backbone
        and groups["head"]["lr"] == cfg.train.lr_head
    )
    n_groups = len(groups["backbone"]["params"]) + len(groups["head"]["params"])
    n_trainable = len([p for p in wrapper.parameters() if p.requires_grad])
    assert n_groups == n_trainable  # every trainable parameter in exactly one group


def test_plain_step_without_moco():
    """mSupMoCo off (paper Table 2/8): no teacher, projection or bank; gradients still reach
    every student parameter through the classification + segmentation loss."""
    cfg = tiny_run(use_moco=False)
    model = build_model(cfg)
    wrapper = build_training_wrapper(model, cfg)
    assert isinstance(wrapper, PlainStep)
    assert [id(p) for p in wrapper.parameters()] == [id(p) for p in model.parameters()]
    assert len(list(wrapper.buffers())) == len(list(model.buffers()))  # no memory bank
    batch = make_batch(cfg)
    out = wrapper.step(batch)
    assert out.contrastive is None
    losses = compute_losses(out, batch, "train", cfg.model)
    assert losses["con"].item() == 0.0
    torch.testing.assert_close(
        losses["total"], losses["cls"] + cfg.model.lambda_seg * losses["seg"]
    )
    losses["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.res.patchnizer.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    groups = {g["name"]: g["params"] for g in param_groups(wrapper, cfg.train)}
    assert sorted(id(p) for g in groups.values() for p in g) == sorted(
        id(p) for p in model.parameters() if p.requires_grad
    )


def test_weighted_seg_loss_equals_hand_value():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 1, 2, 2, generator=g)
    target = torch.tensor([[[[0, 0], [1, 2]]], [[[0, 0], [0, 0]]]])  # sample 2: a single class
    got = weighted_seg_loss(logits, target)
    per_sample = []
    for b in range(2):
        voxels = [(0, i, j) for i in range(2) for j in range(2)]
        counts = {c: sum(1 for v in voxels if target[b][v] == c) for c in range(3)}
        w = {c: 1.0 - counts[c] / len(voxels) for c in range(3)}
        if all(w[int(target[b][v])] == 0 for v in voxels):
            w = {c: 1.0 for c in range(3)}
        num = den = 0.0
        for v in voxels:
            y = int(target[b][v])
            row = [logits[b, c][v].item() for c in range(3)]
            ce = -row[y] + math.log(sum(math.exp(r) for r in row))
            num += w[y] * ce
            den += w[y]
        per_sample.append(num / den)
    assert got.item() == pytest.approx(sum(per_sample) / 2, rel=1e-5)


def test_compute_losses_stages():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    seg = {"nm_sn": torch.randn(2, 2, 1, 4, 4)}
    out = MRNOutput(
        logits=logits,
        roi_tokens={},
        seg_logits=seg,
        patient=torch.zeros(2, 4),
        contrastive=torch.tensor(3.0),
    )
    batch = {"label": torch.tensor([0, 1]), "masks": {"nm_sn": torch.randint(0, 2, (2, 1, 4, 4))}}
    cfg = ModelConfig(lambda_seg=0.5, lambda_con=0.2)
    train = compute_losses(out, batch, "train", cfg)
    pre = compute_losses(out, batch, "pretrain", cfg)
    cls = F.cross_entropy(logits, batch["label"])
    seg_value = weighted_seg_loss(seg["nm_sn"], batch["masks"]["nm_sn"])
    torch.testing.assert_close(train["cls"], cls)
    torch.testing.assert_close(train["seg"], seg_value)
    torch.testing.assert_close(train["total"], cls + 0.5 * seg_value + 0.2 * 3.0)
    torch.testing.assert_close(pre["total"], 0.5 * seg_value + 0.2 * 3.0)
    no_masks = compute_losses(out, {"label": batch["label"]}, "train", cfg)
    assert no_masks["seg"].item() == 0.0
    with pytest.raises(ConfigError, match="stage"):
        compute_losses(out, batch, "finetune", cfg)


# ------------------------------------------------------------------ EMA momentum from the run length
def test_momentum_half_life_is_the_stated_fraction_of_the_run():
    from mrn_engine.models.moco import momentum_for_steps

    for half_life, steps in ((0.05, 156), (0.05, 36000), (0.5, 10)):
        m = momentum_for_steps(half_life, steps)
        assert 0 < m < 1
        assert m ** (half_life * steps) == pytest.approx(0.5, rel=1e-9)
    # the demo's ~156 steps: the teacher forgets its random start (0.999 would keep 86 % of it)
    assert momentum_for_steps(0.05, 156) ** 156 < 1e-5 < 0.999**156
    with pytest.raises(ValueError, match="half-life"):
        momentum_for_steps(0.0, 100)


def test_wrapper_plans_its_momentum_only_with_a_half_life():
    fixed_cfg = tiny_run(moco_momentum=0.999, moco_half_life=None)
    fixed = MSupMoCo(build_model(fixed_cfg), fixed_cfg.model)
    assert fixed.half_life is None and fixed.plan_steps(100) == 0.999
    cfg = tiny_run(moco_half_life=0.1)
    planned = MSupMoCo(build_model(cfg), cfg.model)
    assert planned.plan_steps(40) == pytest.approx(0.5 ** (1 / 4))
    assert planned.momentum == pytest.approx(0.5 ** (1 / 4))
    assert get_preset("paper-vitb").model.moco_half_life is None  # the paper keeps 0.999
    assert get_preset("paper-vitb").model.moco_momentum == 0.999
    assert get_preset("cpu-tiny").model.moco_half_life == 0.05


def test_key_spread_tells_a_collapsed_bank_from_a_separated_one():
    from mrn_engine.models.moco import key_spread

    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    collapsed = base.repeat(6, 1) + 1e-3 * torch.randn(6, 8, generator=g)
    c = key_spread(collapsed, labels)
    assert c["key_cos_within"] > 0.99 and c["key_cos_between"] > 0.99
    centres = torch.tensor([[1.0] + [0.0] * 7, [-1.0] + [0.0] * 7])
    separated = centres[labels] + 0.1 * torch.randn(6, 8, generator=g)
    s = key_spread(separated, labels)
    assert s["key_cos_within"] > 0.9 and s["key_cos_between"] < -0.9
    one_class = key_spread(collapsed[:3], labels[:3])
    assert math.isnan(one_class["key_cos_between"]) and one_class["key_cos_within"] > 0.99


def test_training_logs_key_spread_and_plans_the_momentum(phantom_root, tmp_path):
    from mrn_engine.models.moco import momentum_for_steps
    from mrn_engine.training import cv
    from mrn_engine.training.objective import MRNObjective

    cfg = tiny_run().replace(train={"pretrain_epochs": 1, "epochs": 1, "folds": 2})
    seen: list[int] = []
    original = MRNObjective.plan_steps

    def spy(self, planned_steps):
        seen.append(planned_steps)
        original(self, planned_steps)
        assert self.wrapper.momentum == momentum_for_steps(0.05, planned_steps)

    MRNObjective.plan_steps = spy
    try:
        cv.train_bundle(
            phantom_root, tmp_path / "b", cfg, folds=[0], cache_dir=tmp_path / "c", progress=False
        )
    finally:
        MRNObjective.plan_steps = original
    # 8 cases, 2 folds: 4 training cases, batch 4 -> 1 step per epoch, 2 epochs
    assert seen == [2]
    import csv

    rows = list(csv.DictReader((tmp_path / "b" / "fold_0" / "metrics.csv").open()))
    assert len(rows) == 2
    for r in rows:
        within, between = float(r["key_cos_within"]), float(r["key_cos_between"])
        assert -1 <= between <= 1 and -1 <= within <= 1
