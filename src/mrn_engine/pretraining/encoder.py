"""The networks pretrained by ``mrn pretrain``: a slice backbone + a throw-away projection head.

* ``ViTEmbedder`` (``--arch vit``): the preset's DINOv2-architecture ViT
  (:func:`~mrn_engine.models.backbone.create_vit`, the network ``mrn train`` builds). Every
  axial slice of every ROI goes through it; the [CLS] tokens are averaged over the slices of
  an ROI and the four ROI means concatenated (B, 4D) -- the pooled backbone output.
* ``Res3DEmbedder`` (``--arch anatcl3d``): AnatCL's 3D ResNet-18 trunk
  (:class:`~mrn_engine.models.anatcl3d.ResNet18Trunk`) on each ROI volume, features concatenated.

Both end in a 2-layer MLP projection head with BatchNorm (L2-normalised output for the contrastive loss),
discarded after pretraining; :meth:`backbone_state` is what is saved.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mrn_engine.config import RunConfig
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import ConfigError
from mrn_engine.models.anatcl3d import ResNet18Trunk, volume_input
from mrn_engine.models.backbone import DinoPatchnizer, check_token_width, create_vit

ARCHS = ("vit", "anatcl3d")


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """``BN -> Linear -> BN -> ReLU -> Linear`` (SimCLR-style, width ``in_dim``).

    The input BatchNorm matters from random initialisation: the pooled [CLS] features of a
    from-scratch cpu-tiny ViT differ across cases by ~2 % of their magnitude (the same reason
    cpu-tiny's classifier has ``head_input_norm``); unnormalised, every projection starts at the
    same point and the contrastive loss sits at ``log(2B - 1)`` (measured: 3.434 for B = 16).
    """
    return nn.Sequential(
        nn.BatchNorm1d(in_dim),
        nn.Linear(in_dim, in_dim),
        nn.BatchNorm1d(in_dim),
        nn.ReLU(inplace=True),
        nn.Linear(in_dim, out_dim),
    )


class _Projected(nn.Module):
    """``features`` (B, R*F) -> L2-normalised projections: one head on the whole vector
    (B, proj_dim), or with ``per_roi`` one head per ROI on its own F features (R, B, proj_dim),
    for AnatCL's ``roi`` variant."""

    def _projections(self, feature_dim: int, proj_dim: int, per_roi: bool) -> None:
        self.feature_dim = feature_dim
        self.per_roi = per_roi
        if per_roi:
            per = feature_dim // len(ROI_NAMES)
            self.heads = nn.ModuleList(projection_head(per, proj_dim) for _ in ROI_NAMES)
        else:
            self.head = projection_head(feature_dim, proj_dim)

    def features(self, rois: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, rois: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised projections: (B, proj_dim), or (R, B, proj_dim) per ROI."""
        return self.project(self.features(rois))

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """The projections of features ``f`` (B, R*F) (what :meth:`forward` returns)."""
        if not self.per_roi:
            return F.normalize(self.head(f), dim=1)
        parts = f.split(self.feature_dim // len(ROI_NAMES), dim=1)
        return torch.stack(
            [F.normalize(h(x), dim=1) for h, x in zip(self.heads, parts, strict=True)]
        )


class ViTEmbedder(_Projected):
    """DINOv2 ViT slice backbone -> per-ROI mean [CLS] -> (B, 4D) -> projection(s)."""

    def __init__(self, cfg: RunConfig, per_roi: bool = False) -> None:
        super().__init__()
        vit = create_vit(cfg.model.backbone, cfg.roi.image_size, cfg.model.drop_path)
        check_token_width(vit, cfg.model.backbone, cfg.model.embed_dim)
        self.patchnizer = DinoPatchnizer(vit)
        self._projections(len(ROI_NAMES) * self.patchnizer.embed_dim, cfg.model.proj_dim, per_roi)

    def features(self, rois: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, 4D) pooled backbone output of ``rois[name]`` (B, S, H, W) in [0, 255]."""
        out = []
        for name in ROI_NAMES:
            x = rois[name]
            b, s = x.shape[:2]
            cls = self.patchnizer(x.reshape(b * s, *x.shape[2:])).slice_tokens
            out.append(cls.reshape(b, s, -1).mean(dim=1))
        return torch.cat(out, dim=1)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The ViT's ``state_dict`` in timm's key layout (what ``mrn train --weights`` loads)."""
        return self.patchnizer.vit.state_dict()


class Res3DEmbedder(_Projected):
    """3D ResNet-18 trunk per ROI volume -> (B, 4F) -> projection(s)."""

    def __init__(self, cfg: RunConfig, per_roi: bool = False) -> None:
        super().__init__()
        self.trunk = ResNet18Trunk(int(cfg.model.seres_widths[-1]))
        self._projections(len(ROI_NAMES) * self.trunk.out_dim, cfg.model.proj_dim, per_roi)

    def features(self, rois: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.trunk(volume_input(rois[n])) for n in ROI_NAMES], dim=1)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The trunk's ``state_dict`` (what ``model.arch="anatcl3d"`` loads)."""
        return self.trunk.state_dict()


def build_embedder(
    cfg: RunConfig, arch: str = "vit", per_roi: bool = False
) -> ViTEmbedder | Res3DEmbedder:
    """The embedder of ``arch`` for the preset ``cfg`` (``per_roi``: one projection per ROI)."""
    if arch == "vit":
        return ViTEmbedder(cfg, per_roi)
    if arch == "anatcl3d":
        return Res3DEmbedder(cfg, per_roi)
    raise ConfigError(f"unknown pretraining arch {arch!r}; choose one of {ARCHS}")
