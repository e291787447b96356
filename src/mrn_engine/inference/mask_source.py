"""Where the cropping masks of a case come from: given masks, the case's files, or nnU-Net."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from mrn_engine.bundle import ModelBundle
from mrn_engine.errors import InputDataError
from mrn_engine.runtime import resolve_device
from mrn_engine.segmentation import NNUNetSegmenter
from mrn_engine.segmentation.settings import SegInferenceSettings


class Segmenter(Protocol):
    """What the predictor needs from a segmenter (e.g. ``mrn_engine.segmentation.NNUNetSegmenter``)."""

    def predict(self, case: Any) -> tuple[Any, Any]:
        """``(nm_mask, qsm_mask)`` Volumes on the case's NM / QSM grids."""
        ...


def volume_array(v: Any) -> np.ndarray:
    """The array of a ``Volume`` (or of an array-like)."""
    return v.array if hasattr(v, "array") else np.asarray(v)


def mask_array(v: Any) -> np.ndarray | None:
    """A mask Volume / array as ``uint8`` (None stays None)."""
    return None if v is None else np.asarray(volume_array(v), dtype=np.uint8)


class MaskSource:
    """Chooses the NM/QSM masks a case's ROIs are cropped with.

    Parameters
    ----------
    segmenter: object with ``predict(case) -> (nm_mask, qsm_mask)`` for cases without masks.
    segmenter_factory: builds the segmenter on first need (the bundle's nnU-Net models are
        then never loaded for cases that have masks).
    ignore_masks: never use the case's own mask files.
    """

    def __init__(
        self,
        segmenter: Segmenter | None = None,
        segmenter_factory: Callable[[], Segmenter] | None = None,
        ignore_masks: bool = False,
    ) -> None:
        self.segmenter = segmenter
        self.segmenter_factory = segmenter_factory
        self.ignore_masks = ignore_masks
        #: nnU-Net settings the factory was built with (None: ``SegInferenceSettings()``)
        self.seg_settings: SegInferenceSettings | None = None

    def masks_for(
        self, case: Any, nm_mask: Any = None, qsm_mask: Any = None
    ) -> tuple[Any, Any, str]:
        """``(nm_override, qsm_override, source)``; an override of None = the case's own mask.

        ``source`` is ``"given"`` (explicit masks), ``"case"`` (the case's files) or
        ``"segmenter"``. ``InputDataError`` when a mask is missing and there is no segmenter.
        """
        source = "given" if (nm_mask is not None or qsm_mask is not None) else "case"
        have_nm = nm_mask is not None or (
            not self.ignore_masks and getattr(case, "nm_mask", None) is not None
        )
        have_qsm = qsm_mask is not None or (
            not self.ignore_masks and getattr(case, "qsm_mask", None) is not None
        )
        if have_nm and have_qsm:
            if self.ignore_masks:  # explicit masks only; never fall back to the case's files
                source = "given"
            return nm_mask, qsm_mask, source
        if self.segmenter is None and self.segmenter_factory is not None:
            self.segmenter = self.segmenter_factory()  # e.g. nnU-Net models loaded on first need
        if self.segmenter is None:
            missing = " / ".join(
                n
                for n, ok in (("NM_mask.nii.gz", have_nm), ("QSM_mask.nii.gz", have_qsm))
                if not ok
            )
            why = " (mask files ignored)" if self.ignore_masks else ""
            raise InputDataError(
                f"{case.case_id}: case has no {missing}{why} and no nnU-Net models in the bundle "
                "(add the masks, or use a bundle with nnunet/ models)"
            )
        seg_nm, seg_qsm = self.segmenter.predict(case)
        return (nm_mask if have_nm else seg_nm), (qsm_mask if have_qsm else seg_qsm), "segmenter"


def bundle_segmenter_factory(
    bundle: ModelBundle,
    device: str | torch.device,
    settings: SegInferenceSettings | None = None,
) -> Callable[[], Segmenter] | None:
    """Builds ``NNUNetSegmenter`` of ``BUNDLE/nnunet`` when first needed (None without one).

    ``settings``: mirroring, tile step and localisation of the mask prediction (default
    ``SegInferenceSettings()``, the measured speed/Dice choice of docs/performance.md).
    """
    if bundle.nnunet_dir is None:
        return None
    chosen = settings or SegInferenceSettings()

    def make() -> Segmenter:
        return NNUNetSegmenter.from_bundle(
            bundle.root, device=resolve_device(device), settings=chosen
        )

    return make
