"""Robust per-modality intensity mapping of whole volumes to ``[0, 255]``.

The window ``[lo, hi]`` comes from percentiles of the whole volume's brain voxels (non-zero
voxels; QSM is exactly 0 outside the brain, NM keeps a non-zero noise floor so nearly all
voxels count), multiplied by a per-modality scale (``RoiConfig.nm_window_scale`` /
``qsm_window_scale``): the nuclei that carry the disease signal (NM SN, QSM SN/GP/RN iron) are
well under 0.1 % of the voxels and lie beyond the 99.5th percentile, so an unscaled window
would saturate exactly them. Values are mapped linearly ``lo -> 0``, ``hi -> 255`` and clipped;
QSM is signed and mapped the same way (its zero lands at ``-lo / (hi - lo) * 255``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: at most this many brain voxels enter the percentile estimate (regular subsample; exact
#: enough for a window, and keeps a 300x300x70 volume well under 0.1 s)
MAX_PERCENTILE_VOXELS = 2_000_000


def intensity_window(
    array: np.ndarray, percentiles: Sequence[float], scale: float = 1.0
) -> tuple[float, float]:
    """``scale * (lo, hi)``: percentiles of the non-zero voxels (all voxels if none is non-zero).

    Scaling about 0 keeps QSM's sign; ``scale > 1`` keeps the bright nuclei (a tiny fraction
    of the voxels, beyond the whole-volume percentiles) from saturating.
    """
    flat = np.asarray(array, dtype=np.float32).ravel(order="K")
    brain = flat[flat != 0]
    if brain.size == 0:
        brain = flat
    if brain.size > MAX_PERCENTILE_VOXELS:
        brain = brain[:: int(np.ceil(brain.size / MAX_PERCENTILE_VOXELS))]
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
