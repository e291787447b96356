"""Batch collation of ROI crops into the tensors the model takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mrn_engine.errors import InputDataError
from mrn_engine.rois.extract import RoiCrop


def stack_rois(
    crops: Mapping[str, RoiCrop] | Sequence[Mapping[str, RoiCrop]],
) -> dict[str, dict[str, torch.Tensor]]:
    """Collate ROI crops of one or several cases.

    Parameters
    ----------
    crops : dict or list of dicts
        ``name -> RoiCrop`` for one case (batch of 1) or a list of such dicts (one per case).

    Returns
    -------
    dict
        ``name -> {"image": (B, S, H, W) float32, "mask": (B, S, H, W) int64}``; ``"mask"`` is
        left out for an ROI where any case has no mask.
    """
    batch = [crops] if isinstance(crops, Mapping) else list(crops)
    if not batch:
        raise InputDataError("stack_rois: empty batch")
    names = list(batch[0])
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        items = []
        for i, case in enumerate(batch):
            if name not in case:
                raise InputDataError(f"stack_rois: case {i} has no ROI {name!r}")
            items.append(case[name])
        shapes = {c.image.shape for c in items}
        if len(shapes) > 1:
            raise InputDataError(
                f"stack_rois: ROI {name} stacks differ in shape {sorted(shapes)}; "
                "use one RoiConfig for the whole batch"
            )
        entry = {"image": torch.from_numpy(np.stack([c.image for c in items]).astype(np.float32))}
        if all(c.mask is not None for c in items):
            entry["mask"] = torch.from_numpy(np.stack([c.mask for c in items]).astype(np.int64))
        out[name] = entry
    return out
