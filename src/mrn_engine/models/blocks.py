"""The transformer block used by FFA and SFA: timm's ViT block, attention through SDPA.

A block is pre-norm self-attention + MLP with LayerScale and stochastic depth (the DINOv2 /
VGGT block). timm's ``Attention`` calls ``torch.nn.functional.scaled_dot_product_attention``
when ``fused_attn`` is set; we set it explicitly so FFA/SFA always use SDPA (flash /
memory-efficient kernels on CUDA) whatever ``TIMM_FUSED_ATTN`` says.
"""

from __future__ import annotations

from timm.models.vision_transformer import Block

#: LayerScale initialisation of the new (non-DINOv2) blocks, as in VGGT's aggregator
NEW_BLOCK_INIT_VALUES = 0.01


def make_block(dim: int, num_heads: int, drop_path: float = 0.0) -> Block:
    """One pre-norm transformer block of width ``dim`` using SDPA attention."""
    block = Block(
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=NEW_BLOCK_INIT_VALUES,
        drop_path=drop_path,
    )
    block.attn.fused_attn = True
    return block
