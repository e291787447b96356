"""``mrn pretrain``: descriptors, a tiny run (weights + card, resume), loading by ``mrn train``,
and the ``anatcl3d`` baseline (model, pretraining, ``mrn compare`` row)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mrn_engine.badinput.cases import write_case
from mrn_engine.cli import cli
from mrn_engine.config import get_preset
from mrn_engine.data.cases import load_case
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import ConfigError, InputDataError, WeightsError
from mrn_engine.models import build_model
from mrn_engine.pretraining.cohort import load_pretrain_cohort
from mrn_engine.pretraining.descriptors import (
    REGIONS,
    case_descriptors,
    descriptor_names,
    region_groups,
    roi_groups,
    standardise,
)
from mrn_engine.pretraining.loop import (
    PretrainOptions,
    _comparable,
    card_path,
    checkpoint_dir,
    pretrain,
    pretrained_weights,
)
from mrn_engine.rois.cache import RoiCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"image_size": 28, "slices": {"nm_sn": 2, "qsm_bg": 3, "qsm_midbrain": 2, "qsm_dentate": 2}}


@pytest.fixture(scope="module")
def cohort(unlabelled_cases):
    return unlabelled_cases


def small_cfg(**model):
    return get_preset("cpu-tiny").replace(roi=dict(SMALL), model=model)


def test_descriptor_pass_fills_the_roi_cache_with_the_same_crops(cohort, tmp_path):
    """Each case is read once: its crops are cached while its descriptors are measured."""
    roi = small_cfg().roi
    cache = RoiCache(tmp_path / "cache")
    pool = load_pretrain_cohort(cohort, roi, progress=False, roi_cache=cache)
    assert cache.misses == len(pool.files) == 6 and cache.hits == 0
    files = pool.files["RJPD_003"]
    cached = cache.get_or_compute(files, roi)
    assert cache.hits == 1 and cache.misses == 6  # no new read
    fresh = RoiCache(tmp_path / "fresh").get_or_compute(files, roi)
    for name, crop in fresh.items():
        np.testing.assert_array_equal(cached[name].image, crop.image)
        np.testing.assert_array_equal(cached[name].mask, crop.mask)


# ---------------------------------------------------------------- descriptors
def test_descriptors_of_a_case_and_asymmetry_sign(cohort):
    case = load_case(cohort / "RJPD_000")
    d = case_descriptors(case)
    assert set(d) == set(descriptor_names())
    for region in REGIONS:
        assert d[f"{region}.volume"] > 0
        assert d[f"{region}.asym_volume"] == pytest.approx(0.0)  # symmetric synthetic masks
    assert d["NM_SN.mean"] > 10  # SN is ~45 reference SDs above the reference region
    assert d["QSM_caudate.mean"] == pytest.approx(0.08, abs=0.01)  # 80 ppb -> ppm
    # shrink the LEFT nuclei (even QSM labels, NM label 2): right > left -> positive asymmetry
    q = case.qsm_mask.array.copy()
    n = case.nm_mask.array.copy()
    left_sn = np.argwhere(q == 12)
    drop = tuple(left_sn[: len(left_sn) // 2].T)
    q[drop] = 0
    n[drop] = 0
    smaller = dataclasses.replace(
        case,
        qsm_mask=dataclasses.replace(case.qsm_mask, array=q),
        nm_mask=dataclasses.replace(case.nm_mask, array=n),
    )
    d2 = case_descriptors(smaller)
    n_r, n_l = len(left_sn), len(left_sn) - len(left_sn) // 2  # same size before the cut
    assert d2["QSM_SN.asym_volume"] == pytest.approx((n_r - n_l) / (n_r + n_l))
    assert d2["NM_SN.asym_volume"] > 0
    assert d2["QSM_SN.volume"] < d["QSM_SN.volume"]
    assert d2["QSM_caudate.asym_volume"] == pytest.approx(0.0)


def test_standardise_and_region_groups():
    table = {"a": {"x.volume": 1.0, "x.mean": 5.0}, "b": {"x.volume": 3.0}, "c": {"x.volume": 5.0}}
    std = standardise(table, ["x.volume", "x.mean", "age"])
    assert std.case_ids == ["a", "b", "c"]
    assert std.means[0] == pytest.approx(3.0) and std.sds[0] == pytest.approx(math.sqrt(8 / 3))
    assert np.allclose(std.matrix[:, 0].mean(), 0) and np.allclose(std.matrix[:, 0].std(), 1)
    assert std.matrix[1, 1] == 0 and std.missing == {"x.mean": 2, "age": 3}  # imputed mean
    assert std.sds[1] == 1.0  # one known value: no spread
    assert region_groups(["r.a", "r.b", "s.a", "age"]) == {"r": [0, 1], "s": [2], "age": [3]}


def test_ages_table(tmp_path):
    from mrn_engine.errors import InputDataError
    from mrn_engine.pretraining.cohort import read_ages

    f = tmp_path / "ages.csv"
    f.write_text("case_id,age\nRJPD_000,61.5\nRJPD_001,\nRJPD_002,n/a\n")
    assert read_ages(f) == {"RJPD_000": 61.5}  # unknown ages are left out (imputed later)
    assert descriptor_names(with_age=True)[-1] == "age"
    (tmp_path / "bad.csv").write_text("case,years\nRJPD_000,60\n")
    with pytest.raises(InputDataError, match="bad.csv"):
        read_ages(tmp_path / "bad.csv")


# ---------------------------------------------------------------- a tiny run
def test_pretrain_resume_card_and_train_loads_the_weights(cohort, tmp_path):
    cfg = small_cfg()
    opts = PretrainOptions(epochs=2, batch_size=4, device="cpu", variant="local", sigma=2.0)
    cache = tmp_path / "cache"
    full = tmp_path / "full" / "w.safetensors"
    card = pretrain(cohort, full, cfg, opts, cache_dir=cache, progress=True)  # tqdm lines too
    assert card["finished"] and full.is_file() and card_path(full).is_file()

    part = tmp_path / "part" / "w.safetensors"
    stopped = pretrain(cohort, part, cfg, opts, cache_dir=cache, stop_after=1, progress=False)
    assert not stopped["finished"] and not part.exists()
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(cohort, part, cfg, opts, cache_dir=cache, progress=False)
    with pytest.raises(ConfigError, match="other options"):
        other = dataclasses.replace(opts, sigma=3.0)
        pretrain(cohort, part, cfg, other, cache_dir=cache, resume=True, progress=False)
    resumed = pretrain(cohort, part, cfg, opts, cache_dir=cache, resume=True, progress=False)
    assert resumed["finished"]
    assert [c["loss"] for c in resumed["loss_curve"]] == pytest.approx(
        [c["loss"] for c in card["loss_curve"]], rel=1e-5
    )
    a, b = load_file(str(full)), load_file(str(part))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (checkpoint_dir(part) / "last.json").is_file()

    written = json.loads(card_path(full).read_text())
    assert written["preset"] == "cpu-tiny" and written["key_layout"] == "timm"
    assert written["augmentation"].startswith("geometric")  # the default views
    with pytest.raises(ConfigError, match="--augment"):
        pretrain(cohort, tmp_path / "x.safetensors", cfg, dataclasses.replace(opts, augment="x"))
    assert written["loss"]["variant"] == "local" and written["loss"]["sigma"] == 2.0
    assert written["descriptors"]["names"] == descriptor_names()
    assert len(written["descriptors"]["means"]) == len(descriptor_names())
    assert written["data"]["n_cases"] == 6 and written["data"]["labels_read"] is False
    assert len(written["data"]["sha256"]) == 64 and written["seed"] == 1
    assert [c["epoch"] for c in written["loss_curve"]] == [1, 2]
    for c in written["loss_curve"]:  # the floor bounds the loss; log(2B - 1) = collapsed
        assert 0 <= c["floor"] <= c["uniform"] == pytest.approx(math.log(7))
        assert c["loss"] >= c["floor"] - 1e-4

    # mrn train --weights FILE: the model factory loads it as DINOv2 weights
    model = build_model(small_cfg(backbone_weights=str(full)))
    vit = model.res.patchnizer.vit
    assert set(a) == set(vit.state_dict())
    assert all(torch.equal(vit.state_dict()[k], a[k]) for k in a)
    assert model.weights_provenance["sha256"] == written["weights_sha256"]
    assert model.weights_provenance["format"] == "timm"
    prov_card = model.weights_provenance["card"]  # the card's provenance rides along
    assert prov_card["matches"] is True and prov_card["loss"]["variant"] == "local"
    assert prov_card["data_sha256"] == written["data"]["sha256"]
    # a second stage may start from these (or DINOv2) weights instead of random init
    again = dataclasses.replace(opts, epochs=1)
    cont = pretrain(
        cohort,
        tmp_path / "c" / "w.safetensors",
        small_cfg(backbone_weights=str(full)),
        again,
        cache_dir=cache,
        progress=False,
    )
    assert (
        cont["init"]["sha256"] == written["weights_sha256"]
        and written["init"]["format"] == "random-init"
    )
    torch.manual_seed(1)
    scratch = build_model(small_cfg()).res.patchnizer.vit.state_dict()
    assert any(not torch.equal(scratch[k], a[k]) for k in a if k.endswith("weight"))


def test_several_folders_one_cohort_and_a_finished_run_is_reused(cohort, tmp_path):
    """Two cohorts that both hold RJPD_000..: one pool, ids prefixed by the folder's name."""
    other = tmp_path / "second"
    for i in range(2):
        write_case(other / f"RJPD_{i:03d}", seed=100 + i, pd=i % 2)
    pool = load_pretrain_cohort([cohort, other], small_cfg().roi, progress=False)
    assert len(pool.files) == 8 and f"{cohort.name}/RJPD_000" in pool.files
    assert "second/RJPD_001" in pool.files and pool.roots == [cohort, other]
    alone = load_pretrain_cohort(cohort, small_cfg().roi, progress=False)
    assert sorted(alone.files) == [f"RJPD_{i:03d}" for i in range(6)]  # one folder: plain ids
    same_name = tmp_path / "x" / cohort.name
    write_case(same_name / "RJPD_000", seed=7, pd=0)
    with pytest.raises(InputDataError, match="distinct names"):
        load_pretrain_cohort([cohort, same_name], small_cfg().roi, progress=False)

    w = tmp_path / "pool" / "w.safetensors"
    opts = PretrainOptions(epochs=1, batch_size=4, device="cpu")
    cfg = small_cfg()
    kw = {"cache_dir": tmp_path / "cache", "resume": True, "progress": False}
    assert pretrained_weights([cohort, other], w, cfg, opts, **kw) == w
    card = json.loads(card_path(w).read_text())
    assert card["data"]["n_cases"] == 8 and len(card["data"]["roots"]) == 2
    stamp = w.stat().st_mtime_ns
    pretrained_weights([cohort, other], w, cfg, opts, **kw)  # finished, same options: reused
    assert w.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="other options"):  # not silently reused
        pretrained_weights([cohort, other], w, cfg, dataclasses.replace(opts, sigma=2.0), **kw)


# ---------------------------------------------------------------- anatcl3d
def test_anatcl3d_builds_runs_and_loads_its_pretrained_trunk(cohort, tmp_path):
    cfg = get_preset("cpu-tiny").replace(model={"arch": "anatcl3d"})
    model = build_model(cfg)
    s = cfg.roi.image_size
    x = {n: torch.rand(2, cfg.roi.slices[n], s, s) * 255 for n in ROI_NAMES}
    out = model(x)
    assert out.logits.shape == (2, 2) and out.seg_logits is None
    assert out.patient.shape == (2, 4 * 128) and torch.isfinite(out.logits).all()
    groups = model.lr_groups()
    assert groups["backbone"] and groups["head"]

    small = small_cfg(arch="anatcl3d")
    w = tmp_path / "r3d.safetensors"
    opts = PretrainOptions(arch="anatcl3d", epochs=1, batch_size=4, device="cpu")
    card = pretrain(cohort, w, small, opts, cache_dir=tmp_path / "cache", progress=False)
    assert card["key_layout"] == "mrn-anatcl3d-trunk" and card["backbone"] == "resnet18-3d"
    loaded = build_model(small.replace(model={"backbone_weights": str(w)}))
    assert loaded.weights_provenance["sha256"] == card["weights_sha256"]
    state = load_file(str(w))
    assert all(torch.equal(loaded.trunk.state_dict()[k], state[k]) for k in state)
    vit_file = tmp_path / "vit.safetensors"
    pretrain(
        cohort,
        vit_file,
        small_cfg(),
        PretrainOptions(epochs=1, batch_size=4, device="cpu"),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    with pytest.raises(WeightsError, match="3D ResNet-18"):
        build_model(small.replace(model={"backbone_weights": str(vit_file)}))


@pytest.mark.slow
def test_compare_includes_the_anatcl3d_row(cohort, tmp_path):
    from mrn_engine.workflows.compare import compare_variants

    labelled = tmp_path / "labelled"
    for i in range(6):
        write_case(labelled / f"RJPD_{i:03d}", seed=i, pd=i % 2)
    (labelled / "train_cases.csv").write_text("".join(f"RJPD_{i:03d},{i % 2}\n" for i in range(6)))
    base = small_cfg().replace(
        train={"folds": 2, "pretrain_epochs": 0, "epochs": 1, "batch_size": 2, "device": "cpu"}
    )
    rows = compare_variants(
        labelled,
        tmp_path / "cmp",
        base,
        ["anatcl3d"],
        progress=False,
        anatcl=PretrainOptions(arch="anatcl3d", epochs=1, batch_size=4),
    )
    assert [r["variant"] for r in rows] == ["anatcl3d"] and rows[0]["n_oof"] == 6
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| AnatCL 3D ResNet-18 |" in table and "pretrained first with AnatCL" in table
    weights = tmp_path / "cmp" / "anatcl3d_pretrain" / "anatcl3d.safetensors"
    assert json.loads(card_path(weights).read_text())["finished"]
    bundle = json.loads((tmp_path / "cmp" / "anatcl3d" / "bundle.json").read_text())
    assert (
        bundle["weights_provenance"]["sha256"]
        == json.loads(card_path(weights).read_text())["weights_sha256"]
    )


@pytest.mark.slow
def test_roi_groups_follow_the_rois():
    names = descriptor_names(with_age=True)
    groups = roi_groups(names)
    assert list(groups) == list(ROI_NAMES)
    picked = {r: {names[i].split(".")[0] for i in g} for r, g in groups.items()}
    assert picked["nm_sn"] == {"NM_SN", "age"}
    assert picked["qsm_midbrain"] == {"QSM_STN", "QSM_SN", "QSM_RN", "age"}
    assert picked["qsm_bg"] == {
        "QSM_caudate", "QSM_putamen", "QSM_globus_pallidus", "QSM_thalamus", "age"
    }  # fmt: skip
    assert picked["qsm_dentate"] == {"QSM_dentate", "age"}
    every = sorted(i for g in groups.values() for i in g if names[i] != "age")
    assert every == [i for i, n in enumerate(names) if n != "age"]  # each descriptor once


def test_roi_variant_pretrains_one_projection_per_roi_and_train_loads_it(cohort, tmp_path):
    from mrn_engine.pretraining.encoder import build_embedder

    cfg = small_cfg()
    emb = build_embedder(cfg, "vit", per_roi=True)
    x = {n: torch.rand(3, cfg.roi.slices[n], 28, 28) * 255 for n in ROI_NAMES}
    z = emb(x)
    assert z.shape == (len(ROI_NAMES), 3, cfg.model.proj_dim)
    assert torch.allclose(z.norm(dim=-1), torch.ones(len(ROI_NAMES), 3), atol=1e-5)
    opts = PretrainOptions(epochs=1, batch_size=4, device="cpu", variant="roi")
    out = tmp_path / "roi.safetensors"
    card = pretrain(cohort, out, cfg, opts, cache_dir=tmp_path / "c", progress=False)
    assert card["loss"]["variant"] == "roi" and card["finished"]
    last = card["loss_curve"][-1]
    assert 0 <= last["floor"] <= last["uniform"] and math.isfinite(last["loss"])
    model = build_model(small_cfg(backbone_weights=str(out)))  # the ViT only, timm layout
    state = load_file(str(out))
    vit = model.res.patchnizer.vit.state_dict()
    assert set(state) == set(vit) and all(torch.equal(vit[k], state[k]) for k in state)


def test_a_sized_tiny_vit_pretrains_and_only_its_own_size_loads_it(cohort, tmp_path):
    """``tiny-WxD``: the card names it; MRN of that size loads the file, plain ``tiny`` refuses."""
    cfg = small_cfg(backbone="tiny-32x2", embed_dim=32)
    out = tmp_path / "w32.safetensors"
    opts = PretrainOptions(epochs=1, batch_size=4, device="cpu", variant="roi")
    card = pretrain(cohort, out, cfg, opts, cache_dir=tmp_path / "c", progress=False)
    assert card["backbone"] == "tiny-32x2" and card["finished"]
    model = build_model(small_cfg(backbone="tiny-32x2", embed_dim=32, backbone_weights=str(out)))
    vit = model.res.patchnizer.vit
    assert (vit.embed_dim, len(vit.blocks)) == (32, 2)
    state = load_file(str(out))
    assert all(torch.equal(vit.state_dict()[k], state[k]) for k in state)
    with pytest.raises(WeightsError, match="w32.safetensors"):
        build_model(small_cfg(backbone_weights=str(out)))  # 64 x 4 "tiny"


def test_mrn_pretrain_cli(cohort, tmp_path):
    out = tmp_path / "w.safetensors"
    args = ["pretrain", str(cohort), "--out", str(out), "--epochs", "1", "--batch-size", "4"]
    args += ["--device", "cpu", "--threads", "1", "--quiet", "--cache", str(tmp_path / "c")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert out.is_file() and "card:" in res.output
    # the ViT's default kernel is the per-ROI one (docs/results.md), anatcl3d keeps global
    assert json.loads(card_path(out).read_text())["loss"]["variant"] == "roi"
    assert PretrainOptions(arch="anatcl3d").variant == "global"
    assert PretrainOptions(variant="local").variant == "local"
    bad = CliRunner().invoke(cli, ["pretrain", str(cohort), "--out", str(tmp_path / "w.pt")])
    assert bad.exit_code != 0 and ".safetensors" in bad.output
    neg = CliRunner().invoke(cli, args[:4] + ["--distill", "-1", "--quiet"])
    assert isinstance(neg.exception, ConfigError) and "--distill" in str(neg.exception)


def test_self_distillation_learns_and_its_teacher_follows_the_student():
    """The DINO term is learnt on a fixed batch of near-identical cases (far better with the
    heads' input BatchNorm, without which the 30-epoch run sat at log K), its gradient
    reaches the student backbone, and the teacher moves by EMA toward the student."""
    from mrn_engine.pretraining.distill import SelfDistillation
    from mrn_engine.pretraining.encoder import build_embedder

    torch.manual_seed(0)
    cfg = small_cfg()
    emb = build_embedder(cfg, "vit", per_roi=True)
    k = 32
    dist = SelfDistillation(emb, emb.feature_dim, len(ROI_NAMES), prototypes=k, momentum=0.9)
    base = torch.rand(1, 1, 28, 28) * 255  # cases that differ by a few grey levels only
    shift = torch.rand(4, 1, 1, 1) * 8
    views = {
        n: (base + shift).expand(4, cfg.roi.slices[n], 28, 28).repeat(2, 1, 1, 1)
        + torch.randn(8, cfg.roi.slices[n], 28, 28)
        for n in ROI_NAMES
    }
    optim = torch.optim.AdamW(
        list(emb.parameters()) + list(dist.student_heads.parameters()), lr=1e-3
    )
    losses = []
    for step in range(40):
        loss = dist.loss(emb.features(views), views)
        optim.zero_grad()
        loss.backward()
        if step == 0:
            assert emb.patchnizer.vit.patch_embed.proj.weight.grad.abs().sum() > 0
            assert all(h.mlp[1].weight.grad is not None for h in dist.student_heads)
        optim.step()
        dist.update_teacher(emb)
        losses.append(loss.item())
    # 0.06 measured; 1.2-1.6 with the heads' input BatchNorm removed
    assert max(losses[-5:]) < 0.5 < math.log(k)
    assert dist.center.abs().sum() > 0  # the centre moved

    teacher_w = dist.teacher.patchnizer.vit.patch_embed.proj.weight
    student_w = emb.patchnizer.vit.patch_embed.proj.weight
    before = teacher_w.clone()
    with torch.no_grad():
        student_w.add_(1.0)
    dist.update_teacher(emb)
    assert torch.allclose(teacher_w, 0.9 * before + 0.1 * student_w, atol=1e-6)
    assert teacher_w.grad is None and not teacher_w.requires_grad


def test_pretrain_with_self_distillation_resumes_exactly_and_records_it(cohort, tmp_path):
    cfg = small_cfg()
    opts = PretrainOptions(epochs=2, batch_size=4, device="cpu", distill=0.5)
    cache = tmp_path / "cache"
    full = tmp_path / "full" / "w.safetensors"
    card = pretrain(cohort, full, cfg, opts, cache_dir=cache, progress=False)
    assert card["loss"]["self_distillation"]["weight"] == 0.5
    assert all(0 < c["distill_loss"] < 10 for c in card["loss_curve"])
    part = tmp_path / "part" / "w.safetensors"
    pretrain(cohort, part, cfg, opts, cache_dir=cache, stop_after=1, progress=False)
    resumed = pretrain(cohort, part, cfg, opts, cache_dir=cache, resume=True, progress=False)
    for key in ("loss", "distill_loss"):  # the teacher and centre came back with the checkpoint
        assert [c[key] for c in resumed["loss_curve"]] == pytest.approx(
            [c[key] for c in card["loss_curve"]], rel=1e-5
        )
    a, b = load_file(str(full)), load_file(str(part))
    assert set(a) == set(build_model(cfg).res.patchnizer.vit.state_dict())  # the ViT only
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    plain = PretrainOptions(epochs=2, batch_size=4, device="cpu")
    assert "distill" not in _comparable(plain)  # older runs' options still match
    with pytest.raises(ConfigError, match="--distill"):
        dataclasses.replace(opts, distill=-1.0).check()
