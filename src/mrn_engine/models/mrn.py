"""MRN: the multi-ROI driven classification network (paper 3.3, Fig. 1, Eq. 4-7).

The four ROIs (NM-SN, QSM basal ganglia, QSM midbrain, QSM dentate) go through ONE shared
:class:`~mrn_engine.models.res.RES`; their ROI tokens are concatenated into the patient
representation (B, 4D) and classified by a 2-layer MLP with dropout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mrn_engine.config import ModelConfig, RoiConfig
from mrn_engine.models.multiroi import MultiRoiClassifier
from mrn_engine.models.res import RES


class MRN(MultiRoiClassifier):
    """The paper's network: shared RES over four ROIs + classification head."""

    arch = "mrn"
    needs_masks = False

    def __init__(self, cfg: ModelConfig, roi_cfg: RoiConfig) -> None:
        res = RES(cfg, roi_cfg.image_size)
        super().__init__(cfg, roi_cfg, res.embed_dim)
        self.res = res
        self.needs_masks = res.nuclei_proj is not None

    def _encode(
        self,
        rois: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None,
        with_seg: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        tokens, seg = {}, {}
        for name, x in rois.items():
            mask = masks[name] if self.needs_masks and masks is not None else None
            out = self.res(x, name, with_seg=with_seg, masks=mask)
            tokens[name] = out.roi_token
            if out.seg_logits is not None:
                seg[name] = out.seg_logits
        return tokens, (seg or None)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """DINOv2, slice positions, FFA, SFA -> ``backbone``; DPT and classification head ->
        ``head``; ``fusion``: the backbone's parameters outside the ViT (slice positions, FFA,
        SFA), which ``train.lr_fusion`` may train at their own rate."""
        head_ids = {id(p) for p in self.head.parameters()}
        if self.res.dpt is not None:
            head_ids |= {id(p) for p in self.res.dpt.parameters()}
        vit_ids = {id(p) for p in self.res.patchnizer.parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        backbone = [p for p in params if id(p) not in head_ids]
        return {
            "backbone": backbone,
            "fusion": [p for p in backbone if id(p) not in vit_ids],
            "head": [p for p in params if id(p) in head_ids],
        }
