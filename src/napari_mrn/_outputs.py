"""The output volumes of one prediction: what the panel shows as layers and what it saves.

:func:`output_volumes` is the one place that turns a ``CasePrediction`` into masks on the
source grids, so a saved ``QSM_pred.nii.gz`` holds exactly what the ``MRN nuclei`` layer shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from mrn_engine.data import Case, Volume
from mrn_engine.inference import CasePrediction

Modality = Literal["NM", "QSM"]

#: layer names of the outputs
NUCLEI_LAYER = "MRN nuclei"
NM_NUCLEI_LAYER = "MRN NM SN"
NNUNET_NM_LAYER = "nnU-Net NM mask"
NNUNET_QSM_LAYER = "nnU-Net QSM mask"


@dataclass(frozen=True)
class OutputVolume:
    """One output mask.

    Attributes
    ----------
    file_stem: saved as ``<file_stem>.nii.gz`` (``QSM_pred`` ...).
    layer_name: the Labels layer that shows it.
    modality: whose grid and label table it uses (``"NM"`` or ``"QSM"``).
    volume: the mask (uint8) with the geometry of that modality's input.
    visible: whether its layer is shown after a run.
    """

    file_stem: str
    layer_name: str
    modality: Modality
    volume: Volume
    visible: bool = False


def _mask(reference: Volume, array: np.ndarray) -> Volume:
    return reference.like(np.asarray(array).astype(np.uint8, copy=False), kind="mask")


def output_volumes(case: Case, pred: CasePrediction) -> list[OutputVolume]:
    """The prediction's masks on the case's grids, in layer order (bottom to top).

    NM SN labels, then the nnU-Net masks the ROIs were cropped with (only when the masks came
    from the bundle's segmenter), then the QSM nuclei (shown).
    """
    outs = [OutputVolume("NM_pred", NM_NUCLEI_LAYER, "NM", _mask(case.nm, pred.nm_nuclei))]
    if pred.nm_mask is not None:
        outs.append(OutputVolume("NM_nnunet", NNUNET_NM_LAYER, "NM", _mask(case.nm, pred.nm_mask)))
    if pred.qsm_mask is not None:
        outs.append(
            OutputVolume("QSM_nnunet", NNUNET_QSM_LAYER, "QSM", _mask(case.qsm, pred.qsm_mask))
        )
    outs.append(
        OutputVolume("QSM_pred", NUCLEI_LAYER, "QSM", _mask(case.qsm, pred.nuclei), visible=True)
    )
    return outs
