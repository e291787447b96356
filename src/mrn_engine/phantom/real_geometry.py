"""Phantoms on real nuclei geometry (``mrn phantom --geometry DIR``, issue 13).

``DIR`` holds one folder per real subject with its nuclei masks on the challenge grid:
``QSM_pred.nii.gz`` or ``QSM_mask.nii.gz`` (16 QSM labels) and ``NM_pred.nii.gz`` or
``NM_mask.nii.gz`` (SN, 1 = right, 2 = left), e.g. the organisers' three example patients in
``../shared/data/real-geometry`` (never copied into this repository).

Per phantom case one subject's masks are deformed at random (:func:`deform_labels`: a global
anisotropic scale of SD 5 %, rotation up to 3 degrees, translation up to 1.5 mm about the
nuclei's centre, and a smooth displacement field of RMS 0.6 mm that changes shapes), so no two
cases share a mask. The MNI atlas anatomy around them (tissue, T1, brain) is moved onto those
nuclei by the least-squares affine between the atlas's and the subject's 16 nucleus centroids
(:func:`aligned_warp`); the PD depigmentation weight is rebuilt on the real SN
(:func:`depigmentation_weight`). Intensities, latents and the oracle are those of the atlas
phantoms: only the shapes and positions of the nuclei are real.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mrn_engine.errors import InputDataError
from mrn_engine.phantom.atlas import NM_BIT, load_atlas
from mrn_engine.phantom.geometry import GRID_SHAPE, VOXEL_MM, Warp, challenge_affine

#: file names tried per subject folder, in order
QSM_NAMES = ("QSM_pred.nii.gz", "QSM_mask.nii.gz")
NM_NAMES = ("NM_pred.nii.gz", "NM_mask.nii.gz")
#: nuclei deformation: scale SD, max rotation (deg), max translation (mm), displacement RMS (mm)
SCALE_SD, MAX_ROTATION_DEG, MAX_TRANSLATION_MM, DISPLACEMENT_MM = 0.05, 3.0, 1.5, 0.6
#: margin (mm) of the box in which the masks are deformed
BOX_MARGIN_MM = 12.0


@dataclass(frozen=True)
class RealSubject:
    """One real subject's nuclei masks on the challenge grid (uint8 labels)."""

    name: str
    qsm: np.ndarray
    nm: np.ndarray


def _read(folder: Path, names: tuple[str, ...], n_labels: int) -> np.ndarray:
    path = next((folder / n for n in names if (folder / n).is_file()), None)
    if path is None:
        raise InputDataError(f"{folder}: no {' or '.join(names)}")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken files
        raise InputDataError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != GRID_SHAPE:
        raise InputDataError(f"{path}: shape {data.shape}, the phantom grid is {GRID_SHAPE}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not np.allclose(zooms, VOXEL_MM, atol=0.01):
        raise InputDataError(f"{path}: voxel {zooms} mm, the phantom grid has {VOXEL_MM}")
    if not np.array_equal(data, np.round(data)) or data.min() < 0 or data.max() > n_labels:
        raise InputDataError(f"{path}: labels must be integers 0..{n_labels}")
    data = data.astype(np.uint8)
    missing = sorted(set(range(1, n_labels + 1)) - set(np.unique(data).tolist()))
    if missing:
        raise InputDataError(f"{path}: label(s) {missing} absent; every nucleus is needed")
    return data


@functools.lru_cache(maxsize=4)
def load_real_geometry(folder: str | Path) -> tuple[RealSubject, ...]:
    """Every subject folder under ``folder`` (sorted by name); clear error if there is none."""
    root = Path(folder)
    if not root.is_dir():
        raise InputDataError(f"{root}: --geometry must be a folder of subject folders")
    subjects = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if not any((sub / n).is_file() for n in QSM_NAMES + NM_NAMES):
            continue
        subjects.append(RealSubject(sub.name, _read(sub, QSM_NAMES, 16), _read(sub, NM_NAMES, 2)))
    if not subjects:
        raise InputDataError(
            f"{root}: no subject folder with {QSM_NAMES[0]} and {NM_NAMES[0]} (or *_mask)"
        )
    return tuple(subjects)


def _rotation(deg: np.ndarray) -> np.ndarray:
    rx, ry, rz = np.deg2rad(deg)
    r_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    r_y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    r_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def deform_labels(subject: RealSubject, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(qsm_labels, nm_labels)``: the subject's masks under a random plausible deformation."""
    both = (subject.qsm > 0) | (subject.nm > 0)
    idx = np.nonzero(both)
    spacing = np.asarray(VOXEL_MM)
    margin = np.ceil(BOX_MARGIN_MM / spacing).astype(int)
    lo = np.maximum([int(i.min()) for i in idx] - margin, 0)
    hi = np.minimum([int(i.max()) + 1 for i in idx] + margin, GRID_SHAPE)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    centre = np.array([i.mean() for i in idx]) * spacing  # mm, grid frame

    scale = np.clip(rng.normal(1.0, SCALE_SD, 3), 0.85, 1.15)
    rot = _rotation(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    trans = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    inv = np.linalg.inv(rot @ np.diag(scale))
    coarse = np.stack(
        [gaussian_filter(rng.standard_normal((8, 8, 5)), 1.5, mode="nearest") for _ in range(3)]
    )
    coarse *= DISPLACEMENT_MM / max(float(np.sqrt((coarse**2).mean())), 1e-9)
    disp = F.interpolate(
        torch.from_numpy(coarse.astype(np.float32))[None], size=shape, mode="trilinear"
    )[0].numpy()  # (3, *shape) mm

    grid_idx = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    ).reshape(3, -1)
    p_mm = grid_idx * spacing[:, None]
    src_mm = inv @ (p_mm - centre[:, None] - trans[:, None]) + centre[:, None]
    src_mm = src_mm + disp.reshape(3, -1)
    src = src_mm / spacing[:, None] - lo[:, None]  # box voxel coordinates
    norm = 2.0 * src / (np.asarray(shape, float)[:, None] - 1.0) - 1.0
    grid = torch.from_numpy(norm[::-1].T.reshape(1, *shape, 3).astype(np.float32).copy())
    vols = np.stack([subject.qsm[box], subject.nm[box]]).astype(np.float32)
    out = F.grid_sample(
        torch.from_numpy(vols)[None], grid, mode="nearest", padding_mode="zeros", align_corners=True
    )[0].numpy()
    qsm = np.zeros(GRID_SHAPE, np.uint8)
    nm = np.zeros(GRID_SHAPE, np.uint8)
    qsm[box] = np.rint(out[0]).astype(np.uint8)
    nm[box] = np.rint(out[1]).astype(np.uint8)
    return qsm, nm


def _centroids_world(labels: np.ndarray, affine: np.ndarray, n: int = 16) -> np.ndarray:
    """``(n, 3)`` world (mm) centroids of labels 1..n (NaN where absent)."""
    out = np.full((n, 3), np.nan)
    flat = labels.ravel()
    sel = np.flatnonzero(flat)
    vals = flat[sel]
    coords = np.stack(np.unravel_index(sel, labels.shape)).astype(float)
    for lab in range(1, n + 1):
        m = vals == lab
        if m.any():
            c = coords[:, m].mean(axis=1)
            out[lab - 1] = affine[:3, :3] @ c + affine[:3, 3]
    return out


@functools.lru_cache(maxsize=1)
def atlas_centroids() -> np.ndarray:
    """``(16, 3)`` MNI centroids (mm) of the atlas's QSM nuclei (= grid world, identity pose)."""
    atlas = load_atlas()
    return _centroids_world(atlas.codes & (NM_BIT - 1), atlas.affine)


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """4x4 least-squares affine ``src -> dst`` (points ``(n, 3)``); translation only if the
    linear part is implausible (a singular value outside 0.75-1.33)."""
    ok = ~(np.isnan(src).any(1) | np.isnan(dst).any(1))
    src, dst = src[ok], dst[ok]
    out = np.eye(4)
    if len(src) >= 6:
        x = np.hstack([src, np.ones((len(src), 1))])
        m, *_ = np.linalg.lstsq(x, dst, rcond=None)
        lin = m[:3].T
        sv = np.linalg.svd(lin, compute_uv=False)
        if np.linalg.det(lin) > 0 and sv.min() > 0.75 and sv.max() < 1.33:
            out[:3, :3], out[:3, 3] = lin, m[3]
            return out
    out[:3, 3] = dst.mean(0) - src.mean(0)
    return out


def aligned_warp(qsm_labels: np.ndarray, warp: Warp) -> Warp:
    """A warp that puts the atlas's nuclei onto ``qsm_labels`` (keeps ``warp``'s small field)."""
    real = _centroids_world(qsm_labels, challenge_affine())
    post = fit_affine(atlas_centroids(), real)
    return Warp((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), warp.displacement, post)


def depigmentation_weight(nm_labels: np.ndarray) -> np.ndarray:
    """0-1 weight inside the real SN: grows laterally and posteriorly (as the atlas's)."""
    w = np.zeros(nm_labels.shape, np.float32)
    xs = [np.nonzero(nm_labels == s)[0] for s in (1, 2)]
    mid = (
        (xs[0].mean() + xs[1].mean()) / 2.0
        if all(len(x) for x in xs)
        else (nm_labels.shape[0] - 1) / 2.0
    )
    for side in (1, 2):
        sel = nm_labels == side
        if not sel.any():
            continue
        i, j, _ = np.nonzero(sel)
        ax = np.abs(i - mid)
        lat = (ax - ax.min()) / max(np.ptp(ax), 1e-6)
        post = (j.max() - j) / max(np.ptp(j), 1e-6)  # LAS: higher j = anterior
        w[sel] = np.clip(0.55 * lat + 0.45 * post, 0.0, 1.0)
    return w
