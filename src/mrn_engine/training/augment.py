"""Training augmentations of ROI slice stacks (paper 4.1.2), built from MONAI dict transforms.

A stack ``(S, H, W)`` is handed to MONAI as channel-first 2-D data (channels = slices), so
every spatial transform moves all slices of an ROI together and the mask with its image.
``H`` is the subject's left-right axis (nibabel X), so ``spatial_axis=0`` is the mirror; the ROI
masks merge left and right labels, which makes the mirror label-safe.

Scanner variation (issue 13, docs/phantom.md): the intensity mapping removes a site's NM gain
and offset exactly, but not its NM contrast-to-noise (sequence contrast / noise level: factor
0.5-1.7 between the phantom sites), its bias field, or its QSM noise. The NM stacks therefore
get a contrast scaling of 0.55-1.8 about their mean and a smooth bias field, the QSM stacks
extra noise (up to 12 grey levels = 19 ppb) and a +-10 % scaling; every site of
:mod:`mrn_engine.phantom.site` lies inside these ranges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
)

from mrn_engine.data.labels import ROI_BY_NAME

#: largest seed value MONAI's ``set_random_state`` accepts
_MAX_SEED = 2**32 - 1


def build_roi_transform(
    with_mask: bool = True, modality: str = "QSM", mirror: bool = True, intensity: bool = True
) -> Compose:
    """The random transform applied to one ROI (``{"image": (S,H,W)[, "mask": (S,H,W)]}``).

    Images are in ``[0, 255]``; intensity magnitudes are chosen for that range. ``modality``
    (``"NM"`` or ``"QSM"``) sets the scanner-variation part (module docstring). ``mirror=False``
    drops the left/right flip (anatomy-aware pretraining: left/right asymmetry is a weak label).
    ``intensity=False`` keeps the geometry (rotation, flip) and mild noise only: for AnatCL
    pretraining, whose weak labels include each nucleus's mean NM contrast and susceptibility,
    which the contrast, gamma, histogram and scanner transforms would change between two
    views of one case (docs/pretraining.md).
    """
    both = ["image", "mask"] if with_mask else ["image"]
    modes = ["bilinear", "nearest"] if with_mask else ["bilinear"]
    pads = ["border", "zeros"] if with_mask else ["border"]  # image: no fake dark corners
    geometric = [
        RandFlipd(keys=both, prob=0.5 if mirror else 0.0, spatial_axis=0),  # L/R (H = X)
        RandRotated(
            keys=both,
            range_x=math.radians(10),
            prob=0.3,
            mode=modes,
            padding_mode=pads,
            keep_size=True,
        ),
    ]
    if not intensity:
        return Compose([*geometric, RandGaussianNoised(keys="image", std=2.0, prob=0.5)])
    if modality == "NM":
        scanner = [
            RandScaleIntensityFixedMeand(keys="image", factors=(-0.45, 0.8), prob=0.5),
            RandBiasFieldd(keys="image", coeff_range=(0.0, 0.15), prob=0.3),
            RandGaussianNoised(keys="image", std=4.0, prob=0.2),
        ]
    else:
        scanner = [
            RandScaleIntensityFixedMeand(keys="image", factors=0.1, prob=0.3),
            RandGaussianNoised(keys="image", std=12.0, prob=0.3),
        ]
    return Compose(
        [
            *geometric,
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=10.0, prob=0.3),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
            *scanner,
            RandHistogramShiftd(keys="image", num_control_points=(5, 10), prob=0.2),
        ]
    )


def _plain(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.detach().cpu().numpy()
    return np.asarray(x)


class RoiAugmenter:
    """Seeded augmentation of a case's ROI stacks.

    The random draw of a sample depends only on ``(seed, key)`` (e.g. ``key`` = epoch and
    position), so a resumed run augments exactly as an uninterrupted one.
    """

    def __init__(self, seed: int = 0, mirror: bool = True, intensity: bool = True) -> None:
        self.seed = int(seed)
        self._transforms = {
            (mod, m): build_roi_transform(
                with_mask=m, modality=mod, mirror=mirror, intensity=intensity
            )
            for mod in ("NM", "QSM")
            for m in (True, False)
        }
        self._with_mask = self._transforms[("QSM", True)]
        self._image_only = self._transforms[("QSM", False)]

    def __call__(
        self, rois: Mapping[str, Mapping[str, np.ndarray | None]], key: int
    ) -> dict[str, dict[str, np.ndarray | None]]:
        """Augment ``{name: {"image": (S,H,W) float, "mask": (S,H,W) int | None}}``."""
        rng = np.random.default_rng([self.seed, int(key)])
        out: dict[str, dict[str, np.ndarray | None]] = {}
        for name in sorted(rois):
            image = np.asarray(rois[name]["image"], dtype=np.float32)
            mask = rois[name].get("mask")
            mod = ROI_BY_NAME[name].modality if name in ROI_BY_NAME else "QSM"
            t = self._transforms[(mod, mask is not None)]
            t.set_random_state(seed=int(rng.integers(_MAX_SEED)))
            data = {"image": image}
            if mask is not None:
                data["mask"] = np.asarray(mask).astype(np.float32)
            res = t(data)
            new_image = np.clip(_plain(res["image"]), 0.0, 255.0).astype(np.float32)
            new_mask = None
            if mask is not None:
                new_mask = np.rint(_plain(res["mask"])).astype(np.asarray(mask).dtype)
            out[name] = {"image": new_image, "mask": new_mask}
        return out
