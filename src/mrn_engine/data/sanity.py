"""What no real scan looks like: checks run on every image before it is used.

* the header declares more voxel bytes than the file can hold (checked before reading, so a
  forged 100000^3 header is an error, not a MemoryError);
* a non-finite or singular voxel-to-world affine (sform with a zero row, NaN);
* complex-valued data (the imaginary part would be dropped silently);
* values outside any plausible range for the modality (e.g. +-3e38);
* a constant or near-constant volume (all zero, a blank export).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrn_engine.errors import InputDataError

#: largest plausible |voxel value| per modality (NM: scanner units, QSM: ppb or ppm, T1)
PLAUSIBLE_ABS_MAX: dict[str, float] = {"NM": 1e7, "QSM": 1e6, "T1": 1e7}
#: an image whose voxels differ from its median in fewer than this fraction is near-constant
MIN_VARYING_FRACTION = 1e-3
#: best gzip compression ratio (deflate's limit is about 1032:1)
MAX_GZIP_RATIO = 1100


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} EiB"


def check_declared_size(path: Path, header) -> None:
    """Refuse a header whose declared voxel data cannot be in the file (before reading it)."""
    shape = tuple(int(s) for s in header.get_data_shape())
    if any(s < 0 for s in shape):
        raise InputDataError(f"{path}: header declares negative dimensions {shape}")
    itemsize = np.dtype(header.get_data_dtype()).itemsize
    declared = int(np.prod(shape, dtype=object)) * itemsize
    size = path.stat().st_size
    gz = path.name.endswith(".gz")
    offset = 0 if gz else int(header.get_data_offset())
    limit = size * MAX_GZIP_RATIO if gz else size - offset
    if declared > limit:
        dims = "x".join(str(s) for s in shape)
        raise InputDataError(
            f"{path}: header declares {dims} voxels of {header.get_data_dtype()} "
            f"({_fmt_bytes(declared)}), but the {'compressed ' if gz else ''}file holds only "
            f"{_fmt_bytes(size)}; the header is corrupt or the file truncated"
        )


def check_affine(path: Path, affine: np.ndarray) -> None:
    """Refuse a non-finite or singular voxel-to-world matrix."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise InputDataError(
            f"{path}: the header's affine (sform/qform) holds NaN or Inf values; the file's "
            "geometry is corrupt"
        )
    m = affine[:3, :3]
    if np.linalg.matrix_rank(m) < 3 or abs(np.linalg.det(m)) < 1e-12:
        zero = [("xyz"[i]) for i in range(3) if not np.any(m[i])]
        detail = f" (row {', '.join(zero)} is zero)" if zero else ""
        raise InputDataError(
            f"{path}: singular affine{detail}: voxel-to-world matrix "
            f"{np.array2string(m, precision=4).replace(chr(10), '')} cannot map voxels to mm; "
            "fix the sform/qform of the file"
        )


def check_not_complex(path: Path, dtype: np.dtype) -> None:
    """Refuse complex data (casting to float would drop the imaginary part)."""
    if np.issubdtype(dtype, np.complexfloating):
        raise InputDataError(
            f"{path}: complex-valued data ({dtype}); NM/QSM/T1 must be real-valued "
            "(save the magnitude or the real part explicitly)"
        )


def check_image_content(path: Path | str, array: np.ndarray, modality: str) -> None:
    """Refuse an image with absurd values or (near-)constant content for ``modality``."""
    if array.size == 0:
        raise InputDataError(f"{path}: empty image (no voxels)")
    lo, hi = float(array.min()), float(array.max())
    limit = PLAUSIBLE_ABS_MAX.get(modality, 1e7)
    if max(abs(lo), abs(hi)) > limit:
        raise InputDataError(
            f"{path}: values {lo:.3g}..{hi:.3g} lie outside any plausible {modality} range "
            f"(|value| <= {limit:.0e}); the file is corrupt or not a {modality} image"
        )
    if lo == hi:
        raise InputDataError(
            f"{path}: constant image (every voxel is {lo:g}); not a {modality} scan"
        )
    med = float(np.median(array))
    varying = float(np.count_nonzero(array != med)) / array.size
    if varying < MIN_VARYING_FRACTION:
        raise InputDataError(
            f"{path}: near-constant image (only {varying:.4%} of the voxels differ from "
            f"{med:g}); not a {modality} scan"
        )
