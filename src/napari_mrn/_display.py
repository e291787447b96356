"""The one mapping between NIfTI voxel order and napari's display order (and its inverse).

napari displays the last two array axes (rows, columns) and puts a slider on the first.
We show axial slices in the radiological convention, like napari-nifti:

- axis 0 (slider): inferior -> superior (``S``),
- axis 1 (rows, top to bottom): anterior -> posterior (``P``), so the nose is at the top,
- axis 2 (columns, left to right): patient right -> patient left (``L``), so the patient's
  right is on the screen's left.

For the challenge's LAS volumes ``(X, Y, Z)`` this is ``array.transpose(2, 1, 0)[:, ::-1, :]``.
Any other axis-aligned orientation is handled by nibabel's orientation tools. Voxel spacing
becomes the layer ``scale`` (2 mm slices are drawn 3x as tall as 0.67 mm pixels in 3D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as ornt

#: axis codes of the display array (slider, rows, columns)
DISPLAY_AXCODES: tuple[str, str, str] = ("S", "P", "L")


@dataclass(frozen=True)
class DisplayMapping:
    """How one NIfTI grid is shown: array reorientation plus layer scale.

    Attributes
    ----------
    affine: the true voxel-to-world affine of the source volume (4x4).
    shape: the source array shape ``(X, Y, Z)``.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def transform(self) -> np.ndarray:
        """nibabel orientation transform source -> display (``(3, 2)`` array)."""
        src = ornt.io_orientation(self.affine)
        return ornt.ornt_transform(src, ornt.axcodes2ornt(DISPLAY_AXCODES))

    @property
    def inverse_transform(self) -> np.ndarray:
        """nibabel orientation transform display -> source."""
        src = ornt.io_orientation(self.affine)
        return ornt.ornt_transform(ornt.axcodes2ornt(DISPLAY_AXCODES), src)

    @property
    def display_shape(self) -> tuple[int, int, int]:
        """Shape of the display array."""
        return tuple(int(self.shape[int(ax)]) for ax in self.transform[:, 0].argsort())

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Source voxel sizes in mm ``(X, Y, Z)``."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def scale(self) -> tuple[float, float, float]:
        """napari layer scale (mm per display voxel, display axis order)."""
        order = self.transform[:, 0].argsort()  # display axis d comes from source axis order[d]
        return tuple(self.spacing[int(ax)] for ax in order)

    def to_display(self, array: np.ndarray) -> np.ndarray:
        """Source ``(X, Y, Z)`` array -> display ``(slider, rows, cols)`` array (a C-contiguous copy)."""
        if array.shape[:3] != tuple(self.shape):
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        return np.array(ornt.apply_orientation(array, self.transform), order="C", copy=True)

    def from_display(self, array: np.ndarray) -> np.ndarray:
        """Display array -> source ``(X, Y, Z)`` array (inverse of :meth:`to_display`)."""
        if array.shape[:3] != self.display_shape:
            raise ValueError(
                f"array shape {array.shape} does not match the display grid {self.display_shape}"
            )
        return np.array(ornt.apply_orientation(array, self.inverse_transform), order="C", copy=True)

    def index_to_display(self, ijk: np.ndarray) -> np.ndarray:
        """Source voxel indices ``(..., 3)`` -> display voxel indices ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=float)
        out = np.empty_like(ijk)
        for src_axis, (dst_axis, flip) in enumerate(self.transform):
            v = ijk[..., src_axis]
            if flip < 0:
                v = self.shape[src_axis] - 1 - v
            out[..., int(dst_axis)] = v
        return out

    def to_metadata(self) -> dict:
        """What a layer keeps so the writer can restore the source geometry."""
        return {"affine": np.array(self.affine, dtype=float), "source_shape": tuple(self.shape)}

    @classmethod
    def from_metadata(cls, metadata: dict) -> DisplayMapping:
        """Rebuild the mapping from a layer's metadata (see :meth:`to_metadata`)."""
        try:
            affine = np.asarray(metadata["affine"], dtype=float)
            shape = tuple(int(v) for v in metadata["source_shape"])
        except KeyError as e:
            raise KeyError(f"layer metadata has no {e.args[0]!r}: not read by napari-mrn") from None
        return cls(affine=affine, shape=shape)  # type: ignore[arg-type]

    @classmethod
    def default_for_display(
        cls, display_shape: tuple[int, ...], scale: tuple[float, ...] = (1.0, 1.0, 1.0)
    ) -> DisplayMapping:
        """Mapping for a layer without NIfTI metadata: assume the challenge's LAS orientation.

        ``display_shape``/``scale`` are in display order (slider, rows, cols).
        """
        nz, ny, nx = (int(v) for v in display_shape[-3:])
        sz, sy, sx = (float(abs(v)) for v in scale[-3:])
        affine = np.diag([-sx, sy, sz, 1.0])
        return cls(affine=affine, shape=(nx, ny, nz))
