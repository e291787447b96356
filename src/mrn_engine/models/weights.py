"""Foundation-model weights from a local file only (the hub is never contacted).

``ModelConfig.backbone_weights`` may name either

- a timm / Hugging Face ``.safetensors`` file (e.g. ``vit_base_patch14_reg4_dinov2.lvd142m``'s
  ``model.safetensors``), or
- Meta's original ``dinov2_vitb14_reg4_pretrain.pth`` (keys ``register_tokens``,
  ``mask_token``, ``pos_embed`` including the [CLS] position, ``blocks.N.ls1.gamma``), read
  with ``torch.load(weights_only=True)``.

Both go through timm's own ``checkpoint_filter_fn``, which converts Meta's key names and
resamples the position embedding to the slice grid (e.g. 37 x 37 -> 16 x 16 for 224-pixel
slices). Every failure is a :class:`WeightsError` that names the file and the problem.

Hugging Face ``transformers``-layout DINOv2 files (``facebook/dinov2-with-registers-*``: keys
``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``, possibly under a ``dinov2.`` prefix)
are *not* supported: they are recognised and refused with a message saying so.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from mrn_engine.errors import MRNWarning, WeightsError
from mrn_engine.runtime import file_sha256

#: keys a classifier checkpoint may carry that our head-less backbone does not have
_IGNORED_PREFIXES = ("head.", "fc_norm.")

#: keys only Hugging Face ``transformers`` DINOv2 checkpoints have (optionally under a prefix)
_TRANSFORMERS_KEY = re.compile(
    r"(^|\.)(encoder\.layer\.\d+\.|embeddings\.(patch_embeddings|position_embeddings|cls_token))"
)


def _first_line(e: BaseException) -> str:
    """First line of an exception's message (torch's refusal text runs on for many lines)."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file, on CPU.

    Raises
    ------
    WeightsError: missing, unreadable, truncated or not a tensor dictionary.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused: this pickled file holds objects other than tensors and numbers, and "
            "loading it could run code stored in it. Use the .safetensors release of the "
            "weights (e.g. timm's model.safetensors) instead"
        ) from e
    except Exception as e:  # noqa: BLE001 - every reader failure means a bad file
        raise WeightsError(
            f"{path}: cannot read weights ({type(e).__name__}: {_first_line(e)}); the file is "
            "truncated, corrupt or not a .safetensors / torch state-dict file"
        ) from e
    for wrapper in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a dictionary of tensors (got {type(state).__name__})")
    return state


def weights_format(state: dict[str, torch.Tensor]) -> str:
    """``"meta-dinov2"`` (original Meta keys), ``"hf-transformers"`` (unsupported) or ``"timm"``."""
    if any(_TRANSFORMERS_KEY.search(k) for k in state):
        return "hf-transformers"
    return "meta-dinov2" if "mask_token" in state or "register_tokens" in state else "timm"


def load_backbone_weights(vit: nn.Module, path: str | os.PathLike, name: str = "") -> dict:
    """Load DINOv2 weights from ``path`` into the timm ViT ``vit``; return their provenance.

    Returns
    -------
    ``{"backbone", "path", "sha256", "format"}`` -- written into every checkpoint.

    Raises
    ------
    WeightsError: unreadable file, a Hugging Face transformers-layout file (unsupported), weights
        of another model (the shapes are named) or missing keys.
    """
    path = Path(path).expanduser().resolve()
    raw = read_state_dict(path)
    fmt = weights_format(raw)
    if fmt == "hf-transformers":
        example = next(k for k in raw if _TRANSFORMERS_KEY.search(k))
        raise WeightsError(
            f"{path}: Hugging Face transformers-layout DINOv2 weights (keys 'embeddings.*', "
            f"'encoder.layer.*', e.g. {example!r}) are not supported; use the timm-layout "
            ".safetensors (model.safetensors of timm/vit_base_patch14_reg4_dinov2.lvd142m, keys "
            "'blocks.N.*') or Meta's original dinov2_vit*14_reg4_pretrain.pth"
        )
    try:
        state = checkpoint_filter_fn(dict(raw), vit)
    except Exception as e:  # noqa: BLE001 - timm's conversion fails on foreign tensors
        raise WeightsError(
            f"{path}: these weights do not fit the {name or 'configured'} backbone "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from e
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    expected = vit.state_dict()
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(
            f"{path}: weights of a different model than {name or 'the configured backbone'} "
            f"(width {vit.embed_dim}, depth {len(vit.blocks)}): {len(wrong)} shape mismatch(es), e.g. "
            + "; ".join(wrong[:3])
        )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightsError(
            f"{path}: {len(missing)} backbone key(s) missing from the file, e.g. {missing[:5]} "
            f"(a {name or 'different'} checkpoint was expected)"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise WeightsError(
            f"{path}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}: not a "
            f"{name or 'matching'} DINOv2 checkpoint"
        )
    vit.load_state_dict(state, strict=True)
    sha = file_sha256(path)
    out = {"backbone": name, "path": str(path), "sha256": sha, "format": fmt}
    card = card_provenance(path, sha)
    if card:
        out["card"] = card
        warn_if_collapsed(path, card)
    return out


def warn_if_collapsed(path: str | os.PathLike, card: dict) -> None:
    """Warn when the ``mrn pretrain`` card of these very weights says the run collapsed."""
    if card.get("collapsed") and card.get("matches"):
        warnings.warn(
            f"{path}: its card says the pretraining collapsed (it did not learn); these "
            "weights are no better a start than random initialisation",
            MRNWarning,
            stacklevel=3,
        )


#: card entries copied into a bundle's weights provenance
_CARD_KEYS = (
    "kind",
    "preset",
    "arch",
    "loss",
    "epochs",
    "seed",
    "created",
    "code_version",
    "collapsed",
)


def card_provenance(path: str | os.PathLike, sha256: str) -> dict:
    """Summary of the ``mrn pretrain`` card beside ``path`` (``x.card.json``), or ``{}``.

    ``matches`` says whether the card describes these very bytes (its ``weights_sha256``).
    An unreadable card is reported as such, never an error: the weights stand on their own.
    """
    card_file = Path(path).with_suffix(".card.json")
    if not card_file.is_file():
        return {}
    try:
        card = json.loads(card_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return {"file": str(card_file), "error": f"unreadable card ({e})"}
    if not isinstance(card, dict):
        return {"file": str(card_file), "error": "not a JSON object"}
    out = {k: card[k] for k in _CARD_KEYS if k in card}
    data = card.get("data") if isinstance(card.get("data"), dict) else {}
    out.update(
        file=str(card_file),
        data_sha256=data.get("sha256"),
        n_cases=data.get("n_cases"),
        matches=card.get("weights_sha256") == sha256,
    )
    return out
