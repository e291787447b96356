"""The output record shared by MRN and the SERes10 baseline (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MRNOutput:
    """What a multi-ROI classifier returns.

    Attributes
    ----------
    logits: (B, 2) class logits [HC, PD].
    roi_tokens: per ROI name, (B, D) ROI token.
    seg_logits: per ROI name, (B, C_roi, S, H, W) segmentation logits, or None (no DPT / SERes10).
    patient: (B, 4D) patient representation (ROI tokens concatenated in ``ROI_NAMES`` order).
    contrastive: the mSupMoCo loss (scalar) when produced by :class:`MSupMoCo`, else None.
    """

    logits: torch.Tensor
    roi_tokens: dict[str, torch.Tensor]
    seg_logits: dict[str, torch.Tensor] | None
    patient: torch.Tensor
    contrastive: torch.Tensor | None = None
