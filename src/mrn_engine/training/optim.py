"""AdamW with the paper's parameter groups (4.1.2).

* MRN: DINOv2 backbone, slice position embedding, FFA, SFA: ``lr_backbone``, ``wd_backbone``.
* MRN: DPT, classification head, contrastive projection head: ``lr_head``, ``wd_head``.
* With ``lr_fusion`` set, the parameters a model's ``lr_groups()`` lists under ``fusion``
  (MRN: slice position embedding, FFA, SFA: new modules even on a pretrained ViT) train at
  ``lr_fusion`` instead (groups ``fusion`` / ``fusion_no_decay``, weight decay ``wd_backbone``);
  without it they stay in the backbone group, the paper's grouping.
* SERes10 (paper 4.2 baseline): *every* parameter (stems, SE-ResNet-10 trunk, head, projection
  head) is in the head group (``lr_head``, ``wd_head``; ``SERes10.lr_groups``). It has no
  pretrained backbone: the paper's low backbone rate exists to fine-tune pretrained DINOv2
  weights gently, and a CNN trained from scratch at it would barely move, so the whole network
  is trained at the head rate (our choice; the paper gives no SERes10 learning rates).

The split comes from the model's ``lr_groups()`` (``MRNObjective`` -> mSupMoCo wrapper -> MRN /
SERes10); parameter names are only the fallback for modules without it.

Biases, normalisation weights and learned embeddings/tokens (1-D tensors, ``*_token`` such as
DINOv2's ``cls_token``/``reg_token`` and SFA's ``roi_token``, ``pos_embed`` and MRN's slice
position embedding ``slice_pos``) get no weight decay (the usual ViT practice; not stated by
the paper).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mrn_engine.config import TrainConfig

#: module names (any component of a parameter's dotted name) trained at the backbone rate
BACKBONE_MODULES = frozenset({"backbone", "ffa", "sfa", "stems", "stem", "encoder"})
#: name fragments of parameters that never get weight decay
NO_DECAY_FRAGMENTS = ("pos_embed", "slice_pos", "embedding")


def is_backbone_param(name: str, backbone_modules: Iterable[str] = BACKBONE_MODULES) -> bool:
    """True if a parameter (dotted name) belongs to the backbone / FFA / SFA group."""
    parts = set(name.split("."))
    return bool(parts & set(backbone_modules))


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm scales, learned tokens (``*_token``) and embeddings: no weight decay."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or name.rsplit(".", 1)[-1].endswith("_token")
        or any(f in name for f in NO_DECAY_FRAGMENTS)
    )


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups of ``model``'s trainable parameters.

    The backbone/head split comes from ``model.lr_groups()`` when the model defines it (the
    models package's MRN, SERes10 and training wrappers do), otherwise from parameter names
    (:data:`BACKBONE_MODULES`); trainable parameters in neither group go to the head. Each
    group carries a ``name`` (``backbone``, ``backbone_no_decay``, ``fusion``, ``fusion_no_decay``
    with ``lr_fusion``, ``head``, ``head_no_decay``); empty groups are left out.
    """
    backbone_ids: set[int] | None = None
    fusion_ids: set[int] = set()
    if hasattr(model, "lr_groups"):
        groups = model.lr_groups()
        backbone_ids = {id(p) for p in groups["backbone"]}
        if cfg.lr_fusion is not None:
            fusion_ids = {id(p) for p in groups.get("fusion", [])}
    buckets: dict[str, list[torch.nn.Parameter]] = {
        "backbone": [],
        "backbone_no_decay": [],
        "fusion": [],
        "fusion_no_decay": [],
        "head": [],
        "head_no_decay": [],
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = id(p) in backbone_ids if backbone_ids is not None else is_backbone_param(name)
        key = "backbone" if in_backbone else "head"
        if id(p) in fusion_ids:
            key = "fusion"
        if is_no_decay(name, p):
            key += "_no_decay"
        buckets[key].append(p)
    settings = {
        "backbone": (cfg.lr_backbone, cfg.wd_backbone),
        "backbone_no_decay": (cfg.lr_backbone, 0.0),
        "fusion": (cfg.lr_fusion, cfg.wd_backbone),
        "fusion_no_decay": (cfg.lr_fusion, 0.0),
        "head": (cfg.lr_head, cfg.wd_head),
        "head_no_decay": (cfg.lr_head, 0.0),
    }
    return [
        {"params": params, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
        for k, params in buckets.items()
        if params
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (``cfg.betas``) over :func:`parameter_groups`."""
    return torch.optim.AdamW(parameter_groups(model, cfg), betas=tuple(cfg.betas))
