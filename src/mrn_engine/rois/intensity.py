"""Per-modality intensity mapping of raw volumes to ``[0, 255]`` (docs/data.md, step 2).

Every mapping is a linear window ``[lo, hi] -> [0, 255]`` on the raw values (then clipped),
plus the raw value of *neutral tissue*, whose mapped value pads the stacks. Two mappings
(``RoiConfig.intensity``):

``"reference"`` (default, scanner-robust)
    * NM: contrast-to-noise against a reference region, ``CNR = (I - median_ref) / sd_ref``
      with ``sd_ref = 1.4826 * MAD`` of the reference voxels, as NM-MRI studies measure the
      SN against the crus cerebri. The reference is found from the NM mask
      (:func:`nm_reference_region`): the tissue 1.5-5 mm anterior/lateral of each SN, on the
      SN's slices, outside any nucleus. ``CNR`` is invariant to any global gain and offset
      and depends only on voxels next to the SN, not on the field of view.
      ``RoiConfig.nm_cnr_window`` (CNR units) maps to ``[0, 255]``; neutral = the reference
      (CNR 0).
    * QSM: physical units (ppm) in the fixed window ``RoiConfig.qsm_window_ppm``; volumes in
      ppb (robust brain spread ~1000x that of ppm) are detected, converted and warned about;
      neutral = 0 ppm.
``"percentile"`` (the mapping of bundles trained before ``intensity`` existed)
    Whole-volume percentiles of the non-zero voxels times ``*_window_scale``; neutral = raw 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from mrn_engine.errors import InputDataError, MRNWarning

#: at most this many brain voxels enter the percentile estimate (regular subsample; exact
#: enough for a window, and keeps a 300x300x70 volume well under 0.1 s)
MAX_PERCENTILE_VOXELS = 2_000_000
#: QSM whose robust brain spread (99th percentile of |x| over non-zero voxels) exceeds this
#: is taken to be in ppb: in ppm the brain's 99th percentile is ~0.1-0.2 (iron-rich nuclei
#: ~0.2, veins up to ~0.5), in ppb ~100-200; 3 leaves a factor >10 either side
QSM_PPB_THRESHOLD = 3.0
#: above the threshold but below this, the unit is a guess (neither a ppm nor a ppb brain):
#: converted as ppb, with a warning naming the file
QSM_PPB_CLEAR = 20.0
#: reference shell around the SN: inner and outer distance (mm)
REF_SHELL_MM = (1.5, 5.0)
#: fewest reference voxels accepted
MIN_REF_VOXELS = 30
#: robust SD of a normal distribution from its median absolute deviation
MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class IntensityMapping:
    """A linear raw -> ``[0, 255]`` window plus the raw value of neutral tissue."""

    window: tuple[float, float]
    neutral: float = 0.0
    #: what the window was derived from (for reports): e.g. ``{"ref_median": ..., "unit": ...}``
    info: tuple[tuple[str, float | str], ...] = ()

    @property
    def pad_value(self) -> float:
        """Mapped value of neutral tissue (pads stacks)."""
        return float(apply_window(np.array([self.neutral]), self.window)[0])


def intensity_window(
    array: np.ndarray, percentiles: Sequence[float], scale: float = 1.0
) -> tuple[float, float]:
    """``scale * (lo, hi)``: percentiles of the non-zero voxels (all voxels if none is non-zero).

    Scaling about 0 keeps QSM's sign; ``scale > 1`` keeps the bright nuclei (a tiny fraction
    of the voxels, beyond the whole-volume percentiles) from saturating.
    """
    brain = _nonzero_sample(array)
    lo, hi = np.percentile(brain, [float(percentiles[0]), float(percentiles[1])])
    lo, hi = float(lo) * float(scale), float(hi) * float(scale)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def apply_window(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``[0, 255]`` and clip; float32."""
    lo, hi = window
    out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0, out=out)


def _nonzero_sample(array: np.ndarray) -> np.ndarray:
    flat = np.asarray(array, dtype=np.float32).ravel(order="K")
    brain = flat[flat != 0]
    if brain.size == 0:
        brain = flat
    if brain.size > MAX_PERCENTILE_VOXELS:
        brain = brain[:: int(np.ceil(brain.size / MAX_PERCENTILE_VOXELS))]
    return brain


# --- QSM: units -------------------------------------------------------------------------


def qsm_spread(array: np.ndarray) -> float:
    """99th percentile of ``|QSM|`` over the non-zero (brain) voxels."""
    return float(np.percentile(np.abs(_nonzero_sample(array)), 99.0))


def qsm_to_ppm_factor(array: np.ndarray, unit: str = "auto", source: str = "QSM") -> float:
    """Factor that brings a QSM volume to ppm: 1 (ppm) or 1e-3 (ppb).

    ``unit="auto"`` decides from :func:`qsm_spread`: a ppb volume (the challenge's own unit)
    is converted silently; a spread that looks like neither unit (between
    :data:`QSM_PPB_THRESHOLD` and :data:`QSM_PPB_CLEAR`) is converted as ppb with an
    ``MRNWarning`` naming ``source``. ``mrn cases --stats`` flags a case whose unit differs
    from the rest of its cohort.
    """
    if unit == "ppm":
        return 1.0
    if unit == "ppb":
        return 1e-3
    if unit != "auto":
        raise InputDataError(f"{source}: unknown QSM unit {unit!r} (auto, ppm or ppb)")
    spread = qsm_spread(array)
    if spread > QSM_PPB_THRESHOLD:
        if spread < QSM_PPB_CLEAR:
            warnings.warn(
                f"{source}: QSM unit unclear (99th percentile of |QSM| in the brain = "
                f"{spread:.3g}: ppm data stay below {QSM_PPB_THRESHOLD:g}, ppb data are above "
                f"{QSM_PPB_CLEAR:g}); taken as ppb and converted to ppm (x 0.001). Check the "
                "file, or set roi.qsm_unit to 'ppb' or 'ppm'.",
                MRNWarning,
                stacklevel=3,
            )
        return 1e-3
    return 1.0


def qsm_mapping(
    array: np.ndarray, window_ppm: Sequence[float], unit: str = "auto", source: str = "QSM"
) -> IntensityMapping:
    """Fixed susceptibility window (ppm) expressed in the volume's raw units; neutral = 0."""
    f = qsm_to_ppm_factor(array, unit, source)
    lo, hi = float(window_ppm[0]) / f, float(window_ppm[1]) / f
    return IntensityMapping((lo, hi), 0.0, (("unit", "ppb" if f != 1.0 else "ppm"),))


# --- NM: contrast against a reference region ---------------------------------------------


def nm_reference_region(
    nm_mask: np.ndarray,
    spacing: Sequence[float],
    qsm_mask: np.ndarray | None = None,
    shell_mm: Sequence[float] = REF_SHELL_MM,
) -> np.ndarray:
    """Boolean reference region (crus cerebri side of the SN) on the mask grid.

    Per SN side (NM labels 1 and 2): voxels at ``shell_mm`` distance from that SN (in mm,
    anisotropic spacing), on the SN's axial slices, anterior of the SN's centroid (the
    cerebral peduncle lies antero-lateral of the SN; posterior and medial lie the tegmentum,
    red nucleus and aqueduct) and lateral of its medial edge; never inside the SN or, when
    ``qsm_mask`` is given, any labelled nucleus. Empty if the mask holds no SN.
    """
    out = np.zeros(nm_mask.shape, bool)
    sn = nm_mask > 0
    if not sn.any():
        return out
    inner, outer = float(shell_mm[0]), float(shell_mm[1])
    pad = [int(np.ceil(outer / float(s))) + 1 for s in spacing]
    idx = np.nonzero(sn)
    lo = [max(0, int(i.min()) - p) for i, p in zip(idx, pad, strict=True)]
    hi = [min(n, int(i.max()) + 1 + p) for i, n, p in zip(idx, nm_mask.shape, pad, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = nm_mask[box]
    nuclei = sub > 0
    if qsm_mask is not None:
        nuclei = nuclei | (qsm_mask[box] > 0)
    region = np.zeros(sub.shape, bool)
    x = np.arange(sub.shape[0])[:, None, None] + lo[0]
    y = np.arange(sub.shape[1])[None, :, None] + lo[1]
    mid_x = float(np.mean(idx[0]))  # between the two SNs (volume midline if one is missing)
    for lab in (1, 2):
        side = sub == lab
        if not side.any():
            continue
        dist = distance_transform_edt(~side, sampling=[float(s) for s in spacing])
        sx, sy, sz = np.nonzero(side)
        cy = float(sy.mean()) + lo[1]
        # right SN (label 1) has lower x; its lateral side is towards lower x
        lateral = x <= sx.max() + lo[0] if lab == 1 else x >= sx.min() + lo[0]
        if (sub == 3 - lab).any():
            lateral = lateral & ((x < mid_x) if lab == 1 else (x > mid_x))
        zs = np.zeros(sub.shape[2], bool)
        zs[np.unique(sz)] = True
        region |= (dist >= inner) & (dist <= outer) & (y >= cy) & lateral & zs[None, None, :]
    out[box] = region & ~nuclei
    return out


def robust_centre_spread(values: np.ndarray) -> tuple[float, float]:
    """``(median, 1.4826 * MAD)`` of ``values``; the SD if the MAD is 0."""
    values = np.asarray(values, dtype=np.float64)
    med = float(np.median(values))
    sd = MAD_TO_SD * float(np.median(np.abs(values - med)))
    if not sd > 0:
        sd = float(values.std())
    return med, sd


def nm_mapping(
    nm: np.ndarray,
    nm_mask: np.ndarray,
    spacing: Sequence[float],
    cnr_window: Sequence[float],
    qsm_mask: np.ndarray | None = None,
    source: str = "NM",
) -> IntensityMapping:
    """CNR window ``(I - median_ref) / sd_ref`` in ``cnr_window`` as raw values; neutral = ref.

    Raises ``InputDataError`` (naming ``source``) when the reference region is too small or
    flat (a mask without SN, an SN at the edge of the volume, a constant image).
    """
    ref = nm_reference_region(nm_mask, spacing, qsm_mask)
    n = int(ref.sum())
    if n < MIN_REF_VOXELS:
        raise InputDataError(
            f"{source}: the NM reference region next to the SN has {n} voxel(s) "
            f"(need {MIN_REF_VOXELS}); is the SN labelled in the NM mask and inside the volume?"
        )
    med, sd = robust_centre_spread(np.asarray(nm)[ref])
    if not sd > 0:
        raise InputDataError(
            f"{source}: the NM reference region next to the SN is flat (all {n} voxels = "
            f"{med:g}); the NM contrast cannot be measured"
        )
    lo, hi = med + float(cnr_window[0]) * sd, med + float(cnr_window[1]) * sd
    return IntensityMapping((lo, hi), med, (("ref_median", med), ("ref_sd", sd), ("ref_voxels", n)))


def percentile_mapping(
    array: np.ndarray, percentiles: Sequence[float], scale: float
) -> IntensityMapping:
    """The legacy whole-volume percentile window; neutral = raw 0 (old zero padding)."""
    lo, hi = intensity_window(array, percentiles, scale)
    # padding used to be mapped 0 (= raw lo); keep it so old bundles see the same stacks
    return IntensityMapping((lo, hi), lo)
