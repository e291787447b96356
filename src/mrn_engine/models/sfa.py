"""Slice fusion self-attention, SFA (paper 3.2, Fig. 2).

A learned ROI token is prepended to the S slice tokens (after FFA; they carry the slice
position embedding) and ``ModelConfig.sfa_depth`` (L_SFA, paper 2) self-attention blocks
integrate the volume into it; the normed ROI token is the ROI representation g.
"""

from __future__ import annotations

import torch
from torch import nn

from mrn_engine.models.blocks import make_block


class SFA(nn.Module):
    """ROI token <- L_SFA self-attention blocks over [ROI token; slice tokens]."""

    def __init__(self, dim: int, num_heads: int, depth: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.roi_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.roi_token, std=0.02)
        self.blocks = nn.ModuleList(make_block(dim, num_heads, drop_path) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, slice_tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, D) slice tokens -> (B, D) ROI token."""
        x = torch.cat([self.roi_token.expand(slice_tokens.shape[0], -1, -1), slice_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])
