"""AnatCL's 3D backbone as a baseline: a MONAI 3D ResNet-18 on the ROI volumes (``anatcl3d``).

AnatCL pretrains a 3D ResNet-18 on whole-brain volumes with its anatomy-aware contrastive
loss (:mod:`mrn_engine.models.yaware`) and fine-tunes it per task. Here the same network
(``monai.networks.nets.resnet18``, ``spatial_dims=3``, basic blocks, layers 2-2-2-2) reads
each ROI stack as a one-channel volume (image only, scaled to [-1, 1]; no mask channels, as
in AnatCL), one trunk shared by the four ROIs. Two changes for ROI stacks of 6-16 axial
slices of 2 mm against 0.67 mm in-plane: the stem convolution is (3, 7, 7) with stride
(1, 2, 2), so it does not stride the short axis; and the width follows the preset
(``model.seres_widths[-1] / 512`` as MONAI's ``widen_factor``: 1 = the paper's 64-512,
cpu-tiny a quarter). The four ROI features form the patient vector for MRN's head.

Pretrained trunk weights are a safetensors file of the trunk's ``state_dict``
(``mrn pretrain --arch anatcl3d``), loaded by :func:`load_trunk_weights`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.networks.nets import resnet18
from torch import nn

from mrn_engine.config import ModelConfig, RoiConfig
from mrn_engine.errors import ConfigError, WeightsError
from mrn_engine.models.multiroi import MultiRoiClassifier
from mrn_engine.models.weights import card_provenance, read_state_dict, warn_if_collapsed
from mrn_engine.runtime import file_sha256


class ResNet18Trunk(nn.Module):
    """MONAI 3D ResNet-18 without its classifier: (B, 1, S, H, W) -> (B, out_dim)."""

    def __init__(self, out_dim: int = 512) -> None:
        super().__init__()
        if out_dim < 8 or out_dim % 8:
            raise ConfigError(f"ResNet-18 width {out_dim}: expected a positive multiple of 8")
        self.net = resnet18(
            spatial_dims=3,
            n_input_channels=1,
            feed_forward=False,
            widen_factor=out_dim / 512,
            conv1_t_size=(3, 7, 7),
            conv1_t_stride=(1, 2, 2),
        )
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def volume_input(image: torch.Tensor) -> torch.Tensor:
    """(B, S, H, W) in [0, 255] -> (B, 1, S, H, W) in [-1, 1]."""
    return image.float().unsqueeze(1) / 127.5 - 1.0


class AnatCL3D(MultiRoiClassifier):
    """Shared 3D ResNet-18 over the four ROI volumes + MRN's classification head."""

    arch = "anatcl3d"
    needs_masks = False

    def __init__(self, cfg: ModelConfig, roi_cfg: RoiConfig) -> None:
        trunk = ResNet18Trunk(int(cfg.seres_widths[-1]))
        super().__init__(cfg, roi_cfg, trunk.out_dim)
        self.trunk = trunk

    def _encode(
        self,
        rois: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None,
        with_seg: bool,
    ) -> tuple[dict[str, torch.Tensor], None]:
        return {name: self.trunk(volume_input(x)) for name, x in rois.items()}, None

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trunk at ``lr_backbone`` (it may carry pretrained weights), the head at ``lr_head``."""
        trunk = {id(p) for p in self.trunk.parameters()}
        return {
            "backbone": [p for p in self.trunk.parameters() if p.requires_grad],
            "head": [p for p in self.parameters() if p.requires_grad and id(p) not in trunk],
        }


def load_trunk_weights(trunk: ResNet18Trunk, path: str | os.PathLike) -> dict:
    """Load ``mrn pretrain --arch anatcl3d`` weights into ``trunk``; returns their provenance.

    Raises
    ------
    WeightsError: unreadable file, or keys / shapes that do not match the trunk.
    """
    path = Path(path).expanduser().resolve()
    state = read_state_dict(path)
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{path}: not weights of this 3D ResNet-18 trunk (width {trunk.out_dim}): "
            f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(wrong)} shape mismatch(es) {wrong[:3]}"
        )
    trunk.load_state_dict(state, strict=True)
    sha = file_sha256(path)
    out = {
        "backbone": "resnet18-3d",
        "path": str(path),
        "sha256": sha,
        "format": "mrn-anatcl3d",
    }
    card = card_provenance(path, sha)
    if card:
        out["card"] = card
        warn_if_collapsed(path, card)
    return out
