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
    MSupMoCo,
    SERes10,
    build_model,
    build_training_wrapper,
    compute_losses,
    load_model,
    save_model,
)
from mrn_engine.models.res import extra_backbone_layers, plain_dpt_layers

SLICES = {"nm_sn": 2, "qsm_bg": 3, "qsm_midbrain": 2, "qsm_dentate": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    "no-moco (mSupMoCo off)": {"use_moco": False},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_shapes_and_gradient_flow(name):
    """Every ablation, through the training wrapper (mSupMoCo or the plain step) and the full loss."""
    cfg = small_cfg(**ABLATIONS[name])
    torch.manual_seed(0)
    model = build_model(cfg)
    wrapper = build_training_wrapper(model, cfg)
    assert isinstance(wrapper, MSupMoCo) == cfg.model.use_moco
    batch = make_batch(cfg)  # labels 0, 1: each anchor has a positive and a negative key
    out = wrapper.step(batch)
    with_seg = cfg.model.use_dpt and not cfg.model.dinov2_only
    check_output(model, cfg, out, 2, with_seg)
    losses = compute_losses(out, batch, "train", cfg.model)
    assert (losses["seg"] > 0) == with_seg
    assert (losses["con"] > 0) == cfg.model.use_moco
    losses["total"].backward()
    assert_all_grads(model)
    if cfg.model.use_moco:
        assert all(p.grad.abs().sum() > 0 for p in wrapper.projection.parameters())
        assert all(p.grad is None for p in wrapper.teacher.parameters())


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


@pytest.mark.parametrize("preset", ["vits", "paper-vitb"])
def test_pretrained_preset_backward(preset):
    """Gradient flow through the ViT-S and the paper's ViT-B presets (tiny slices, batch 1)."""
    cfg = small_cfg(preset, image=28)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_batch(cfg, batch=1)
    compute_losses(model(batch["images"]), batch, "train", cfg.model)["total"].backward()
    assert_all_grads(model)


#: DPT reassemble channels (shallow to deep) and fusion width per preset (docs/model.md)
DPT_CHANNELS = {
    "paper-vitb": (768, (96, 192, 384, 768), 256),
    "vits": (384, (48, 96, 192, 384), 128),
    "cpu-tiny": (64, (16, 32, 64, 64), 32),
}


@pytest.mark.parametrize("preset", list(DPT_CHANNELS))
def test_dpt_channels_per_preset(preset):
    dim, channels, fusion = DPT_CHANNELS[preset]
    cfg = small_cfg(preset)
    assert tuple(cfg.model.dpt_channels) == channels and cfg.model.dpt_fusion == fusion
    with torch.device("meta"):  # structure only: no weight initialisation
        dpt = build_model(cfg, pretrained=False).res.dpt
    assert [tuple(c.weight.shape) for c in dpt.project] == [(c, dim, 1, 1) for c in channels]
    # reassemble: 4x, 2x up-sampling, 1x, 1/2x down-sampling of the patch grid
    strides = [r.stride if not isinstance(r, torch.nn.Identity) else None for r in dpt.resample]
    assert strides == [(4, 4), (2, 2), None, (2, 2)]
    assert isinstance(dpt.resample[0], torch.nn.ConvTranspose2d)
    assert isinstance(dpt.resample[3], torch.nn.Conv2d)
    assert [(c.in_channels, c.out_channels) for c in dpt.layer_rn] == [
        (c, fusion) for c in channels
    ]
    for block in dpt.fusion:
        assert block.unit.conv1.in_channels == block.out_conv.out_channels == fusion
    assert dpt.trunk[0].in_channels == fusion


def test_pretrained_preset_without_weights_refused():
    cfg = small_cfg("vits", allow_random_init=False)
    with pytest.raises(WeightsError, match="backbone_weights"):
        build_model(cfg)
    assert isinstance(build_model(cfg, pretrained=False), MRN)  # weights come from a checkpoint


def test_sized_tiny_backbone_builds_trains_and_round_trips(tmp_path):
    """``tiny-WxD``: width W, depth D, W/16 heads; no weights needed; saved and loaded back."""
    cfg = small_cfg(backbone="tiny-32x2", embed_dim=32, allow_random_init=False)
    model = build_model(cfg)
    vit = model.res.patchnizer.vit
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (32, 2, 2)
    assert model.token_dim == 32 and model.weights_provenance["format"] == "random-init"
    batch = make_batch(cfg, batch=2)
    out = model(batch["images"])
    check_output(model, cfg, out, 2, True)
    compute_losses(out, batch, "train", cfg.model)["total"].backward()
    assert_all_grads(model)
    path = save_model(model, tmp_path / "m.safetensors", cfg)
    back, back_cfg = load_model(path)
    assert back_cfg.model.backbone == "tiny-32x2"
    model.eval(), back.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch["images"]).logits, back(batch["images"]).logits)


@pytest.mark.parametrize("name", ["tiny-30x2", "tiny-32x0", "tiny-32", "tiny-wide"])
def test_bad_sized_tiny_backbone_names(name):
    with pytest.raises(ConfigError, match="tiny-WxD"):
        build_model(small_cfg(backbone=name))


@pytest.mark.parametrize(
    "backbone,width", [("tiny-32x2", 32), ("vit_small_patch14_reg4_dinov2", 384)]
)
def test_embed_dim_must_state_the_backbone_width(backbone, width):
    """A config whose ``embed_dim`` is not the ViT's width is refused, naming the right value."""
    with pytest.raises(ConfigError, match=f"set model.embed_dim={width}"):
        build_model(small_cfg(backbone=backbone, embed_dim=48))


def test_register_tokens_dropped_from_patch_tokens():
    cfg = small_cfg(image=56)
    model = build_model(cfg).eval()  # no drop-path
    slices = torch.rand(3, 56, 56) * 255
    tokens = model.res.patchnizer(slices)
    assert tokens.patch_tokens.shape == (3, 16, 64)  # 4 x 4 patches, no cls / registers
    full = model.res.patchnizer.vit.forward_features(model.res.patchnizer.normalise(slices))
    assert torch.allclose(tokens.slice_tokens, full[:, 0])
    assert torch.allclose(tokens.patch_tokens, full[:, 5:])


def test_slice_position_embedding_makes_roi_token_order_aware():
    """Eq. 3: shuffling an ROI's slices changes its token; without slice positions it cannot."""
    cfg = small_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = make_batch(cfg, batch=1)["images"]
    shuffled = dict(images, qsm_bg=images["qsm_bg"][:, [2, 0, 1]])
    with torch.no_grad():
        ordered = model.encode_rois(images)
        moved = model.encode_rois(shuffled)
        assert (ordered["qsm_bg"] - moved["qsm_bg"]).abs().max() > 1e-3
        model.res.slice_pos.zero_()
        ordered0 = model.encode_rois(images)["qsm_bg"]
        moved0 = model.encode_rois(shuffled)["qsm_bg"]
    assert (ordered0 - ordered["qsm_bg"]).abs().max() > 1e-3  # the embedding was in use
    torch.testing.assert_close(moved0, ordered0, atol=1e-5, rtol=0)  # then a set of slices


def _block_io(ffa, x, block, perturb_slice=None):
    """Run ``ffa`` on ``x`` (B, S, T, D); return ``block``'s input and output as (B, S, T, D).

    ``perturb_slice=j`` adds fixed noise to slice j of that block's input (inside the FFA).
    """
    b, s, t, d = x.shape
    seen = {}

    def pre(_module, args):
        inp = args[0]
        if perturb_slice is not None:
            noise = torch.randn(t, d, generator=torch.Generator().manual_seed(5))
            view = inp.reshape(b, s, t, d).clone()
            view[:, perturb_slice] += noise
            inp = view.reshape(inp.shape)
        seen["in"] = inp.reshape(b, s, t, d)
        return (inp, *args[1:])

    def post(_module, _args, out):
        seen["out"] = out.reshape(b, s, t, d)

    hooks = [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        with torch.no_grad():
            ffa(x)
    finally:
        for h in hooks:
            h.remove()
    return seen["in"], seen["out"]


def test_ffa_local_blocks_keep_slices_apart_global_blocks_mix_them():
    cfg = small_cfg()
    torch.manual_seed(0)
    ffa = build_model(cfg).res.ffa.eval()
    assert ffa.depth == cfg.model.ffa_depth == 2
    x = torch.randn(1, 3, 5, 64, generator=torch.Generator().manual_seed(0))
    j, others = 1, [0, 2]
    for i in range(ffa.depth):
        for kind, block in (("global", ffa.global_blocks[i]), ("local", ffa.local_blocks[i])):
            base_in, base_out = _block_io(ffa, x, block)
            new_in, new_out = _block_io(ffa, x, block, perturb_slice=j)
            torch.testing.assert_close(new_in[:, others], base_in[:, others], atol=0, rtol=0)
            assert (new_out[:, j] - base_out[:, j]).abs().max() > 1e-2, (kind, i)
            for k in others:
                change = (new_out[:, k] - base_out[:, k]).abs().max()
                if kind == "local":  # attention within each slice only
                    assert change < 1e-6, (kind, i, k, change)
                else:  # attention over all tokens of all slices
                    assert change > 1e-5, (kind, i, k, change)
    # the FFA output is the last local block's, and layers alternate global -> local
    with torch.no_grad():
        out = ffa(x)
        assert torch.equal(out.tokens, out.local_outputs[-1])
        b, s, t, d = x.shape
        local0 = ffa.local_blocks[0](out.global_outputs[0].reshape(b * s, t, d))
        torch.testing.assert_close(local0.reshape(b, s, t, d), out.local_outputs[0])
        global1 = ffa.global_blocks[1](out.local_outputs[0].reshape(b, s * t, d))
        torch.testing.assert_close(global1.reshape(b, s, t, d), out.global_outputs[1])


def _dpt_inputs(model, images):
    """The FFA outputs and DPT token sets of the first ROI (nm_sn), and the model output."""
    seen: dict = {}

    def keep_ffa(_module, _args, out) -> None:
        seen.setdefault("ffa", out)

    def keep_sets(_module, args) -> None:
        seen.setdefault("sets", args[0])

    hooks = [
        model.res.ffa.register_forward_hook(keep_ffa),
        model.res.dpt.register_forward_pre_hook(keep_sets),
    ]
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        for h in hooks:
            h.remove()
    return seen["ffa"], seen["sets"], out


def test_dpt_local_vs_global_token_source():
    """Paper Fig. 3: "local" = last FFA local attention, "global" = last FFA global attention."""
    torch.manual_seed(0)
    local = build_model(small_cfg(dpt_features="local")).eval()
    with torch.no_grad():  # LayerScale 1 (not the 0.01 init): the local blocks visibly act
        for block in local.res.ffa.local_blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    glob = build_model(small_cfg(dpt_features="global")).eval()
    glob.load_state_dict(local.state_dict())  # same weights, only the DPT's input differs
    images = make_batch(small_cfg(), batch=1)["images"]
    ffa_l, sets_l, out_l = _dpt_inputs(local, images)
    ffa_g, sets_g, out_g = _dpt_inputs(glob, images)
    b, s = images["nm_sn"].shape[:2]
    t, d = ffa_l.local_outputs[-1].shape[2:]

    def patches(tokens):
        return tokens.reshape(b * s, t, d)[:, 1:]

    assert len(sets_l) == len(sets_g) == 4
    assert torch.equal(sets_l[-1], patches(ffa_l.local_outputs[-1]))
    assert torch.equal(sets_g[-1], patches(ffa_g.global_outputs[-1]))
    assert not torch.allclose(sets_l[-1], sets_g[-1])
    for a, g in zip(sets_l[:-1], sets_g[:-1], strict=True):
        assert torch.equal(a, g)
    assert torch.equal(sets_l[-2], patches(ffa_l.global_outputs[-2]))
    for n in ROI_NAMES:
        assert torch.equal(out_l.roi_tokens[n], out_g.roi_tokens[n])
        assert (out_l.seg_logits[n] - out_g.seg_logits[n]).abs().max() > 1e-4, n


def test_sfa_roi_token_is_a_learned_parameter_in_use():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    roi_token = model.res.sfa.roi_token
    assert isinstance(roi_token, torch.nn.Parameter) and roi_token.requires_grad
    assert dict(model.named_parameters())["res.sfa.roi_token"] is roi_token
    assert any(p is roi_token for p in model.lr_groups()["backbone"])  # optimised
    batch = make_batch(cfg)
    compute_losses(model(batch["images"]), batch, "train", cfg.model)["total"].backward()
    assert roi_token.grad is not None and roi_token.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        before = model.encode_rois(batch["images"])
        roi_token.copy_(torch.randn(roi_token.shape, generator=torch.Generator().manual_seed(1)))
        after = model.encode_rois(batch["images"])
    for n in ROI_NAMES:
        assert (before[n] - after[n]).abs().max() > 1e-2, n


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
