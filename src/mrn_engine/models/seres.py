"""SERes10: the paper's strong 3D CNN baseline (paper 4.2).

What we built and why
---------------------
MONAI has no predefined SE-ResNet-10. ``monai.networks.nets.SENet`` with
``layers=(1, 1, 1, 1)`` uses *bottleneck* SE blocks (2048-d features, ~15 M parameters),
whereas the paper's SERes10 gives 512-d ROI features, which is what *basic* blocks give. So
the shared backbone is MONAI's ResNet-10 (``ResNet(block="basic", layers=[1, 1, 1, 1])``,
its ``layer1``-``layer4`` + global average pool) with a MONAI ``ChannelSELayer``
(squeeze-and-excitation, reduction 16) in each of its four residual blocks, placed as in the
canonical SE-ResNet (Hu et al.): on the residual branch, after the block's second BN and
before the identity/downsample shortcut is added (:class:`SEBasicBlock`).

Each ROI has its own input stem (paper: "separate input stems" for the different input
channels): the ROI image plus one one-hot channel per nucleus class of its mask (the
"mask-enhanced ROI input"), so ``in_channels = 1 + len(classes)``: NM-SN 2, basal ganglia 5,
midbrain 4, dentate 2. The stem is a (3, 7, 7) convolution with stride (1, 2, 2) and a
(1, 3, 3) max-pool, i.e. it does not stride the short axial axis (6-17 slices of 2 mm
against 0.67 mm in-plane). The four 512-d ROI features form the patient vector (B, 2048)
for the same classification head as MRN (and optional mSupMoCo). No segmentation output.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.networks.blocks import ChannelSELayer
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

from mrn_engine.config import ModelConfig, RoiConfig
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import ConfigError, InputDataError
from mrn_engine.models.multiroi import MultiRoiClassifier

WIDTHS = (64, 128, 256, 512)
SE_REDUCTION = 16


def make_stem(in_channels: int, width: int = WIDTHS[0]) -> nn.Sequential:
    """Per-ROI input stem: anisotropic 7x7 conv (no axial stride), BN, ReLU, in-plane max-pool."""
    return nn.Sequential(
        nn.Conv3d(in_channels, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
    )


class SEBasicBlock(nn.Module):
    """A MONAI basic ``ResNetBlock`` with squeeze-and-excitation on its residual branch.

    ``relu(se(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))``: the canonical SE-ResNet
    placement (the SE recalibrates the residual before the sum), which MONAI's
    ``ResNetBlock.forward`` cannot express, so its layers are reused with this forward.
    """

    def __init__(self, block: ResNetBlock, se: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.se = se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        out = b.bn2(b.conv2(b.act(b.bn1(b.conv1(x)))))
        out = self.se(out)
        shortcut = b.downsample(x) if b.downsample is not None else x
        return b.act(out + shortcut)


class SEResNet10Trunk(nn.Module):
    """MONAI ResNet-10 residual stages, SE in each basic block (:class:`SEBasicBlock`)
    -> (B, widths[-1])."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        resnet = ResNet(
            block="basic",
            layers=[1, 1, 1, 1],
            block_inplanes=list(widths),
            spatial_dims=3,
            n_input_channels=widths[0],
            feed_forward=False,
        )
        stages = []
        for i, width in enumerate(widths):
            (block,) = getattr(resnet, f"layer{i + 1}")  # layers=[1, 1, 1, 1]: one block each
            stages.append(SEBasicBlock(block, ChannelSELayer(3, width, r=SE_REDUCTION)))
        self.stages = nn.Sequential(*stages)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool3d(self.stages(x), 1), 1)


class SERes10(MultiRoiClassifier):
    """Separate stems per ROI + shared SE-ResNet-10 + MRN's classification head."""

    arch = "seres10"
    needs_masks = True

    def __init__(self, cfg: ModelConfig, roi_cfg: RoiConfig) -> None:
        widths = tuple(cfg.seres_widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ConfigError(f"model.seres_widths must be 4 positive widths, got {widths}")
        trunk = SEResNet10Trunk(widths)
        super().__init__(cfg, roi_cfg, trunk.out_dim)
        self.trunk = trunk
        self.stems = nn.ModuleDict(
            {n: make_stem(ROI_BY_NAME[n].num_classes, widths[0]) for n in ROI_NAMES}
        )

    def roi_input(self, name: str, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1 + C-1, S, H, W): image scaled to [-1, 1] + one-hot foreground nucleus channels."""
        n_classes = ROI_BY_NAME[name].num_classes
        if mask.shape != image.shape:
            raise InputDataError(
                f"ROI {name!r}: mask {tuple(mask.shape)} does not match image {tuple(image.shape)}"
            )
        mask = mask.long()
        if mask.min() < 0 or mask.max() >= n_classes:
            raise InputDataError(f"ROI {name!r}: mask values must lie in [0, {n_classes - 1}]")
        onehot = F.one_hot(mask, n_classes)[..., 1:].permute(0, 4, 1, 2, 3).to(image.dtype)
        return torch.cat([(image.unsqueeze(1) / 127.5 - 1.0), onehot], dim=1)

    def _encode(
        self,
        rois: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None,
        with_seg: bool,
    ) -> tuple[dict[str, torch.Tensor], None]:
        tokens = {}
        for name, image in rois.items():
            if masks is None or name not in masks:
                raise InputDataError(
                    f"ROI {name!r}: SERes10 needs the ROI's nuclei mask as input (masks=...)"
                )
            tokens[name] = self.trunk(
                self.stems[name](self.roi_input(name, image.float(), masks[name]))
            )
        return tokens, None

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """Everything is trained from scratch: all parameters in the ``head`` group (lr_head).

        There is no pretrained backbone for the low ``lr_backbone`` to protect (training/optim.py).
        """
        return {"backbone": [], "head": [p for p in self.parameters() if p.requires_grad]}
