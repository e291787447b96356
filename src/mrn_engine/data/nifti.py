"""NIfTI volumes that keep their geometry: :class:`Volume`, :func:`load_volume`, :func:`save_volume`.

Arrays are in nibabel order ``(X, Y, Z)``. Images are read as float32 and must be finite;
masks are read as ``uint8`` label maps and must hold non-negative whole numbers <= 255.
Every problem becomes an :class:`~mrn_engine.errors.InputDataError` whose message starts with
the file path.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from mrn_engine.data.sanity import check_affine, check_declared_size, check_not_complex
from mrn_engine.errors import InputDataError
from mrn_engine.fileio import make_temp_file

#: file endings accepted for a NIfTI image
NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: exceptions nibabel/gzip/zlib raise on unreadable or truncated files
_READ_ERRORS = (
    ImageFileError,
    EOFError,
    OSError,
    zlib.error,
    gzip.BadGzipFile,
    isal_zlib.error,
    HeaderDataError,
    ValueError,
    TypeError,
)


#: ``.nii.gz`` files whose voxel data declare more bytes than this are read by nibabel's
#: streaming gzip (one copy in memory) instead of being decompressed whole by ISA-L
FAST_GZIP_MAX_BYTES = 1 << 30


def write_nifti(img: nib.Nifti1Image | nib.Nifti2Image, path: str | os.PathLike) -> None:
    """Write ``img`` to ``path`` (``.nii`` or ``.nii.gz``), not atomically.

    ``.nii.gz`` is compressed by ISA-L (python-isal, its default level), 3-4x faster than
    zlib at nibabel's level 1 on our volumes and a few per cent smaller; any gzip reader opens
    the result. The gzip header's time stamp is 0, as nibabel writes it, so the same image
    always gives the same bytes.
    """
    path = Path(path)
    raw = img.to_bytes()
    with open(path, "wb") as fh:
        fh.write(igzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)


def _read_gz_whole(path: Path, img: nib.Nifti1Image | nib.Nifti2Image):
    """``img`` again, its file decompressed in one go by ISA-L (about 2x faster than zlib).

    Returns None when the file is too large for that or ISA-L refuses it (trailing bytes,
    a damaged stream); the caller then reads through nibabel, whose errors it reports.
    """
    if not path.name.endswith(".gz"):
        return None
    declared = int(np.prod(img.header.get_data_shape(), dtype=np.float64))
    if declared * img.header.get_data_dtype().itemsize > FAST_GZIP_MAX_BYTES:
        return None
    try:
        return type(img).from_bytes(igzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError, zlib.error, isal_zlib.error, ImageFileError):
        return None


@dataclass
class Volume:
    """One NIfTI image with its geometry.

    Attributes
    ----------
    array : np.ndarray
        Voxel data ``(X, Y, Z)``; float32 for images, uint8 for masks.
    affine : np.ndarray
        4x4 voxel-to-world (RAS mm) matrix.
    header : nibabel.Nifti1Header or None
        Source header (copied into files written with :func:`save_volume`).
    path : Path or None
        File it was read from (None for derived volumes).
    kind : str
        ``"image"`` or ``"mask"``.
    source : Path or None
        For derived volumes (:meth:`like`): the file the geometry came from; :func:`save_volume`
        never writes over it.
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = None
    kind: str = "image"
    source: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in millimetres along X, Y, Z."""
        if self.header is not None:
            zooms = self.header.get_zooms()[:3]
            if len(zooms) == 3 and all(z > 0 for z in zooms):
                return tuple(float(z) for z in zooms)  # type: ignore[return-value]
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """File path (or ``<array>``) for messages."""
        return str(self.path) if self.path is not None else "<array>"

    def like(self, array: np.ndarray, *, kind: str | None = None) -> Volume:
        """A new volume with this geometry and new data (same shape required)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise InputDataError(
                f"{self.name}: new data of shape {array.shape} does not fit the grid {self.array.shape}"
            )
        kind = kind or ("mask" if np.issubdtype(array.dtype, np.integer) else self.kind)
        header = self.header.copy() if self.header is not None else None
        return Volume(array, self.affine.copy(), header, None, kind, self.path or self.source)


def same_grid(a: Volume, b: Volume, *, atol: float = 1e-3) -> bool:
    """True when two volumes share shape and affine (within ``atol`` mm)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol)


def check_same_grid(ref: Volume, other: Volume, what: str = "") -> None:
    """Raise :class:`InputDataError` unless ``other`` lies on ``ref``'s grid.

    The message names both files and gives both shapes and affines.
    """
    if same_grid(ref, other):
        return
    what = f" ({what})" if what else ""

    def fmt(a: np.ndarray) -> str:
        return np.array2string(a, precision=4, suppress_small=True).replace("\n", "")

    raise InputDataError(
        f"{other.name}: not on the grid of {ref.name}{what}: shape {other.shape} vs {ref.shape}; "
        f"affine {fmt(other.affine)} vs {fmt(ref.affine)}"
    )


def nifti_path(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii`` if either exists.

    A folder of that name is returned too, so that loading reports it as a folder rather than
    the file as missing.
    """
    for suffix in NIFTI_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    for suffix in NIFTI_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_dir():
            return p
    return None


def load_volume(path: str | os.PathLike, *, kind: str = "image", fast_gzip: bool = True) -> Volume:
    """Read and validate one NIfTI file.

    Parameters
    ----------
    path : path-like
        ``.nii`` or ``.nii.gz`` file.
    kind : {"image", "mask"}
        Images become finite float32; masks become uint8 label maps.
    fast_gzip : bool
        Decompress ``.nii.gz`` whole with ISA-L (default; same voxels, about 2x faster); False
        reads through nibabel's streaming gzip (``mrn bench io`` compares the two).

    Raises
    ------
    InputDataError
        Missing, unreadable or truncated file, non-3D data, NaN/Inf voxels, or (masks)
        non-integer / negative / too large label values.
    """
    if kind not in ("image", "mask"):
        raise ValueError(f"kind must be 'image' or 'mask', not {kind!r}")
    path = Path(path)
    if path.is_dir():
        raise InputDataError(f"{path}: is a folder, not a NIfTI file")
    if not path.is_file():
        raise InputDataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputDataError(f"{path}: not a NIfTI image ({type(img).__name__})")
        check_declared_size(path, img.header)
        check_not_complex(path, img.header.get_data_dtype())
        check_affine(path, img.affine)
        whole = _read_gz_whole(path, img) if fast_gzip else None
        data = np.asanyarray((whole if whole is not None else img).dataobj)
    except InputDataError:
        raise
    except MemoryError as e:
        raise InputDataError(f"{path}: not enough memory to read the voxel data") from e
    except _READ_ERRORS as e:
        raise InputDataError(
            f"{path}: unreadable or truncated NIfTI file ({type(e).__name__}: {e})"
        ) from e
    check_not_complex(path, data.dtype)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(
            f"{path}: expected a 3D volume, got {data.ndim}D data of shape {data.shape}"
        )
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = ~np.isfinite(data)
        n_bad = int(bad.sum())
        if n_bad:
            n_nan = int(np.isnan(data).sum())
            raise InputDataError(
                f"{path}: {n_bad} non-finite voxel(s) ({n_nan} NaN, {n_bad - n_nan} Inf)"
            )
    if kind == "image":
        array = np.asarray(data, dtype=np.float32)
        if not np.isfinite(array).all():
            raise InputDataError(f"{path}: values overflow float32 (Inf after conversion)")
    else:
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
            raise InputDataError(f"{path}: mask holds non-integer values")
        lo, hi = (data.min(), data.max()) if data.size else (0, 0)
        if lo < 0 or hi > 255:
            raise InputDataError(f"{path}: mask values must lie in 0..255, found {lo}..{hi}")
        array = np.asarray(data, dtype=np.uint8)
    header = img.header.copy()
    return Volume(array, np.asarray(img.affine, dtype=np.float64), header, path, kind)


def check_mask_labels(mask: Volume, allowed: Iterable[int], what: str = "mask") -> None:
    """Raise :class:`InputDataError` listing mask values outside ``allowed`` (0 always allowed)."""
    allowed_set = {0, *(int(v) for v in allowed)}
    arr = mask.array
    if arr.dtype == np.uint8:  # masks as loaded: a histogram is ~10x faster than np.unique
        values = np.flatnonzero(np.bincount(arr.ravel(order="K"), minlength=1))
    else:
        values = np.unique(arr)
    unknown = sorted(int(v) for v in values if int(v) not in allowed_set)
    if unknown:
        raise InputDataError(
            f"{mask.name}: unknown {what} label value(s) {unknown}; "
            f"allowed are {sorted(allowed_set)}"
        )


def save_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` as NIfTI with its source geometry, atomically.

    Masks (``kind == "mask"`` or integer data) are stored as uint8, images as float32.
    The source header (orientation codes, units, descriptions) and affine are kept.
    Refuses to write over the file the volume was read from.
    """
    path = Path(path)
    for src in (volume.path, volume.source):
        if src is not None and path.resolve() == Path(src).resolve():
            raise InputDataError(f"{path}: refusing to overwrite the input file")
    name = path.name
    if not name.endswith(NIFTI_SUFFIXES):
        raise InputDataError(f"{path}: output must end in .nii or .nii.gz")
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputDataError(f"{path}: can only save 3D volumes, got shape {array.shape}")
    is_mask = volume.kind == "mask" or np.issubdtype(array.dtype, np.integer) or array.dtype == bool
    if is_mask:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InputDataError(f"{path}: mask values outside 0..255 cannot be stored as uint8")
        array = array.astype(np.uint8)
    else:
        array = array.astype(np.float32)
    header = volume.header.copy() if volume.header is not None else None
    if header is not None and not isinstance(header, nib.Nifti1Header):
        header = None
    check_affine(path, volume.affine)
    try:
        img = nib.Nifti1Image(array, volume.affine, header=header)
        img.set_data_dtype(array.dtype)
        img.header.set_slope_inter(1.0, 0.0)
        if header is not None:
            sform, scode = header.get_sform(coded=True)
            qform, qcode = header.get_qform(coded=True)
            img.set_sform(volume.affine, int(scode) if scode else 1)
            img.set_qform(volume.affine, int(qcode) if qcode else 1)
        else:
            img.set_sform(volume.affine, 1)
            img.set_qform(volume.affine, 1)
    except HeaderDataError as e:
        raise InputDataError(f"{path}: cannot store this geometry in a NIfTI header ({e})") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    fd, tmp = make_temp_file(path.parent, prefix=f".{name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write_nifti(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
