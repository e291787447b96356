"""One phantom subject: NM, QSM, T1 and both masks on the challenge grid.

:func:`make_phantom_case` is deterministic for a seed (byte-identical arrays) and takes a few
seconds; :func:`write_phantom_case` writes the challenge files atomically.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from mrn_engine.data.labels import QSM_LABELS
from mrn_engine.data.nifti import write_nifti
from mrn_engine.fileio import make_temp_dir
from mrn_engine.phantom.atlas import NM_BIT, load_atlas
from mrn_engine.phantom.geometry import (
    GRID_SHAPE,
    VOXEL_MM,
    challenge_affine,
    random_warp,
    sample,
    sampling_grid,
    smooth_lattice_field,
)
from mrn_engine.phantom.model import (
    AGE_MEAN,
    NM_FLOOR,
    NM_LOSS_PER_SEVERITY,
    NM_MASK_THRESHOLD,
    NM_SN_EXCESS,
    QSM_NUCLEI,
    draw_class_latents,
)
from mrn_engine.phantom.nuclei_size import (
    NUCLEI_CHOICES,
    draw_target_volumes,
    erode_to_volumes,
    nucleus_type,
)
from mrn_engine.phantom.real_geometry import aligned_warp, deform_labels, depigmentation_weight
from mrn_engine.phantom.site import SITES, Site

#: file name -> PhantomCase attribute, in the challenge layout
CASE_FILES: dict[str, str] = {
    "NM.nii.gz": "nm",
    "QSM.nii.gz": "qsm",
    "T1.nii.gz": "t1",
    "NM_mask.nii.gz": "nm_mask",
    "QSM_mask.nii.gz": "qsm_mask",
}
MASK_FILES = ("NM_mask.nii.gz", "QSM_mask.nii.gz")


@dataclass
class PhantomCase:
    """One subject in memory (nothing written). Arrays are ``(300, 300, 70)`` in LAS."""

    case_id: str
    label: int  #: 0 = HC, 1 = PD
    affine: np.ndarray
    nm: np.ndarray
    qsm: np.ndarray
    t1: np.ndarray
    nm_mask: np.ndarray
    qsm_mask: np.ndarray
    latents: dict[str, float] = field(default_factory=dict)
    site: str = "A"  #: the simulated scanner site (:mod:`mrn_engine.phantom.site`)


#: QSM background (ppb) = GM_PPB * grey-matter + WM_PPB * white-matter probability
GM_PPB, WM_PPB = 10.0, -14.0


@functools.lru_cache(maxsize=1)
def _atlas_tensors() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(T1, QSM tissue background, brain, depigmentation weight) and label codes as tensors."""
    atlas = load_atlas()
    t1, gm, wm, brain, depig = atlas.channels.astype(np.float32) / 255.0
    chans = torch.from_numpy(np.stack([t1, GM_PPB * gm + WM_PPB * wm, brain, depig]))
    codes = torch.from_numpy(atlas.codes.astype(np.float32))[None]
    return chans, codes, atlas.affine


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (float32)."""
    re = rng.standard_normal(signal.shape, dtype=np.float32)
    re *= sigma
    re += signal
    im = rng.standard_normal(signal.shape, dtype=np.float32)
    im *= sigma
    return np.hypot(re, im)


def _random_brain_voxels(brain: np.ndarray, n: int, rng: np.random.Generator) -> tuple:
    idx = np.flatnonzero(brain.ravel())
    pick = rng.choice(idx, size=min(n, idx.size), replace=False)
    return np.unravel_index(np.sort(pick), brain.shape)


def make_phantom_case(
    label: int,
    seed: int,
    case_id: str = "RJPD_000",
    effect: float = 1.0,
    site: Site | None = None,
    geometry=None,
    nuclei: str = "atlas",
) -> PhantomCase:
    """Generate one subject (deterministic for ``seed``; a few seconds on one core).

    Parameters
    ----------
    label: 0 = healthy control, 1 = Parkinson's disease.
    seed: random seed of this subject (any non-negative int).
    case_id: the case id stored in the result.
    effect: scales every class difference (0 = none; 1 = oracle accuracy about 0.90).
    site: the simulated scanner (default site ``A``, the original generator); changes only
        how the anatomy is imaged, never the latents or the oracle.
    geometry: a :class:`~mrn_engine.phantom.real_geometry.RealGeometry` whose (randomly
        deformed) real nuclei masks replace the atlas nuclei.
    nuclei: without ``geometry``, ``"atlas"`` keeps the atlas nuclei whole; ``"challenge"``
        erodes them to per-subject volumes about those of the challenge's masks, see
        :mod:`mrn_engine.phantom.nuclei_size`.
    """
    site = SITES["A"] if site is None else site
    if label not in (0, 1):
        raise ValueError(f"{case_id}: label must be 0 (HC) or 1 (PD), got {label!r}")
    if not effect >= 0:
        raise ValueError(f"{case_id}: effect must be >= 0, got {effect!r}")
    if nuclei not in NUCLEI_CHOICES:
        raise ValueError(f"{case_id}: nuclei must be one of {NUCLEI_CHOICES}, got {nuclei!r}")
    rng = np.random.default_rng(seed)
    lat = draw_class_latents(label, rng, effect)
    severity, age = lat["severity"], lat["age"]

    # --- anatomy: warp the atlas onto the challenge grid -------------------------------
    warp = random_warp(rng)
    if geometry is not None:  # the atlas follows the (deformed) real nuclei instead
        geo_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6E0]))
        geometry_labels = deform_labels(geometry, geo_rng)
        warp = aligned_warp(geometry_labels[0], warp)
    nm_bias = smooth_lattice_field(rng, site.bias)
    t1_bias = smooth_lattice_field(rng, 0.05)
    qsm_field = smooth_lattice_field(rng, 6.0)
    chans, codes_t, atlas_affine = _atlas_tensors()
    with torch.no_grad():
        grid, extra = sampling_grid(
            tuple(chans.shape[1:]), atlas_affine, warp, np.stack([nm_bias, t1_bias, qsm_field])
        )
        maps = sample(chans, grid)
        codes = sample(codes_t, grid, mode="nearest")[0]
    t1_map, tissue, brain_p, depig = (m.numpy() for m in maps)
    nm_bias_f, t1_bias_f, qsm_field_f = (e.numpy() for e in extra)
    codes = codes.numpy().astype(np.uint8)
    brain = brain_p > 0.5
    qsm_mask = np.where(brain, codes & (NM_BIT - 1), 0).astype(np.uint8)
    nm_region = ((codes & NM_BIT) > 0) & brain
    nm_side = np.where(qsm_mask == 11, 1, np.where(qsm_mask == 12, 2, 0)).astype(np.uint8)
    if geometry is None and nuclei == "challenge":  # own stream: the other draws stay the same
        size_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x51E]))
        qsm_mask = erode_to_volumes(qsm_mask, draw_target_volumes(size_rng), VOXEL_MM)
    if geometry is not None:  # real nuclei (randomly deformed) replace the atlas nuclei
        qsm_mask, nm_side = geometry_labels
        nm_region = nm_side > 0
        depig = depigmentation_weight(nm_side)
        brain = brain | (qsm_mask > 0) | nm_region

    # --- NM: SN hyperintensity with lateral/posterior depigmentation in PD --------------
    loss = float(np.clip(NM_LOSS_PER_SEVERITY * severity, 0.0, 0.95))
    pigment = 1.0 - loss * depig
    pigment *= np.clip(1.0 + 0.08 * rng.standard_normal(pigment.shape, dtype=np.float32), 0.0, None)
    nm_contrast = float(np.clip(rng.normal(1.0, 0.12), 0.6, 1.4)) * site.nm_contrast
    nm_scale = float(np.exp(rng.normal(0.0, 0.10)))
    nm_sigma = float(rng.uniform(450.0, 750.0)) * site.nm_noise
    nm_signal = np.where(brain, NM_FLOOR[0] + NM_FLOOR[1] * t1_map, 0.0).astype(np.float32)
    nm_signal[nm_region] += NM_SN_EXCESS * nm_contrast * pigment[nm_region]
    nm_signal *= nm_scale * (1.0 + nm_bias_f)
    nm = np.rint(_rician(nm_signal, nm_sigma * nm_scale, rng))  # integer-valued magnitude
    vessels = _random_brain_voxels(brain, int(rng.integers(5, 30)), rng)
    nm[vessels] = rng.uniform(30000.0, 90000.0, vessels[0].size).astype(np.float32)
    if site.gain != 1.0 or site.offset != 0.0:  # the site's raw value scale
        nm = np.rint(np.float32(site.gain) * nm + np.float32(site.offset))
    nm_keep = nm_region & (pigment >= NM_MASK_THRESHOLD)
    nm_mask = np.where(nm_keep, nm_side, 0).astype(np.uint8)

    # --- QSM: signed susceptibility, nuclei on a grey/white background ------------------
    nucleus_means: dict[int, float] = {}
    offsets = {name: rng.normal(0.0, sd) for name, (_, sd, _, _) in QSM_NUCLEI.items()}
    for lab in sorted(QSM_LABELS):
        base, sd, age_slope, sev_slope = QSM_NUCLEI[nucleus_type(lab)]
        nucleus_means[lab] = (
            base
            + offsets[nucleus_type(lab)]
            + rng.normal(0.0, sd / 2.0)
            + age_slope * (age - AGE_MEAN)
            + sev_slope * severity
        )
    background = (tissue + qsm_field_f).astype(np.float32)
    lut = np.zeros(256, np.float32)
    for lab, mean in nucleus_means.items():
        lut[lab] = mean
    inside = qsm_mask > 0
    excess = np.zeros(GRID_SHAPE, np.float32)
    excess[inside] = lut[qsm_mask[inside]] - background[inside]
    nz = np.argwhere(inside)
    lo = np.maximum(nz.min(0) - 4, 0)
    hi = np.minimum(nz.max(0) + 5, GRID_SHAPE)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    # partial volume: nuclei bleed into their surroundings (values inside the masks kept)
    blurred = gaussian_filter(excess[box], sigma=(0.8, 0.8, 0.3))
    excess[box] = np.where(inside[box], excess[box], blurred)
    qsm_sigma = float(rng.uniform(18.0, 26.0)) * site.qsm_noise
    qsm = background + excess
    qsm += qsm_sigma * rng.standard_normal(GRID_SHAPE, dtype=np.float32)
    spikes = _random_brain_voxels(brain, int(rng.integers(20, 100)), rng)
    qsm[spikes] = (
        rng.choice([-1.0, 1.0], spikes[0].size) * rng.uniform(80, 300, spikes[0].size)
    ).astype(np.float32)
    if rng.random() < 0.5:  # a calcification / vein: a small blob of extreme values
        c = [int(v[0]) for v in _random_brain_voxels(brain & ~inside, 1, rng)]
        blob = tuple(slice(max(v - r, 0), v + r + 1) for v, r in zip(c, (2, 2, 1), strict=True))
        qsm[blob] = rng.uniform(400.0, 2800.0)
    qsm[~brain] = 0.0
    qsm = np.round(qsm, 1)  # 0.1 ppb steps: plenty, and the files compress twice as well
    if site.qsm_unit == "ppm":
        qsm = np.round(qsm / 1000.0, 4)

    # --- T1: the warped template in the real intensity range ----------------------------
    t1_scale = float(rng.uniform(170000.0, 205000.0))
    t1 = np.rint(_rician(t1_map * t1_scale * (1.0 + t1_bias_f), 0.012 * t1_scale, rng))
    t1[t1_map < 0.02] = 0.0  # skull-stripped like the template: no signal outside the head mask

    # --- bookkeeping --------------------------------------------------------------------
    voxel_mm3 = float(np.prod(VOXEL_MM))
    floor = float(np.median(nm[brain & ~nm_region])) if brain.any() else 0.0
    sn_nm = float(nm[nm_mask > 0].mean()) if (nm_mask > 0).any() else floor
    lat.update(
        {
            "nm_depigmentation": loss,
            "nm_contrast_factor": nm_contrast,
            "nm_scale": nm_scale,
            "nm_sn_volume_mm3": float((nm_mask > 0).sum()) * voxel_mm3,
            "nm_sn_mean": sn_nm,
            "nm_floor_median": floor,
            "nm_sn_contrast": (sn_nm - floor) / max(floor, 1e-6),
            "qsm_sn_mean_R": nucleus_means[11],
            "qsm_sn_mean_L": nucleus_means[12],
            "qsm_rn_mean_R": nucleus_means[13],
            "qsm_rn_mean_L": nucleus_means[14],
            "rotation_x_deg": warp.rotation_deg[0],
            "rotation_y_deg": warp.rotation_deg[1],
            "rotation_z_deg": warp.rotation_deg[2],
        }
    )
    return PhantomCase(
        case_id=case_id,
        label=int(label),
        affine=challenge_affine(),
        nm=nm.astype(np.float32, copy=False),
        qsm=qsm.astype(np.float32, copy=False),
        t1=t1.astype(np.float32, copy=False),
        nm_mask=nm_mask,
        qsm_mask=qsm_mask,
        latents={k: float(v) for k, v in lat.items()},
        site=site.name,
    )


def _nifti(array: np.ndarray, affine: np.ndarray, *, mask: bool) -> nib.Nifti1Image:
    data = array.astype(np.uint8 if mask else np.float32, copy=False)
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_phantom_case(case: PhantomCase, folder: Path) -> Path:
    """Write ``folder/<case_id>/{NM,QSM,T1,NM_mask,QSM_mask}.nii.gz`` atomically.

    The five files are written into a temporary sibling folder that is renamed into place,
    so a killed run never leaves a half-written case. An existing case folder is replaced.

    Returns
    -------
    The case folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / case.case_id
    tmp = Path(make_temp_dir(folder, prefix=f".tmp-{case.case_id}-"))
    try:
        for name, attr in CASE_FILES.items():
            img = _nifti(getattr(case, attr), case.affine, mask=name in MASK_FILES)
            write_nifti(img, tmp / name)
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
