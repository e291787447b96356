"""DINOv2 as a slice "patchnizer" (paper 3.2, Eq. 2).

Every axial slice of an ROI goes through a timm DINOv2 ViT with register tokens; the
[CLS] token becomes the slice token, the patch tokens keep the slice's spatial layout and
the register tokens are dropped (timm puts ``1 + reg`` prefix tokens before the patches,
``num_prefix_tokens``).

Backbones (``ModelConfig.backbone``):

- ``vit_base_patch14_reg4_dinov2`` (paper), ``vit_small_patch14_reg4_dinov2``, or any timm
  DINOv2 name;
- ``"tiny"``: the same timm architecture (patch 14, 4 registers, LayerScale, no pos-embed
  on prefix tokens) at width 64, depth 4, 4 heads, for CPU work and tests;
- ``"tiny-WxD"`` (e.g. ``"tiny-128x6"``): the same at width ``W`` (a multiple of 16) and
  depth ``D``, with ``W / 16`` heads (the head width of ``"tiny"``): CPU-sized steps between
  ``"tiny"`` and ViT-S (384 x 12).

The network is always built with ``pretrained=False``; weights come only from a local file
(:mod:`mrn_engine.models.weights`), so the hub is never contacted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import timm
import torch
from torch import nn

from mrn_engine.errors import ConfigError

#: ImageNet statistics DINOv2 was trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: the tiny test/CPU member of the DINOv2 family (timm kwargs on top of the ViT-S definition)
TINY_KWARGS = {"embed_dim": 64, "depth": 4, "num_heads": 4}
TINY_BASE = "vit_small_patch14_reg4_dinov2"
#: width of one attention head in every ``tiny`` backbone
TINY_HEAD_WIDTH = 16
_TINY_SIZED = re.compile(r"tiny-(\d+)x(\d+)")


def tiny_kwargs(name: str) -> dict[str, int] | None:
    """timm kwargs of a ``"tiny"`` / ``"tiny-WxD"`` backbone name; ``None`` for other names.

    Raises ``ConfigError`` for a ``tiny-...`` name that is not ``tiny-WxD`` with ``W`` a
    positive multiple of 16 and ``D`` >= 1.
    """
    if name == "tiny":
        return dict(TINY_KWARGS)
    if not name.startswith("tiny-"):
        return None
    m = _TINY_SIZED.fullmatch(name)
    width, depth = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if width <= 0 or width % TINY_HEAD_WIDTH or depth < 1:
        raise ConfigError(
            f"model.backbone {name!r}: a sized tiny ViT is 'tiny-WxD' with W a positive multiple "
            f"of {TINY_HEAD_WIDTH} and depth D >= 1, e.g. 'tiny-128x6'"
        )
    return {"embed_dim": width, "depth": depth, "num_heads": width // TINY_HEAD_WIDTH}


def create_vit(name: str, image_size: int, drop_path: float = 0.0) -> nn.Module:
    """A randomly initialised timm DINOv2 ViT for ``image_size`` x ``image_size`` slices.

    Parameters
    ----------
    name: timm model name, ``"tiny"`` or ``"tiny-WxD"``.
    image_size: square slice size (multiple of the patch size 14 is not required: timm
        floors the grid, the DPT interpolates back to the slice size).
    drop_path: stochastic depth rate of the ViT blocks (paper: 0.2).
    """
    kwargs = {"img_size": image_size, "drop_path_rate": drop_path, "num_classes": 0}
    tiny = tiny_kwargs(name)
    if tiny is not None:
        return timm.create_model(TINY_BASE, pretrained=False, **tiny, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def check_token_width(vit: nn.Module, name: str, embed_dim: int) -> int:
    """The width of ``vit``; ``ConfigError`` unless it is ``model.embed_dim`` (``embed_dim``).

    The saved config states the token width D that the bundle's consumers read.
    """
    width = int(vit.embed_dim)
    if width != embed_dim:
        raise ConfigError(
            f"model.embed_dim={embed_dim} but backbone {name!r} is {width} wide: "
            f"set model.embed_dim={width}"
        )
    return width


@dataclass
class SliceTokens:
    """Output of :class:`DinoPatchnizer` for ``B*S`` slices.

    Attributes
    ----------
    slice_tokens: (B*S, D) the [CLS] token of each slice.
    patch_tokens: (B*S, N, D) patch tokens of the final (normed) layer, registers dropped.
    intermediates: patch tokens (B*S, N, D) of the requested intermediate blocks (normed).
    grid: (h, w) patch grid.
    """

    slice_tokens: torch.Tensor
    patch_tokens: torch.Tensor
    intermediates: list[torch.Tensor]
    grid: tuple[int, int]


class DinoPatchnizer(nn.Module):
    """Normalise grey slices in [0, 255] and run them through the DINOv2 ViT.

    Parameters
    ----------
    vit: a timm ``VisionTransformer`` (see :func:`create_vit`).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.depth: int = len(vit.blocks)
        self.num_prefix_tokens: int = vit.num_prefix_tokens  # 1 cls + registers
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.register_buffer(
            "mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False
        )

    def normalise(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, H, W) grey in [0, 255] -> (N, 3, H, W) ImageNet-normalised RGB."""
        x = slices.unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def forward(
        self, slices: torch.Tensor, indices: list[int] | tuple[int, ...] = ()
    ) -> SliceTokens:
        """Tokens of ``slices`` (N, H, W); ``indices`` = extra ViT blocks to return (0-based)."""
        x = self.normalise(slices.float())
        unique = sorted(set(indices)) or [self.depth - 1]
        final, taken = self.vit.forward_intermediates(
            x, indices=unique, norm=True, output_fmt="NLC"
        )
        inter = [taken[unique.index(i)] for i in indices]  # requested order, repeats allowed
        x_final = final  # forward_intermediates applies the final norm
        n = self.num_prefix_tokens
        grid = tuple(self.vit.patch_embed.dynamic_feat_size(slices.shape[-2:]))
        return SliceTokens(
            slice_tokens=x_final[:, 0],
            patch_tokens=x_final[:, n:],
            intermediates=inter,
            grid=(int(grid[0]), int(grid[1])),
        )
