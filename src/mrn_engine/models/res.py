"""RES: one ROI branch, shared by the four ROIs (paper 3.2, Eq. 1-3, Fig. 2).

``(B, S, H, W)`` ROI slices in [0, 255]
 -> DINOv2 patchnizer: per slice a slice token ([CLS]) + N patch tokens (registers dropped)
 -> + learned slice position embedding (per slice index) on every token of the slice (Eq. 3)
 -> FFA: L_FFA x (global attention over all slices, local attention within a slice)
 -> DPT on four token sets -> per-slice segmentation, concatenated to (B, C, S, H, W)
 -> SFA over [ROI token; slice tokens] -> ROI token g (B, D).

Ablations (``ModelConfig``): ``use_ffa`` off = DINOv2 tokens go straight to SFA/DPT (the DPT
then reads backbone blocks 3, 6, 9, 11, scaled to the depth, the paper's "DINOv2 + DPT");
``use_sfa`` off = ROI token is the mean of the slice tokens; ``use_dpt`` off = no
segmentation; ``dinov2_only`` = mean of DINOv2 slice tokens, nothing else (paper baseline).

``nuclei_pool`` (not in the paper): each slice token after FFA gets ``Linear(LayerNorm(m))``
added, ``m`` the mean of the slice's patch tokens weighted by the share of nucleus voxels in
each patch (the case's merged-class masks, any class). A slice without nucleus voxels adds
the constant ``Linear(LayerNorm(0))``. The [CLS] token must find a nucleus' mean signal among
all patches; this hands it to SFA directly (docs/results.md, issue 14).

DPT token sets (paper Fig. 3, L_FFA = 3): final DINOv2 layer + the three FFA global
attentions ("global"), or the same with the last one taken from the final local attention
("local", paper default). For L_FFA > 3 the last three FFA layers are used; for L_FFA < 3 the
missing shallow sets are DINOv2 blocks evenly spaced in depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrn_engine.config import ModelConfig
from mrn_engine.errors import ConfigError, InputDataError
from mrn_engine.models.backbone import DinoPatchnizer, check_token_width, create_vit
from mrn_engine.models.dpt import DPTHead
from mrn_engine.models.ffa import FFA
from mrn_engine.models.sfa import SFA

#: backbone blocks the plain DPT reads (paper 4.3.2, "DINOv2 + DPT"), for a 12-block ViT
PLAIN_DPT_LAYERS = (3, 6, 9, 11)


@dataclass
class RESOutput:
    """ROI token (B, D), segmentation logits (B, C, S, H, W) or None, and the slice tokens
    (B, S, D) that entered SFA (after FFA; None for the DINOv2-only baseline)."""

    roi_token: torch.Tensor
    seg_logits: torch.Tensor | None
    slice_tokens: torch.Tensor | None = None


def plain_dpt_layers(depth: int) -> list[int]:
    """Blocks 3, 6, 9, 11 of a 12-block ViT, scaled to ``depth`` (0-based)."""
    return [min(depth - 1, round(i * depth / 12)) for i in PLAIN_DPT_LAYERS]


def extra_backbone_layers(depth: int, count: int) -> list[int]:
    """``count`` DINOv2 blocks evenly spaced before the last one (0-based)."""
    return [max(0, round((j + 1) * depth / (count + 1)) - 1) for j in range(count)]


class RES(nn.Module):
    """ROI feature extraction and segmentation branch.

    Parameters
    ----------
    cfg: the model configuration.
    image_size: slice size H = W.
    """

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.patchnizer = DinoPatchnizer(create_vit(cfg.backbone, image_size, cfg.drop_path))
        dim = check_token_width(self.patchnizer.vit, cfg.backbone, cfg.embed_dim)
        if dim % cfg.num_heads:
            raise ConfigError(
                f"model.num_heads={cfg.num_heads} does not divide the backbone width {dim}"
            )
        if cfg.dpt_features not in ("local", "global"):
            raise ConfigError(
                f"model.dpt_features must be 'local' or 'global', got {cfg.dpt_features!r}"
            )
        self.embed_dim = dim
        full = not cfg.dinov2_only
        self.slice_pos = nn.Parameter(torch.zeros(1, cfg.max_slices, 1, dim)) if full else None
        if self.slice_pos is not None:
            nn.init.trunc_normal_(self.slice_pos, std=0.02)
        self.ffa = (
            FFA(dim, cfg.num_heads, cfg.ffa_depth, cfg.drop_path) if full and cfg.use_ffa else None
        )
        self.sfa = (
            SFA(dim, cfg.num_heads, cfg.sfa_depth, cfg.drop_path) if full and cfg.use_sfa else None
        )
        self.dpt = (
            DPTHead(dim, tuple(cfg.dpt_channels), cfg.dpt_fusion) if full and cfg.use_dpt else None
        )
        self.nuclei_proj = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
            if full and cfg.nuclei_pool
            else None
        )
        depth = self.patchnizer.depth
        if self.dpt is not None and self.ffa is None:
            self.backbone_layers = plain_dpt_layers(depth)
        elif self.dpt is not None:
            self.backbone_layers = extra_backbone_layers(depth, max(0, 3 - cfg.ffa_depth))
        else:
            self.backbone_layers = []

    def forward(
        self,
        x: torch.Tensor,
        roi: str,
        with_seg: bool = True,
        masks: torch.Tensor | None = None,
    ) -> RESOutput:
        """``x``: (B, S, H, W) in [0, 255] -> ROI token (and segmentation of ROI ``roi``).

        ``masks``: (B, S, H, W) merged nuclei classes, needed with ``nuclei_pool`` only.
        """
        b, s, h, w = x.shape
        if self.nuclei_proj is not None and (masks is None or masks.shape != x.shape):
            got = "none" if masks is None else tuple(masks.shape)
            raise InputDataError(
                f"ROI {roi!r}: model.nuclei_pool needs nuclei masks shaped like the slices "
                f"{tuple(x.shape)}, got {got}"
            )
        if self.slice_pos is not None and s > self.slice_pos.shape[1]:
            raise InputDataError(
                f"ROI {roi!r}: {s} slices but the model has {self.slice_pos.shape[1]} slice positions "
                "(model.max_slices)"
            )
        out = self.patchnizer(x.reshape(b * s, h, w), self.backbone_layers)
        d, n = self.embed_dim, out.patch_tokens.shape[1]
        slice_tokens = out.slice_tokens.reshape(b, s, d)
        if self.slice_pos is None:  # DINOv2 baseline
            return RESOutput(slice_tokens.mean(dim=1), None)

        tokens = torch.cat([out.slice_tokens[:, None], out.patch_tokens], dim=1).reshape(
            b, s, 1 + n, d
        )
        tokens = tokens + self.slice_pos[:, :s]
        token_sets: list[torch.Tensor] = []
        if self.ffa is not None:
            ffa = self.ffa(tokens)
            tokens = ffa.tokens
            if self.dpt is not None and with_seg:
                sets = list(ffa.global_outputs)
                if self.cfg.dpt_features == "local":
                    sets[-1] = ffa.local_outputs[-1]
                token_sets = [t.reshape(b * s, 1 + n, d)[:, 1:] for t in sets[-3:]]
                token_sets = [*out.intermediates, out.patch_tokens, *token_sets]
        elif self.dpt is not None and with_seg:
            token_sets = list(out.intermediates)

        seg = None
        if self.dpt is not None and with_seg:
            seg = self.dpt(token_sets, out.grid, (h, w), roi)  # (B*S, C, H, W)
            seg = seg.reshape(b, s, -1, h, w).transpose(1, 2)
        slice_tokens = tokens[:, :, 0]
        if self.nuclei_proj is not None:
            pooled = nuclei_mean(tokens[:, :, 1:], masks, out.grid)
            slice_tokens = slice_tokens + self.nuclei_proj(pooled)
        roi_token = self.sfa(slice_tokens) if self.sfa is not None else slice_tokens.mean(dim=1)
        return RESOutput(roi_token, seg, slice_tokens)


def nuclei_mean(
    patch_tokens: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """(B, S, D) mean of ``patch_tokens`` (B, S, N, D) weighted by each patch's share of
    nucleus voxels in ``masks`` (B, S, H, W); 0 for a slice without nucleus voxels."""
    b, s, n, d = patch_tokens.shape
    inside = (masks > 0).to(patch_tokens.dtype).reshape(b * s, 1, *masks.shape[-2:])
    share = F.adaptive_avg_pool2d(inside, grid).reshape(b, s, n, 1)
    total = share.sum(dim=2)
    return (patch_tokens * share).sum(dim=2) / total.clamp_min(1e-6)
