"""Dense prediction transformer head, DPT (Ranftl et al. 2021; paper 3.2.1, Fig. 3).

Four sets of patch tokens of every slice are unpatchified into maps (D, h, w), h = H / p,
then DPT's *reassemble* stage projects them to ``ModelConfig.dpt_channels`` (paper
96, 192, 384, 768) and resamples them to 4x, 2x, 1x and 1/2x the patch grid; each is mapped
to ``ModelConfig.dpt_fusion`` channels (paper 256). *Fusion* blocks then go from deep to
shallow (residual conv units, bilinear up-sampling, skip fusion); the last one outputs at
one quarter of the slice size. A shared 3x3 conv trunk and one 1x1 output conv per ROI
(``C_roi = ROI_BY_NAME[name].num_classes``; the ROIs differ in their classes) give the
logits at 1/4 resolution, which are bilinearly up-sampled to the slice size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mrn_engine.data.labels import ROIS


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT feature fusion: refine (+ skip), up-sample to ``size``, 1x1 projection."""

    def __init__(self, channels: int, with_skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels) if with_skip else None
        self.unit = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        if self.skip_unit is not None and skip is not None:
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def _resample(channels: int, factor: float) -> nn.Module:
    if factor == 4:
        return nn.ConvTranspose2d(channels, channels, 4, stride=4)
    if factor == 2:
        return nn.ConvTranspose2d(channels, channels, 2, stride=2)
    if factor == 1:
        return nn.Identity()
    return nn.Conv2d(channels, channels, 3, stride=2, padding=1)


class DPTHead(nn.Module):
    """Segmentation of every slice from four token sets.

    Parameters
    ----------
    embed_dim: token width D.
    channels: reassemble projection channels (4 values, shallow to deep).
    fusion: channels of the fusion stage.
    """

    def __init__(self, embed_dim: int, channels: tuple[int, ...], fusion: int) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"dpt_channels needs 4 values, got {channels}")
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, c, 1) for c in channels)
        self.resample = nn.ModuleList(
            _resample(c, f) for c, f in zip(channels, (4, 2, 1, 0.5), strict=True)
        )
        self.layer_rn = nn.ModuleList(
            nn.Conv2d(c, fusion, 3, padding=1, bias=False) for c in channels
        )
        self.fusion = nn.ModuleList(
            FusionBlock(fusion, with_skip=i < 3) for i in range(4)
        )  # deepest: no skip
        self.trunk = nn.Sequential(
            nn.Conv2d(fusion, fusion // 2, 3, padding=1), nn.ReLU(inplace=True)
        )
        self.out = nn.ModuleDict({r.name: nn.Conv2d(fusion // 2, r.num_classes, 1) for r in ROIS})

    def forward(
        self,
        token_sets: list[torch.Tensor],
        grid: tuple[int, int],
        image_size: tuple[int, int],
        roi: str,
    ) -> torch.Tensor:
        """Per-slice logits (N, C_roi, H, W) from four (N, h*w, D) token sets (shallow to deep)."""
        n = token_sets[0].shape[0]
        maps = []
        for i, tokens in enumerate(token_sets):
            x = tokens.transpose(1, 2).reshape(n, -1, grid[0], grid[1])
            x = self.resample[i](self.project[i](x))
            maps.append(self.layer_rn[i](x))
        quarter = (max(1, image_size[0] // 4), max(1, image_size[1] // 4))
        x = self.fusion[3](maps[3], None, maps[2].shape[-2:])
        x = self.fusion[2](x, maps[2], maps[1].shape[-2:])
        x = self.fusion[1](x, maps[1], maps[0].shape[-2:])
        x = self.fusion[0](x, maps[0], quarter)
        logits = self.out[roi](self.trunk(x))  # 1/4 resolution
        return F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
