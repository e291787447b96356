"""Training augmentations of ROI slice stacks (paper 4.1.2), built from MONAI dict transforms.

A stack ``(S, H, W)`` is handed to MONAI as channel-first 2-D data (channels = slices), so
every spatial transform moves all slices of an ROI together and the mask with its image.
``H`` is the subject's left-right axis (nibabel X), so ``spatial_axis=0`` is the mirror; the ROI
masks merge left and right labels, which makes the mirror label-safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

#: largest seed value MONAI's ``set_random_state`` accepts
_MAX_SEED = 2**32 - 1


def build_roi_transform(with_mask: bool = True) -> Compose:
    """The random transform applied to one ROI (``{"image": (S,H,W)[, "mask": (S,H,W)]}``).

    Images are in ``[0, 255]``; intensity magnitudes are chosen for that range.
    """
    both = ["image", "mask"] if with_mask else ["image"]
    modes = ["bilinear", "nearest"] if with_mask else ["bilinear"]
    return Compose(
        [
            RandFlipd(keys=both, prob=0.5, spatial_axis=0),  # left/right mirror (H = X)
            RandRotated(
                keys=both,
                range_x=math.radians(10),
                prob=0.3,
                mode=modes,
                padding_mode="zeros",
                keep_size=True,
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=10.0, prob=0.3),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
            RandGaussianNoised(keys="image", std=4.0, prob=0.2),
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

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._with_mask = build_roi_transform(with_mask=True)
        self._image_only = build_roi_transform(with_mask=False)

    def __call__(
        self, rois: Mapping[str, Mapping[str, np.ndarray | None]], key: int
    ) -> dict[str, dict[str, np.ndarray | None]]:
        """Augment ``{name: {"image": (S,H,W) float, "mask": (S,H,W) int | None}}``."""
        rng = np.random.default_rng([self.seed, int(key)])
        out: dict[str, dict[str, np.ndarray | None]] = {}
        for name in sorted(rois):
            image = np.asarray(rois[name]["image"], dtype=np.float32)
            mask = rois[name].get("mask")
            t = self._with_mask if mask is not None else self._image_only
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
