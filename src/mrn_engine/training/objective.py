"""The training objective around the models package: student + mSupMoCo/plain wrapper + losses.

``MRNObjective`` adapts the trainer's batches (``{"rois": {name: {"image", "mask"}}, "label"}``)
to the models API (``wrapper.step({"images", "masks", "label"})`` then ``compute_losses``).
Its ``state_dict`` holds the student, the projection head, the EMA teacher and the memory banks
(all of mSupMoCo's training state); ``.student`` is the network saved into the bundle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mrn_engine.config import RunConfig
from mrn_engine.models import build_model, build_training_wrapper, compute_losses


def model_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer batch -> the models API batch (``images``, ``masks``, ``label``)."""
    rois = batch["rois"]
    out: dict[str, Any] = {
        "images": {name: roi["image"] for name, roi in rois.items()},
        "masks": {name: roi["mask"] for name, roi in rois.items() if "mask" in roi},
    }
    if "label" in batch:
        out["label"] = batch["label"]
    return out


def reset_layerscale(model: nn.Module, value: float = 1.0) -> int:
    """Set every LayerScale ``gamma`` of ``model`` to ``value``; returns how many were set.

    DINOv2's LayerScale starts at 1e-5, which suits fine-tuning pretrained weights. From random
    initialisation (cpu-tiny) it makes every block nearly the identity, so the [CLS] slice tokens
    are almost the same for every case: on phantom ROIs the patient vector varied 0.005 across
    cases at init (mean magnitude 0.8) and training did not leave chance; with gammas at 1.0 it
    varies 0.25 (docs/results.md).
    """
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "gamma":  # timm LayerScale (ls1/ls2) and the FFA/SFA blocks
                p.fill_(value)
                n += 1
    return n


class MRNObjective(nn.Module):
    """MRN (or SERes10) with its training wrapper and the paper's losses (Eq. 10-12).

    Parameters
    ----------
    cfg : run configuration; ``cfg.model`` selects the network, mSupMoCo and the loss weights.
    pretrained : load ``cfg.model.backbone_weights`` (see ``build_model``).
    """

    def __init__(self, cfg: RunConfig, *, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        model = build_model(cfg, pretrained=pretrained)
        if not cfg.model.backbone_weights and cfg.train.random_init_layerscale > 0:
            reset_layerscale(model, cfg.train.random_init_layerscale)
        self.wrapper = build_training_wrapper(model, cfg)

    @property
    def student(self) -> nn.Module:
        """The network that goes into ``model.safetensors``."""
        return self.wrapper.model

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.wrapper.lr_groups()

    def forward(self, batch: Mapping[str, Any], stage: str) -> dict[str, torch.Tensor]:
        b = model_batch(batch)
        out = self.wrapper.step(b)
        losses = compute_losses(out, b, stage, self.cfg.model)
        return {
            "loss": losses["total"],
            "loss_cls": losses["cls"].detach(),
            "loss_seg": losses["seg"].detach(),
            "loss_con": losses["con"].detach(),
            "logits": out.logits.detach(),
        }

    def predict_logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        b = model_batch(batch)
        masks = b["masks"] if getattr(self.student, "needs_masks", False) else None
        return self.student(b["images"], masks).logits

    def plan_steps(self, planned_steps: int) -> None:
        """Tell mSupMoCo how many optimiser steps the run has (sets its EMA momentum)."""
        if hasattr(self.wrapper, "plan_steps"):
            self.wrapper.plan_steps(planned_steps)

    def epoch_metrics(self) -> dict[str, float]:
        """Per-epoch diagnostics for metrics.csv: the spread of mSupMoCo's keys (if any)."""
        return self.wrapper.key_spread() if hasattr(self.wrapper, "key_spread") else {}

    def after_step(self) -> None:
        """Nothing: mSupMoCo updates its teacher at the start of each step (MoCo order)."""
