"""The challenge grid and the per-subject warp from MNI space onto it.

The challenge grid: shape (300, 300, 70), voxel 0.6667 x 0.6667 x 2.0 mm, LAS (lower X index =
subject right). The slab is centred on MNI (0, -18, -9) mm so its 140 mm cover the caudate
(top near z = +27) down to the dentate (bottom near z = -40).

Each subject = MNI anatomy moved by a random similarity-like affine (rotation, anisotropic
scale, translation) plus a smooth random displacement field. The sampling map (challenge voxel
-> atlas voxel) is computed on a coarse lattice and upsampled trilinearly, which is exact for
the affine part; the atlas is then sampled with ``torch.nn.functional.grid_sample``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

GRID_SHAPE: tuple[int, int, int] = (300, 300, 70)
VOXEL_MM: tuple[float, float, float] = (0.6667, 0.6667, 2.0)
#: MNI point (mm) at the centre of the challenge slab
SLAB_CENTRE_MM: tuple[float, float, float] = (0.0, -18.0, -9.0)
#: coarse lattice of the sampling map (nodes per axis)
LATTICE: tuple[int, int, int] = (26, 26, 15)


def challenge_affine() -> np.ndarray:
    """4x4 voxel -> mm affine of the challenge grid (LAS, centred on :data:`SLAB_CENTRE_MM`)."""
    aff = np.diag([-VOXEL_MM[0], VOXEL_MM[1], VOXEL_MM[2], 1.0])
    centre_idx = (np.asarray(GRID_SHAPE) - 1) / 2.0
    aff[:3, 3] = np.asarray(SLAB_CENTRE_MM) - aff[:3, :3] @ centre_idx
    return aff


@dataclass
class Warp:
    """A subject's pose and shape relative to MNI space (the subject -> MNI map)."""

    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    displacement: np.ndarray  #: (3, *LATTICE) mm, MNI offsets at the lattice nodes
    #: optional 4x4 world affine applied after the rest (maps the posed atlas subject onto a
    #: real subject's nuclei; :mod:`mrn_engine.phantom.real_geometry`)
    post_affine: np.ndarray | None = None

    def matrix(self) -> np.ndarray:
        """3x3 linear part of the MNI -> subject affine (rotation @ scale)."""
        rx, ry, rz = np.deg2rad(self.rotation_deg)
        cx, sx, cy, sy, cz, sz = (
            np.cos(rx),
            np.sin(rx),
            np.cos(ry),
            np.sin(ry),
            np.cos(rz),
            np.sin(rz),
        )
        r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        return r_z @ r_y @ r_x @ np.diag(self.scale)


def random_warp(
    rng: np.random.Generator,
    *,
    max_rotation_deg: float = 4.0,
    scale_sd: float = 0.04,
    max_translation_mm: float = 3.0,
    displacement_mm: float = 1.5,
) -> Warp:
    """Draw a subject pose and a smooth deformation (RMS ``displacement_mm``)."""
    rot = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scale = np.clip(rng.normal(1.0, scale_sd, 3), 0.9, 1.1)
    trans = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    field = rng.standard_normal((3, *LATTICE))
    field = np.stack([gaussian_filter(c, sigma=(3.0, 3.0, 1.5), mode="nearest") for c in field])
    field *= displacement_mm / max(float(np.sqrt((field**2).mean())), 1e-9)
    return Warp(tuple(rot), tuple(scale), tuple(trans), field)


def _lattice_indices() -> np.ndarray:
    """(3, *LATTICE) challenge voxel indices of the lattice nodes (corners included)."""
    axes = [np.linspace(0.0, n - 1.0, m) for n, m in zip(GRID_SHAPE, LATTICE, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def lattice_mni(warp: Warp) -> np.ndarray:
    """(3, *LATTICE) MNI coordinates (mm) of the lattice nodes of the challenge grid."""
    aff = challenge_affine()
    idx = _lattice_indices().reshape(3, -1)
    world = aff[:3, :3] @ idx + aff[:3, 3:4]
    if warp.post_affine is not None:  # grid world -> posed-atlas world
        inv = np.linalg.inv(warp.post_affine)
        world = inv[:3, :3] @ world + inv[:3, 3:4]
    centre = np.asarray(SLAB_CENTRE_MM)[:, None]
    mni = np.linalg.solve(warp.matrix(), world - centre - np.asarray(warp.translation_mm)[:, None])
    mni = mni + centre + warp.displacement.reshape(3, -1)
    return mni.reshape(3, *LATTICE)


def sampling_grid(
    atlas_shape: tuple[int, int, int],
    atlas_affine: np.ndarray,
    warp: Warp,
    extra_lattice: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``grid_sample`` grid that maps the challenge grid into the atlas through ``warp``.

    Parameters
    ----------
    atlas_shape: ``(X, Y, Z)`` of the atlas volumes.
    atlas_affine: the atlas voxel -> MNI mm affine.
    warp: the subject's warp.
    extra_lattice: optional ``(E, *LATTICE)`` smooth fields (e.g. bias fields) upsampled along.

    Returns
    -------
    ``(1, *GRID_SHAPE, 3)`` normalised sampling grid and the ``(E, *GRID_SHAPE)`` upsampled
    extra fields (or None).
    """
    mni = lattice_mni(warp).reshape(3, -1)
    inv = np.linalg.inv(atlas_affine)
    vox = inv[:3, :3] @ mni + inv[:3, 3:4]
    size = np.asarray(atlas_shape, float)[:, None]
    norm = (2.0 * vox / (size - 1.0) - 1.0).reshape(3, *LATTICE)
    lattice = norm[::-1]  # grid_sample wants (W, H, D) = (Z, Y, X) order
    if extra_lattice is not None:
        lattice = np.concatenate([lattice, extra_lattice], axis=0)
    coarse = torch.from_numpy(np.ascontiguousarray(lattice, dtype=np.float32))[None]
    fine = F.interpolate(coarse, size=GRID_SHAPE, mode="trilinear", align_corners=True)[0]
    grid = fine[:3].permute(1, 2, 3, 0)[None]
    extra = fine[3:] if extra_lattice is not None else None
    return grid, extra


def sample(volumes: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``(C, X, Y, Z)`` atlas volumes on a :func:`sampling_grid` (0 outside the atlas).

    ``mode`` is ``"bilinear"`` (trilinear) or ``"nearest"``; returns ``(C, *GRID_SHAPE)``.
    """
    return F.grid_sample(volumes[None], grid, mode=mode, padding_mode="zeros", align_corners=True)[
        0
    ]


def smooth_lattice_field(
    rng: np.random.Generator, amplitude: float, sigma: float = 4.0
) -> np.ndarray:
    """A ``(*LATTICE)`` smooth random field with RMS ``amplitude`` (for bias fields)."""
    field = gaussian_filter(rng.standard_normal(LATTICE), sigma=sigma, mode="nearest")
    return field * (amplitude / max(float(np.sqrt((field**2).mean())), 1e-9))
