"""ROI crop boxes: the voxel box around the union of an ROI's labels, plus a margin in mm."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class CropBox:
    """Source-voxel index ranges, half-open: ``[x0, x1) x [y0, y1) x [z0, z1)``."""

    x0: int
    x1: int
    y0: int
    y1: int
    z0: int
    z1: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """Box size in voxels ``(nx, ny, nz)``."""
        return (self.x1 - self.x0, self.y1 - self.y0, self.z1 - self.z0)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index the source ``(X, Y, Z)`` array with ``array[box.slices]``."""
        return (slice(self.x0, self.x1), slice(self.y0, self.y1), slice(self.z0, self.z1))

    def size_mm(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        """Box size in millimetres."""
        return tuple(float(n * s) for n, s in zip(self.shape, spacing, strict=False))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, int]:
        """Plain dict (JSON-serialisable)."""
        return {k: int(v) for k, v in asdict(self).items()}


def margin_voxels(spacing: Sequence[float], margin_mm: float) -> tuple[int, int, int]:
    """Margin per axis in voxels: ``ceil(margin_mm / spacing)`` (anisotropic spacing)."""
    return tuple(
        int(math.ceil(margin_mm / float(s) - 1e-9)) if margin_mm > 0 else 0 for s in spacing
    )  # type: ignore[return-value]


def label_box(mask: np.ndarray, labels: Iterable[int]) -> CropBox | None:
    """Tight box around the voxels holding any of ``labels`` (None if there are none)."""
    labels = [int(v) for v in labels]
    if mask.dtype == np.uint8:  # lookup table: much faster than np.isin on big volumes
        lut = np.zeros(256, bool)
        lut[[v for v in labels if 0 <= v < 256]] = True
        sel = lut[mask]
    else:
        sel = np.isin(mask, labels)
    if not sel.any():
        return None
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(sel.any(axis=other))
        bounds += [int(idx[0]), int(idx[-1]) + 1]
    return CropBox(*bounds)


def roi_box(
    mask: np.ndarray, labels: Iterable[int], spacing: Sequence[float], margin_mm: float
) -> CropBox | None:
    """Box around the union of ``labels`` grown by ``margin_mm`` per side, clipped to the volume."""
    tight = label_box(mask, labels)
    if tight is None:
        return None
    mx, my, mz = margin_voxels(spacing, margin_mm)
    sx, sy, sz = mask.shape
    return CropBox(
        max(0, tight.x0 - mx),
        min(sx, tight.x1 + mx),
        max(0, tight.y0 - my),
        min(sy, tight.y1 + my),
        max(0, tight.z0 - mz),
        min(sz, tight.z1 + mz),
    )
