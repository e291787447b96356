"""Slice fusion self-attention, SFA (paper 3.2, Fig. 2).

A learned ROI token is prepended to the S slice tokens (after FFA; they carry the slice
position embedding) and ``ModelConfig.sfa_depth`` (L_SFA, paper 2) self-attention blocks
integrate the volume into it; the normed ROI token is the ROI representation g.

``keep`` (B, S) bool leaves slice tokens out of the attention (key mask): the ROI token then
equals SFA over the kept slice tokens only -- per-slice evidence (``models/evidence.py``) runs
on cached FFA outputs, no new backbone pass.
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

    def forward(self, slice_tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, D) slice tokens -> (B, D) ROI token; ``keep`` (B, S) bool: slices attended to."""
        x = torch.cat([self.roi_token.expand(slice_tokens.shape[0], -1, -1), slice_tokens], dim=1)
        mask = self.key_mask(keep, x)
        for block in self.blocks:
            x = block(x) if mask is None else block(x, attn_mask=mask)
        return self.norm(x[:, 0])

    def key_mask(self, keep: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """SDPA boolean mask (B, 1, 1, 1+S) from ``keep``; the ROI token is always attended to."""
        if keep is None:
            return None
        roi = torch.ones(keep.shape[0], 1, dtype=torch.bool, device=keep.device)
        return torch.cat([roi, keep.to(torch.bool)], dim=1).to(x.device)[:, None, None, :]

    def roi_attention(
        self, slice_tokens: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ROI token's attention over [ROI token; slices], head-averaged, per block.

        Returns (L_SFA, B, 1+S): row ``l`` = softmax(q_roi k^T / sqrt(d)) of block ``l``.
        """
        return self.forward_with_attention(slice_tokens, keep)[1]

    def forward_with_attention(
        self, slice_tokens: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and :meth:`roi_attention` in one pass: ((B, D), (L_SFA, B, 1+S))."""
        x = torch.cat([self.roi_token.expand(slice_tokens.shape[0], -1, -1), slice_tokens], dim=1)
        mask = self.key_mask(keep, x)
        rows = []
        for block in self.blocks:
            attn = block.attn
            b, n, c = x.shape
            h = block.norm1(x)
            qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, N)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            rows.append(logits.softmax(dim=-1).mean(dim=1)[:, 0])
            x = block(x) if mask is None else block(x, attn_mask=mask)
        return self.norm(x[:, 0]), torch.stack(rows)
