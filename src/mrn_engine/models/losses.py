"""Training objectives (paper 3.4, Eq. 10-12).

- segmentation (Eq. 10): class-weighted cross-entropy per ROI; the weight of class c in a
  sample is ``1 - (fraction of that sample's voxels of class c)`` (paper: "1 minus the class
  proportions within the image"), so the small nuclei weigh more than the background;
  averaged over the ROIs that have masks;
- classification (Eq. 11): cross-entropy on the (B, 2) logits;
- contrastive: the mSupMoCo loss carried by ``MRNOutput.contrastive`` (Eq. 8);
- total (Eq. 12): ``cls + lambda_seg * seg + lambda_con * con``; stage ``"pretrain"`` (the
  paper's first 400 epochs) drops ``cls``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mrn_engine.config import ModelConfig
from mrn_engine.errors import ConfigError
from mrn_engine.models.outputs import MRNOutput

STAGES = ("pretrain", "train")


def weighted_seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy, weights = 1 - class proportion, per sample.

    Parameters
    ----------
    logits: (B, C, S, H, W); target: (B, S, H, W) int class indices in [0, C).

    Returns the mean over samples of ``sum_v w[y_v] * CE_v / sum_v w[y_v]`` (PyTorch's
    weighted-mean convention); a sample made of a single class falls back to weights 1.
    """
    b, c = logits.shape[:2]
    target = target.long()
    ce = F.cross_entropy(logits.float(), target, reduction="none").reshape(b, -1)  # (B, V)
    flat = target.reshape(b, -1)
    proportion = F.one_hot(flat, c).float().mean(dim=1)  # (B, C)
    weights = torch.gather(1.0 - proportion, 1, flat)  # (B, V)
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total > 0, weights, torch.ones_like(weights))
    return ((weights * ce).sum(dim=1) / weights.sum(dim=1)).mean()


def loss_terms(cfg: ModelConfig, stage: str = "train") -> tuple[str, ...]:
    """The terms of ``total`` (:func:`compute_losses`) that can carry a gradient for a model.

    ``"cls"`` in stage ``"train"``; ``"seg"`` when the network has a segmentation head (MRN
    with ``use_dpt``, not ``dinov2_only``; SERes10 has none) and ``lambda_seg != 0``;
    ``"con"`` with mSupMoCo (``use_moco``) and ``lambda_con != 0``. An empty tuple means the
    stage has nothing to learn: its ``total`` is identically 0 and an optimiser step only
    applies weight decay (e.g. the ``"pretrain"`` stage of SERes10 or DINOv2-only without
    mSupMoCo), so such a stage must be skipped (``train.pretrain_epochs = 0``).
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r}; choose one of {STAGES}")
    terms = ["cls"] if stage == "train" else []
    has_seg = cfg.arch == "mrn" and cfg.use_dpt and not cfg.dinov2_only
    if has_seg and cfg.lambda_seg != 0:
        terms.append("seg")
    if cfg.use_moco and cfg.lambda_con != 0:
        terms.append("con")
    return tuple(terms)


def compute_losses(
    output: MRNOutput, batch: Mapping, stage: str = "train", cfg: ModelConfig | None = None
) -> dict[str, torch.Tensor]:
    """All losses of one step.

    Parameters
    ----------
    output: from ``wrapper.step(batch)`` (``MSupMoCo`` / ``PlainStep``) or ``model(images)``.
    batch: ``label`` (B,) long; optional ``masks`` {name: (B, S, H, W) long merged classes}.
    stage: ``"pretrain"`` (seg + con) or ``"train"`` (cls + seg + con).
    cfg: for ``lambda_seg`` / ``lambda_con`` (defaults of :class:`ModelConfig` if None).

    Returns
    -------
    ``{"total", "cls", "seg", "con"}`` scalars; absent terms are 0 (``cls`` is always
    computed, for logging, but only enters ``total`` in stage ``"train"``).
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r}; choose one of {STAGES}")
    cfg = cfg or ModelConfig()
    zero = output.logits.sum() * 0.0
    cls = F.cross_entropy(output.logits.float(), batch["label"].to(output.logits.device).long())
    seg = zero
    masks = batch.get("masks")
    if output.seg_logits and masks:
        terms = [
            weighted_seg_loss(output.seg_logits[n], masks[n].to(output.logits.device))
            for n in output.seg_logits
            if n in masks
        ]
        if terms:
            seg = torch.stack(terms).mean()
    con = output.contrastive if output.contrastive is not None else zero
    total = cfg.lambda_seg * seg + cfg.lambda_con * con
    if stage == "train":
        total = total + cls
    return {"total": total, "cls": cls, "seg": seg, "con": con}
