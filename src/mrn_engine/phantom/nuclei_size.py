"""Nuclei of the challenge masks' size for the atlas phantoms (``mrn phantom --nuclei challenge``).

Warped onto the challenge grid, the atlas's nuclei (CIT168, aseg, the modelled dentate) are
1.0-3.1 times the volume of the challenge's own nnU-Net masks (caudate 2.5x, thalamus 2.6x,
STN 3.1x, SN 1.8x, RN 2.8x, dentate 2.2x, globus pallidus 1.0x). With ``nuclei="challenge"``
each atlas nucleus is eroded to a per-subject volume drawn around the challenge masks' mean:
the voxels kept are those deepest inside the nucleus (an exact-volume erosion, so the shape
stays the atlas's, thinner), and the QSM iron sits in what is kept. The default,
``nuclei="atlas"``, keeps the atlas's nuclei: with challenge-size nuclei the demo's AnatCL
pretraining collapsed and its models learned less (docs/results.md, "Nuclei of the
challenge's size"), so the option is there to measure with, not yet the default.

The NM SN (the atlas's SNc) is already of the challenge's size (about 700-790 voxels in
controls, against 720-780 in the real NM masks) and is left as it is.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt, find_objects

from mrn_engine.data.labels import QSM_LABELS

#: mean volume (mm^3) of each nucleus in the QSM masks of the challenge organisers' three
#: example patients (RJPD_002/005/006, nnU-Net predictions; left and right pooled, n = 6),
#: and the coefficient of variation between those six volumes
CHALLENGE_VOLUME_MM3: dict[str, tuple[float, float]] = {
    "caudate": (2843.0, 0.163),
    "putamen": (3715.0, 0.070),
    "globus_pallidus": (1824.0, 0.141),
    "thalamus": (4188.0, 0.096),
    "STN": (78.0, 0.191),
    "SN": (426.0, 0.173),
    "RN": (165.0, 0.187),
    "dentate": (683.0, 0.159),
}
#: the choices of ``mrn phantom --nuclei``
NUCLEI_CHOICES = ("challenge", "atlas")
#: a drawn volume stays within this many coefficients of variation of the mean
MAX_Z = 2.5


def nucleus_type(label: int) -> str:
    """``"SN"`` for label 11 (``SN_R``), etc."""
    return QSM_LABELS[label].rsplit("_", 1)[0]


def draw_target_volumes(rng: np.random.Generator) -> dict[int, float]:
    """Per QSM label, a subject's nucleus volume (mm^3): log-normal about the challenge mean.

    Left and right share a subject factor (correlation 0.5), as real hemispheres do.
    """
    out = {}
    for kind, (mean, cv) in CHALLENGE_VOLUME_MM3.items():
        shared = rng.standard_normal()
        labels = [lab for lab in sorted(QSM_LABELS) if nucleus_type(lab) == kind]
        for lab in labels:
            z = float(
                np.clip(np.sqrt(0.5) * shared + np.sqrt(0.5) * rng.standard_normal(), -MAX_Z, MAX_Z)
            )
            out[lab] = mean * float(np.exp(cv * z - 0.5 * cv * cv))
    return out


def erode_to_volumes(
    labels: np.ndarray, targets_mm3: dict[int, float], spacing: tuple[float, float, float]
) -> np.ndarray:
    """A copy of ``labels`` with each label cut to its target volume by keeping its deepest voxels.

    Depth is the distance (mm, anisotropic ``spacing``) to the nearest voxel outside the
    label. A label already at or below its target is kept whole (never grown).
    """
    out = labels.copy()
    voxel_mm3 = float(np.prod(spacing))
    boxes = find_objects(labels)
    for lab, target in targets_mm3.items():
        if lab > len(boxes) or boxes[lab - 1] is None:
            continue
        box = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, n))
            for s, n in zip(boxes[lab - 1], labels.shape, strict=True)
        )
        inside = labels[box] == lab
        n_keep = max(1, int(round(target / voxel_mm3)))
        n_have = int(inside.sum())
        if n_keep >= n_have:
            continue
        depth = distance_transform_edt(inside, sampling=spacing)[inside]
        shallowest = np.argsort(-depth, kind="stable")[n_keep:]
        out[box][tuple(i[shallowest] for i in np.nonzero(inside))] = 0
    return out
