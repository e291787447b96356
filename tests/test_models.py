"""MRN network: shapes, gradient flow, ablations, ROI masking, presets, save/load."""

from __future__ import annotations

import itertools

import pytest
import torch

from mrn_engine.config import RunConfig, get_preset
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import ConfigError, InputDataError, WeightsError
from mrn_engine.models import (
    MRN,
    SERes10,
    build_model,
    compute_losses,
    load_model,
    save_model,
)
from mrn_engine.models.res import extra_backbone_layers, plain_dpt_layers

SLICES = {"nm_sn": 2, "qsm_bg": 3, "qsm_midbrain": 2, "qsm_dentate": 2}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: one intra-op thread is much faster on the shared 2-core VM (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(preset: str = "cpu-tiny", image: int = 28, **model) -> RunConfig:
    """A preset shrunk to tiny slices for fast tests (model overrides as keywords)."""
    cfg = get_preset(preset).replace(roi={"image_size": image, "slices": dict(SLICES)})
    model.setdefault("allow_random_init", True)
    return cfg.replace(model=model)


def make_batch(cfg: RunConfig, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = cfg.roi.image_size
    images = {n: torch.rand(batch, k, s, s, generator=g) * 255 for n, k in cfg.roi.slices.items()}
    masks = {
        n: torch.randint(0, ROI_BY_NAME[n].num_classes, (batch, k, s, s), generator=g)
        for n, k in cfg.roi.slices.items()
    }
    return {"images": images, "masks": masks, "label": torch.arange(batch) % 2}


def check_output(model, cfg: RunConfig, out, batch: int, with_seg: bool) -> None:
    s = cfg.roi.image_size
    assert out.logits.shape == (batch, 2)
    assert set(out.roi_tokens) == set(ROI_NAMES)
    assert out.patient.shape == (batch, 4 * model.token_dim)
    # patient = ROI tokens concatenated in ROI_NAMES order
    assert torch.equal(out.patient, torch.cat([out.roi_tokens[n] for n in ROI_NAMES], 1))
    if with_seg:
        for n in ROI_NAMES:
            assert out.seg_logits[n].shape == (
                batch,
                ROI_BY_NAME[n].num_classes,
                cfg.roi.slices[n],
                s,
                s,
            )
    else:
        assert out.seg_logits is None


def assert_all_grads(model) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(p.grad.abs().sum() > 0 for p in model.res.patchnizer.vit.patch_embed.parameters())


ABLATIONS = {
    "full-local": {},
    "dpt-global": {"dpt_features": "global"},
    "no-ffa (DINOv2+DPT+SFA)": {"use_ffa": False},
    "no-sfa": {"use_sfa": False},
    "no-dpt": {"use_dpt": False},
    "dinov2+dpt": {"use_ffa": False, "use_sfa": False},
    "ffa1-sfa1": {"ffa_depth": 1, "sfa_depth": 1},
    "ffa4-sfa3": {"ffa_depth": 4, "sfa_depth": 3},
    "dinov2-only": {"dinov2_only": True},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_shapes_and_gradient_flow(name):
    cfg = small_cfg(**ABLATIONS[name])
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_batch(cfg)
    out = model(batch["images"])
    with_seg = cfg.model.use_dpt and not cfg.model.dinov2_only
    check_output(model, cfg, out, 2, with_seg)
    losses = compute_losses(out, batch, "train", cfg.model)
    assert (losses["seg"] > 0) == with_seg
    losses["total"].backward()
    assert_all_grads(model)


def test_dpt_matches_slice_size_not_multiple_of_patch():
    cfg = small_cfg(image=32)  # 32 / 14 -> 2 x 2 patch grid, DPT output back to 32 x 32
    model = build_model(cfg)
    out = model(make_batch(cfg, batch=1)["images"])
    assert out.seg_logits["qsm_bg"].shape == (1, 5, 3, 32, 32)


def test_dpt_token_source_layers():
    assert plain_dpt_layers(12) == [3, 6, 9, 11]
    assert plain_dpt_layers(4) == [1, 2, 3, 3]
    assert extra_backbone_layers(4, 1) == [1]
    assert extra_backbone_layers(12, 0) == []


def test_cpu_tiny_preset_full_training_step():
    cfg = get_preset("cpu-tiny")
    model = build_model(cfg)
    assert isinstance(model, MRN) and model.token_dim == 64
    batch = make_batch(cfg, batch=2)
    out = model(batch["images"])
    check_output(model, cfg, out, 2, True)
    compute_losses(out, batch, "train", cfg.model)["total"].backward()
    assert_all_grads(model)


@pytest.mark.parametrize("preset,dim", [("vits", 384), ("paper-vitb", 768)])
def test_pretrained_presets_build_and_forward(preset, dim):
    cfg = small_cfg(preset, image=28)
    model = build_model(cfg)
    assert model.token_dim == dim
    assert model.res.patchnizer.num_prefix_tokens == 5  # cls + 4 registers
    model.eval()
    with torch.no_grad():
        out = model(make_batch(cfg, batch=1)["images"])
    check_output(model, cfg, out, 1, True)


def test_vits_backward():
    cfg = small_cfg("vits", image=28)
    model = build_model(cfg)
    batch = make_batch(cfg, batch=1)
    compute_losses(model(batch["images"]), batch, "train", cfg.model)["total"].backward()
    assert_all_grads(model)


def test_pretrained_preset_without_weights_refused():
    cfg = small_cfg("vits", allow_random_init=False)
    with pytest.raises(WeightsError, match="backbone_weights"):
        build_model(cfg)
    assert isinstance(build_model(cfg, pretrained=False), MRN)  # weights come from a checkpoint


def test_register_tokens_dropped_from_patch_tokens():
    cfg = small_cfg(image=56)
    model = build_model(cfg).eval()  # no drop-path
    slices = torch.rand(3, 56, 56) * 255
    tokens = model.res.patchnizer(slices)
    assert tokens.patch_tokens.shape == (3, 16, 64)  # 4 x 4 patches, no cls / registers
    full = model.res.patchnizer.vit.forward_features(model.res.patchnizer.normalise(slices))
    assert torch.allclose(tokens.slice_tokens, full[:, 0])
    assert torch.allclose(tokens.patch_tokens, full[:, 5:])


@pytest.mark.parametrize("arch", ["mrn", "seres10"])
def test_masked_subsets_equal_recomputation(arch):
    cfg = small_cfg(arch=arch)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    batch = make_batch(cfg, batch=2)
    with torch.no_grad():
        out = model(batch["images"], batch["masks"])
        for k in range(len(ROI_NAMES) + 1):
            for masked in itertools.combinations(ROI_NAMES, k):
                images = {
                    n: torch.zeros_like(v) if n in masked else v for n, v in batch["images"].items()
                }
                masks = {
                    n: torch.zeros_like(v) if n in masked else v for n, v in batch["masks"].items()
                }
                expected = model(images, masks).logits
                got = model.classify_tokens(out.roi_tokens, set(masked))
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_empty_token_cache_follows_weights():
    cfg = small_cfg()
    model = build_model(cfg).eval()
    with torch.no_grad():
        first = model.empty_token("nm_sn", 3)
        assert first.shape == (3, 64)
        assert torch.equal(model.empty_token("nm_sn", 1)[0], first[0])
        model.res.sfa.roi_token.add_(1.0)  # weights change -> recomputed
        second = model.empty_token("nm_sn", 1)
        zero = {n: torch.zeros(1, k, 28, 28) for n, k in SLICES.items()}
        assert not torch.allclose(second, first[:1])
        torch.testing.assert_close(second, model.encode_rois(zero)["nm_sn"], atol=1e-6, rtol=0)
        # fold swap (the predictor's load_state_dict) invalidates the cache too
        other = build_model(cfg).state_dict()
        model.load_state_dict(other)
        third = model.empty_token("nm_sn", 1)
        torch.testing.assert_close(third, model.encode_rois(zero)["nm_sn"], atol=1e-6, rtol=0)
        assert not torch.allclose(third, second)


def test_seres10_outputs_and_needs_masks():
    paper = build_model(small_cfg(arch="seres10", seres_widths=(64, 128, 256, 512)))
    assert paper.token_dim == 512  # the paper's 512-d ROI features
    cfg = small_cfg(arch="seres10")  # cpu-tiny: a quarter of the widths
    model = build_model(cfg)
    assert isinstance(model, SERes10) and model.token_dim == 128
    assert model.stems["qsm_bg"][0].in_channels == 5 and model.stems["nm_sn"][0].in_channels == 2
    assert model.stems["nm_sn"][0].out_channels == 16
    batch = make_batch(cfg)
    out = model(batch["images"], batch["masks"])
    assert out.logits.shape == (2, 2) and out.patient.shape == (2, 512) and out.seg_logits is None
    compute_losses(out, batch, "train", cfg.model)["total"].backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(InputDataError, match="needs the ROI's nuclei mask"):
        model(batch["images"])
    bad = dict(batch["masks"], nm_sn=batch["masks"]["nm_sn"] + 5)
    with pytest.raises(InputDataError, match="nm_sn"):
        model(batch["images"], bad)


def test_bad_inputs_raise_input_data_error():
    cfg = small_cfg()
    model = build_model(cfg)
    images = make_batch(cfg)["images"]
    with pytest.raises(InputDataError, match="missing ROI"):
        model({k: v for k, v in images.items() if k != "qsm_dentate"})
    with pytest.raises(InputDataError, match="qsm_bg.*28 x 28"):
        model(dict(images, qsm_bg=torch.zeros(2, 3, 30, 30)))
    with pytest.raises(InputDataError, match="batch size"):
        model(dict(images, nm_sn=torch.zeros(1, 2, 28, 28)))
    with pytest.raises(InputDataError, match="slice positions"):
        model(dict(images, nm_sn=torch.zeros(2, 40, 28, 28)))
    with pytest.raises(InputDataError, match="unknown"):
        model.classify_tokens(model.encode_rois(images), {"putamen"})


def test_bad_config_values():
    with pytest.raises(ConfigError, match="arch"):
        build_model(small_cfg(arch="unet"))
    with pytest.raises(ConfigError, match="num_heads"):
        build_model(small_cfg(num_heads=5))
    with pytest.raises(ConfigError, match="dpt_features"):
        build_model(small_cfg(dpt_features="middle"))


@pytest.mark.parametrize("arch", ["mrn", "seres10"])
def test_save_load_round_trip(tmp_path, arch):
    cfg = small_cfg(arch=arch)
    model = build_model(cfg).eval()
    path = save_model(model, tmp_path / "fold_0" / "model.safetensors", cfg)
    assert (tmp_path / "fold_0" / "config.json").is_file()
    assert not list((tmp_path / "fold_0").glob("*.tmp"))
    loaded, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg and not loaded.training
    assert loaded.weights_provenance == model.weights_provenance
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    batch = make_batch(cfg)
    with torch.no_grad():
        assert torch.equal(
            model(batch["images"], batch["masks"]).logits,
            loaded(batch["images"], batch["masks"]).logits,
        )


def test_load_model_errors(tmp_path):
    cfg = small_cfg()
    path = save_model(build_model(cfg), tmp_path / "model.safetensors", cfg)
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    other = small_cfg(ffa_depth=3)
    with pytest.raises(WeightsError, match="do not fit"):
        load_model(path, run_cfg=other)
    broken = tmp_path / "broken" / "model.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cannot read"):
        load_model(broken, run_cfg=cfg)
