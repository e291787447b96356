"""Feature fusion self-attention, FFA (paper 3.2, Fig. 2; the VGGT alternating pattern).

An FFA layer is a pair of blocks over the tokens of one ROI, shape (B, S, T, D) with
T = 1 slice token + N patch tokens per slice:

1. global self-attention over all S*T tokens of all slices (3D volumetric context);
2. local (slice) self-attention within each slice's T tokens (keeps tokens' spatial origin).

``ModelConfig.ffa_depth`` (L_FFA, paper 3) layers are stacked; the outputs of every global
and every local attention are returned for the DPT head (Fig. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mrn_engine.models.blocks import make_block


@dataclass
class FFAOutput:
    """Tokens after FFA and per-layer outputs, each (B, S, T, D)."""

    tokens: torch.Tensor
    global_outputs: list[torch.Tensor]
    local_outputs: list[torch.Tensor]


class FFA(nn.Module):
    """L_FFA alternating global / local self-attention layers.

    Parameters
    ----------
    dim, num_heads: token width and attention heads.
    depth: number of (global, local) pairs, L_FFA.
    drop_path: stochastic depth rate of the blocks.
    """

    def __init__(self, dim: int, num_heads: int, depth: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.depth = depth
        self.global_blocks = nn.ModuleList(
            make_block(dim, num_heads, drop_path) for _ in range(depth)
        )
        self.local_blocks = nn.ModuleList(
            make_block(dim, num_heads, drop_path) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> FFAOutput:
        """``x``: (B, S, T, D) slice + patch tokens of every slice (slice positions added)."""
        b, s, t, d = x.shape
        global_outputs, local_outputs = [], []
        for global_block, local_block in zip(self.global_blocks, self.local_blocks, strict=True):
            x = global_block(x.reshape(b, s * t, d)).reshape(b, s, t, d)
            global_outputs.append(x)
            x = local_block(x.reshape(b * s, t, d)).reshape(b, s, t, d)
            local_outputs.append(x)
        return FFAOutput(tokens=x, global_outputs=global_outputs, local_outputs=local_outputs)
