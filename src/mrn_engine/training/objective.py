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
        self.wrapper = build_training_wrapper(build_model(cfg, pretrained=pretrained), cfg)

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

    def after_step(self) -> None:
        """Nothing: mSupMoCo updates its teacher at the start of each step (MoCo order)."""
