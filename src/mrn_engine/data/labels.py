"""Label values of the PDCADxFoundation masks and the four MRN regions of interest.

QSM_mask: odd = right, even = left (1/2 caudate ... 15/16 dentate).
NM_mask: 1 = SN right, 2 = SN left.
Each ROI merges left/right into one class per nucleus type (paper 3.4), so mirror
augmentation is label-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

QSM_LABELS: dict[int, str] = {
    1: "caudate_R",
    2: "caudate_L",
    3: "putamen_R",
    4: "putamen_L",
    5: "globus_pallidus_R",
    6: "globus_pallidus_L",
    7: "thalamus_R",
    8: "thalamus_L",
    9: "STN_R",
    10: "STN_L",
    11: "SN_R",
    12: "SN_L",
    13: "RN_R",
    14: "RN_L",
    15: "dentate_R",
    16: "dentate_L",
}
NM_LABELS: dict[int, str] = {1: "SN_R", 2: "SN_L"}

#: display colours (RGB 0-1) per QSM structure type, shared by plots and the napari plugin
NUCLEUS_COLOURS: dict[str, tuple[float, float, float]] = {
    "caudate": (0.12, 0.47, 0.71),
    "putamen": (1.00, 0.50, 0.05),
    "globus_pallidus": (0.17, 0.63, 0.17),
    "thalamus": (0.58, 0.40, 0.74),
    "STN": (0.84, 0.15, 0.16),
    "SN": (0.89, 0.47, 0.76),
    "RN": (0.74, 0.74, 0.13),
    "dentate": (0.09, 0.75, 0.81),
}


@dataclass(frozen=True)
class RoiSpec:
    """One MRN region of interest.

    Attributes
    ----------
    name: machine name used as a key everywhere (``nm_sn`` ...).
    title: human-readable name.
    modality: ``"NM"`` or ``"QSM"`` — which image and which mask it is cut from.
    classes: merged nucleus types, in class order (class index = position + 1; 0 = background).
    source_labels: for each merged class, the source mask labels (right, left) it merges.
    """

    name: str
    title: str
    modality: str
    classes: tuple[str, ...]
    source_labels: tuple[tuple[int, ...], ...]

    @property
    def labels(self) -> tuple[int, ...]:
        """All source mask labels that belong to this ROI."""
        return tuple(v for group in self.source_labels for v in group)

    @property
    def num_classes(self) -> int:
        """Segmentation classes including background."""
        return len(self.classes) + 1

    def merge_map(self) -> dict[int, int]:
        """Source label -> merged class index (labels outside the ROI map to 0)."""
        return {lab: i + 1 for i, group in enumerate(self.source_labels) for lab in group}


ROIS: tuple[RoiSpec, ...] = (
    RoiSpec("nm_sn", "NM-SN", "NM", ("SN",), ((1, 2),)),
    RoiSpec(
        "qsm_bg",
        "QSM basal ganglia",
        "QSM",
        ("caudate", "putamen", "globus_pallidus", "thalamus"),
        ((1, 2), (3, 4), (5, 6), (7, 8)),
    ),
    RoiSpec(
        "qsm_midbrain", "QSM midbrain", "QSM", ("STN", "SN", "RN"), ((9, 10), (11, 12), (13, 14))
    ),
    RoiSpec("qsm_dentate", "QSM dentate", "QSM", ("dentate",), ((15, 16),)),
)
ROI_NAMES: tuple[str, ...] = tuple(r.name for r in ROIS)
ROI_BY_NAME: dict[str, RoiSpec] = {r.name: r for r in ROIS}
