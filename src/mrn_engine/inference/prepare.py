"""Everything before the model for one case: cropping masks, ROI crops, model inputs.

Shared by :meth:`MRNPredictor.predict_case` and the cohort loader's worker processes
(:mod:`mrn_engine.inference.cohort`), so both feed the network the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mrn_engine.config import RoiConfig
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import InputDataError
from mrn_engine.inference.mask_source import MaskSource
from mrn_engine.inference.masking import check_subset
from mrn_engine.inference.timing import timed
from mrn_engine.rois import RoiCrop, extract_rois


@dataclass
class PreparedCase:
    """One case ready for the network.

    Attributes
    ----------
    case: the loaded ``Case``.
    crops: ROI name -> ``RoiCrop``.
    images: ROI name -> ``(1, S, H, W)`` float32 (zeros for ``zeroed`` ROIs).
    masks: ROI name -> ``(1, S, H, W)`` int64 merged classes (models with ``needs_masks``).
    nm_mask, qsm_mask: the mask overrides used for cropping (None = the case's own).
    mask_source: ``"case"``, ``"given"`` or ``"segmenter"``.
    zeroed: ROIs whose input is all zeros.
    timings: stage -> seconds (``masks``, ``crop``; ``read`` when the loader read the case).
    """

    case: Any
    crops: dict[str, RoiCrop]
    images: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None
    nm_mask: Any = None
    qsm_mask: Any = None
    mask_source: str = "case"
    zeroed: frozenset[str] = frozenset()
    timings: dict[str, float] = field(default_factory=dict)


def model_inputs(
    crops: Mapping[str, RoiCrop], zeroed: frozenset[str], with_masks: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(1, S, H, W)`` images per ROI (and merged-class masks for models that need them)."""
    images: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] | None = {} if with_masks else None
    for name in ROI_NAMES:
        crop = crops[name]
        x = torch.as_tensor(np.asarray(crop.image), dtype=torch.float32)[None]
        images[name] = torch.zeros_like(x) if name in zeroed else x
        if masks is not None:
            if crop.mask is None:
                raise InputDataError(
                    f"{getattr(crop, 'case_id', '') or name}: the model needs masks for ROI {name}"
                )
            m = torch.as_tensor(np.asarray(crop.mask), dtype=torch.long)[None]
            masks[name] = torch.zeros_like(m) if name in zeroed else m
    return images, masks


def prepare_case(
    case: Any,
    roi: RoiConfig,
    mask_source: MaskSource,
    *,
    needs_masks: bool = False,
    nm_mask: Any = None,
    qsm_mask: Any = None,
    zero_rois: frozenset[str] = frozenset(),
) -> PreparedCase:
    """Choose the cropping masks, crop the four ROIs and build the model inputs.

    Raises
    ------
    InputDataError: no masks (and no segmenter), an ROI that cannot be cropped, bad ROI names.
    """
    zeroed = frozenset(zero_rois)
    check_subset(zeroed, case.case_id)
    timings: dict[str, float] = {}
    with timed(timings, "masks"):
        nm_m, qsm_m, source = mask_source.masks_for(case, nm_mask, qsm_mask)
    with timed(timings, "crop"):
        crops = extract_rois(case, roi, nm_mask=nm_m, qsm_mask=qsm_m)
        missing = [n for n in ROI_NAMES if n not in crops]
        if missing:
            raise InputDataError(f"{case.case_id}: no ROI crop for {missing}")
        images, masks = model_inputs(crops, zeroed, needs_masks)
    return PreparedCase(case, crops, images, masks, nm_m, qsm_m, source, zeroed, timings)
