"""Offline DINOv2 weights: timm .safetensors and Meta .pth, pos-embed resampling, clear errors."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from mrn_engine.config import get_preset
from mrn_engine.errors import WeightsError
from mrn_engine.models import build_model, load_model, read_state_dict, save_model
from mrn_engine.models.backbone import TINY_BASE, create_vit

SOURCE_SIZE = 70  # 5 x 5 patch grid in the "pretrained" file (like DINOv2's 518 -> 37 x 37)
TARGET_SIZE = 56  # 4 x 4 grid in the model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def source_state(**overrides) -> dict[str, torch.Tensor]:
    """A random tiny DINOv2 (reg4) state dict in timm's key format, at SOURCE_SIZE."""
    torch.manual_seed(0)
    if overrides:
        import timm

        kwargs = {"embed_dim": 64, "depth": 4, "num_heads": 4, **overrides}
        vit = timm.create_model(
            TINY_BASE, pretrained=False, img_size=SOURCE_SIZE, num_classes=0, **kwargs
        )
    else:
        vit = create_vit("tiny", SOURCE_SIZE)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_()  # distinguishable from any fresh init
    return {k: v.clone() for k, v in vit.state_dict().items()}


def to_meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys -> Meta's original dinov2_vit*14_reg4_pretrain.pth keys."""
    meta = {k: v for k, v in state.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    cls_pos = torch.randn(1, 1, state["pos_embed"].shape[-1])
    meta["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)  # Meta: pos-embed with cls
    meta["cls_token"] = state["cls_token"] - cls_pos
    meta["register_tokens"] = state["reg_token"]
    meta["mask_token"] = torch.zeros(1, state["pos_embed"].shape[-1])
    return meta


def to_transformers(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """timm keys -> Hugging Face ``transformers`` Dinov2WithRegistersModel keys (unsupported)."""
    dim = state["pos_embed"].shape[-1]
    hf = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, dim),
        "embeddings.register_tokens": state["reg_token"],
        "embeddings.position_embeddings": torch.cat(
            [torch.zeros(1, 1, dim), state["pos_embed"]], dim=1
        ),
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    renames = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key)
        if not m:
            continue
        layer, module, kind = f"encoder.layer.{m[1]}", m[2], m[3]
        if module == "attn.qkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True):
                hf[f"{layer}.attention.attention.{name}.{kind}"] = part.clone()
        elif module in ("ls1", "ls2"):
            hf[f"{layer}.layer_scale{module[-1]}.lambda1"] = value
        else:
            hf[f"{layer}.{renames[module]}.{kind}"] = value
    return {f"{prefix}{k}": v.contiguous() for k, v in hf.items()}


def tiny_cfg(path):
    cfg = get_preset("cpu-tiny").replace(roi={"image_size": TARGET_SIZE})
    return cfg.replace(model={"backbone_weights": str(path)})


def assert_loaded(model, state):
    vit_state = model.res.patchnizer.vit.state_dict()
    expected_pos = resample_abs_pos_embed(state["pos_embed"], new_size=(4, 4), num_prefix_tokens=0)
    assert vit_state["pos_embed"].shape == (1, 16, 64)
    torch.testing.assert_close(vit_state["pos_embed"], expected_pos)
    torch.testing.assert_close(vit_state["cls_token"], state["cls_token"], atol=1e-6, rtol=0)
    for key in (
        "reg_token",
        "patch_embed.proj.weight",
        "blocks.2.attn.qkv.weight",
        "blocks.3.ls2.gamma",
        "blocks.0.mlp.fc1.weight",
        "norm.weight",
    ):
        assert torch.equal(vit_state[key], state[key]), key


def test_timm_safetensors_loads_and_resamples(tmp_path):
    state = source_state()
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    model = build_model(tiny_cfg(path))
    assert_loaded(model, state)
    prov = model.weights_provenance
    assert prov["format"] == "timm" and prov["path"] == str(path.resolve())
    assert prov["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_meta_pth_loads_and_converts(tmp_path):
    state = source_state()
    path = tmp_path / "dinov2_vitt14_reg4_pretrain.pth"
    torch.save(to_meta(state), path)
    model = build_model(tiny_cfg(path))
    assert_loaded(model, state)
    assert model.weights_provenance["format"] == "meta-dinov2"


def test_weights_sha256_recorded_through_save_and_load(tmp_path):
    """A model built from a real .safetensors backbone file keeps that file's sha256 in the
    saved model's metadata, and load_model restores it (it builds with pretrained=False)."""
    state = source_state()
    weights = tmp_path / "dinov2_tiny.safetensors"
    save_file(state, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    cfg = tiny_cfg(weights)
    model = build_model(cfg)
    path = save_model(model, tmp_path / "fold_0" / "model.safetensors", cfg)
    with safe_open(str(path), framework="pt") as fh:
        recorded = json.loads(fh.metadata()["weights_provenance"])
    assert recorded["sha256"] == digest and recorded["format"] == "timm"
    assert recorded["path"] == str(weights.resolve())
    weights.unlink()  # loading a trained model never needs the backbone file again
    loaded, loaded_cfg = load_model(path)
    assert loaded.weights_provenance["sha256"] == digest
    assert loaded_cfg.model.backbone_weights == str(weights)
    assert_loaded(loaded, state)  # the saved backbone is the file's, resampled


@pytest.mark.parametrize(
    "prefix,suffix", [("", ".safetensors"), ("dinov2.", ".safetensors"), ("", ".pth")]
)
def test_transformers_layout_is_refused_clearly(tmp_path, prefix, suffix):
    """HF ``transformers`` DINOv2 files (embeddings.*, encoder.layer.*) are not supported."""
    hf = to_transformers(source_state(), prefix)
    assert f"{prefix}encoder.layer.3.attention.attention.value.weight" in hf
    path = tmp_path / f"hf_dinov2{suffix}"
    if suffix == ".pth":
        torch.save(hf, path)
    else:
        save_file(hf, str(path))
    with pytest.raises(
        WeightsError,
        match=rf"{re.escape(str(path.resolve()))}: Hugging Face transformers-layout DINOv2 "
        r"weights .* not supported; use the timm-layout \.safetensors .* or Meta's",
    ):
        build_model(tiny_cfg(path))


def test_pretrained_vits_preset_with_weights_file(tmp_path):
    """A vits run with weights builds without allow_random_init (ViT-S shapes, small file)."""
    import timm

    vit = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=42, num_classes=0
    )
    path = tmp_path / "vits.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    cfg = get_preset("vits").replace(roi={"image_size": 28}, model={"backbone_weights": str(path)})
    model = build_model(cfg)
    assert torch.equal(
        model.res.patchnizer.vit.blocks[11].attn.proj.weight, vit.blocks[11].attn.proj.weight
    )


def test_wrong_model_names_the_shapes(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(source_state(embed_dim=32, num_heads=2), str(path))
    with pytest.raises(
        WeightsError, match=r"different model.*file \(1, 1, 32\) vs model \(1, 1, 64\)"
    ):
        build_model(tiny_cfg(path))


def test_missing_and_unexpected_keys(tmp_path):
    state = source_state()
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.3.")}, str(path))
    with pytest.raises(WeightsError, match=r"missing.*blocks\.3\."):
        build_model(tiny_cfg(path))
    path2 = tmp_path / "extra.safetensors"
    save_file({**state, "decoder.weight": torch.zeros(2)}, str(path2))
    with pytest.raises(WeightsError, match="unexpected.*decoder.weight"):
        build_model(tiny_cfg(path2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file(tmp_path, suffix):
    state = source_state()
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save(to_meta(state), good)
    else:
        save_file(state, str(good))
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match=rf"{bad.name}: cannot read weights.*truncated"):
        build_model(tiny_cfg(bad))


def test_missing_file_and_non_tensor_content(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth: weights file not found"):
        build_model(tiny_cfg(tmp_path / "nope.pth"))
    path = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "note": "x"}, path)
    with pytest.raises(WeightsError, match="not a dictionary of tensors"):
        read_state_dict(path)
