"""Weak labels for anatomy-aware pretraining: per-case nucleus descriptors (no diagnosis).

For every nucleus of a case's masks (the NM substantia nigra and the eight QSM structures of
:data:`~mrn_engine.data.labels.QSM_LABELS`), four numbers:

* ``volume``: right + left volume in mm^3 (voxel count x voxel volume);
* ``mean``: mean value over both sides, in the engine's reference units: NM contrast-to-noise
  against the reference region next to the SN (``(I - median_ref) / sd_ref``, the
  ``roi.intensity="reference"`` mapping of :mod:`mrn_engine.rois.intensity`); QSM
  susceptibility in ppm (ppb volumes converted as the ROI mapping does);
* ``asym_volume``: ``(R - L) / (R + L)`` of the volumes (0 when both are empty);
* ``asym_mean``: ``mean_R - mean_L`` (a difference: QSM means can be negative or near 0).

plus ``age`` when an ages table gives it. Descriptors are standardised over the cohort
(:func:`standardise`); a missing value (a side without voxels, an unknown age) becomes the
cohort mean, i.e. 0 after standardisation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mrn_engine.config import RoiConfig
from mrn_engine.data.cases import Case
from mrn_engine.data.labels import QSM_LABELS, ROIS
from mrn_engine.errors import InputDataError, MRNWarning
from mrn_engine.rois.intensity import nm_mapping, qsm_to_ppm_factor

#: region name -> (modality, right label, left label)
REGIONS: dict[str, tuple[str, int, int]] = {
    "NM_SN": ("NM", 1, 2),
    **{f"QSM_{QSM_LABELS[r][:-2]}": ("QSM", r, r + 1) for r in sorted(QSM_LABELS) if r % 2 == 1},
}
FEATURES = ("volume", "mean", "asym_volume", "asym_mean")
AGE = "age"


def descriptor_names(with_age: bool = False) -> list[str]:
    """``REGION.FEATURE`` for every region and feature (+ ``age``), in a fixed order."""
    names = [f"{r}.{f}" for r in REGIONS for f in FEATURES]
    return names + [AGE] if with_age else names


def region_groups(names: Sequence[str]) -> dict[str, list[int]]:
    """Region (or ``age``) -> column indices of ``names`` (the local variant's kernels)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.split(".")[0], []).append(i)
    return groups


def roi_groups(names: Sequence[str]) -> dict[str, list[int]]:
    """ROI name -> column indices of ``names`` describing the nuclei inside that ROI, plus age
    when present (the ``roi`` variant's kernels: the NM SN for ``nm_sn``, caudate to thalamus
    for ``qsm_bg`` ...)."""
    groups: dict[str, list[int]] = {}
    for roi in ROIS:
        regions = {f"{roi.modality}_{c}" for c in roi.classes} | {AGE}  # age concerns them all
        groups[roi.name] = [i for i, n in enumerate(names) if n.split(".")[0] in regions]
    return groups


def case_descriptors(case: Case, cfg: RoiConfig | None = None) -> dict[str, float]:
    """The descriptors of one loaded case (with masks); NaN where a side has no voxels.

    Raises
    ------
    InputDataError: a mask is missing, or the NM reference region cannot be measured.
    """
    cfg = cfg or RoiConfig()
    if case.nm_mask is None or case.qsm_mask is None:
        raise InputDataError(f"{case.case_id}: descriptors need both NM_mask and QSM_mask")
    voxel_mm3 = float(np.prod(case.spacing))
    nm_map = nm_mapping(
        case.nm.array,
        case.nm_mask.array,
        case.nm.spacing,
        cfg.nm_cnr_window,
        case.qsm_mask.array,
        case.nm.name or case.case_id,
    )
    info = dict(nm_map.info)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MRNWarning)
        ppm = qsm_to_ppm_factor(case.qsm.array, cfg.qsm_unit, case.qsm.name or case.case_id)
    out: dict[str, float] = {}
    for region, (mod, right, left) in REGIONS.items():
        image = case.nm.array if mod == "NM" else case.qsm.array
        mask = case.nm_mask.array if mod == "NM" else case.qsm_mask.array
        sides = []
        for lab in (right, left):
            sel = mask == lab
            n = int(sel.sum())
            raw = float(image[sel].mean()) if n else math.nan
            value = (raw - info["ref_median"]) / info["ref_sd"] if mod == "NM" else raw * ppm
            sides.append((n * voxel_mm3, value, n))
        (vr, mr, nr), (vl, ml, nl) = sides
        out[f"{region}.volume"] = vr + vl
        out[f"{region}.mean"] = (mr * nr + ml * nl) / (nr + nl) if nr and nl else (mr if nr else ml)
        out[f"{region}.asym_volume"] = (vr - vl) / (vr + vl) if vr + vl > 0 else 0.0
        out[f"{region}.asym_mean"] = mr - ml if nr and nl else math.nan
    return out


@dataclass
class Standardised:
    """Cohort-standardised descriptors: ``matrix`` (cases x names), with the cohort stats."""

    case_ids: list[str]
    names: list[str]
    matrix: np.ndarray
    means: list[float]
    sds: list[float]
    missing: dict[str, int]

    def to_card(self) -> dict:
        """What the weights card records (names, cohort means / SDs, missing counts)."""
        return {
            "names": self.names,
            "means": self.means,
            "sds": self.sds,
            "missing": self.missing,
            "n_cases": len(self.case_ids),
        }


def standardise(
    table: Mapping[str, Mapping[str, float]], names: Sequence[str] | None = None
) -> Standardised:
    """z-score each descriptor over the cases of ``table``; missing (NaN / absent) -> 0.

    A descriptor with no spread (or fewer than 2 known values) gets SD 1.
    """
    case_ids = sorted(table)
    if not case_ids:
        raise InputDataError("no cases to compute descriptors on")
    names = list(names) if names is not None else descriptor_names()
    raw = np.array(
        [[float(table[c].get(n, math.nan)) for n in names] for c in case_ids], dtype=np.float64
    )
    known = np.isfinite(raw)
    means, sds = [], []
    for j in range(raw.shape[1]):
        col = raw[known[:, j], j]
        mu = float(col.mean()) if col.size else 0.0
        sd = float(col.std()) if col.size > 1 else 0.0
        means.append(mu)
        sds.append(sd if sd > 0 else 1.0)
    z = (raw - np.array(means)) / np.array(sds)
    z[~known] = 0.0
    missing = {n: int((~known[:, j]).sum()) for j, n in enumerate(names) if (~known[:, j]).any()}
    return Standardised(case_ids, names, z.astype(np.float32), means, sds, missing)
