"""Segmentation quality: Dice, 95% Hausdorff (mm) and the challenge's weighted score.

Interpretation of the challenge score (documented in ``docs/segmentation.md``): the organisers'
``metric.py`` scores every label separately (right and left apart); a structure's score is the
mean of its right and left label scores, each ``0.7 * Dice + 0.3 * max(0, 1 - HD95 / 10 mm)``.
The QSM score is the weight-normalised mean over the seven scored structures (thalamus is not
scored), the NM score is that of SN, and the composite is ``0.6 * QSM + 0.4 * NM``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mrn_engine.data.labels import NM_LABELS, QSM_LABELS

#: scored QSM structures -> (weight, (right label, left label))
QSM_SCORED: dict[str, tuple[float, tuple[int, int]]] = {
    "caudate": (1.0, (1, 2)),
    "putamen": (1.0, (3, 4)),
    "globus_pallidus": (1.0, (5, 6)),
    "STN": (1.2, (9, 10)),
    "SN": (1.5, (11, 12)),
    "RN": (1.1, (13, 14)),
    "dentate": (1.0, (15, 16)),
}
#: scored NM structures -> (weight, labels)
NM_SCORED: dict[str, tuple[float, tuple[int, int]]] = {"SN": (2.0, (1, 2))}
#: composite weights of the two modalities
MODALITY_WEIGHTS = {"QSM": 0.6, "NM": 0.4}
#: HD (mm) at which the distance term reaches 0
HD_SCALE_MM = 10.0


@dataclass(frozen=True)
class LabelScore:
    """Metrics of one label of one case."""

    modality: str
    label: int
    name: str
    dice: float
    hd95_mm: float  #: inf when exactly one of the two masks is empty, 0 when both are

    @property
    def score(self) -> float:
        """``0.7 * Dice + 0.3 * max(0, 1 - HD95 / 10 mm)``."""
        return region_score(self.dice, self.hd95_mm)


def region_score(dice: float, hd_mm: float) -> float:
    """The challenge's per-region score ``0.7 * Dice + 0.3 * clip(1 - HD / 10, 0)``."""
    hd_term = 0.0 if not math.isfinite(hd_mm) else max(0.0, 1.0 - hd_mm / HD_SCALE_MM)
    return 0.7 * float(dice) + 0.3 * hd_term


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    denom = pred.sum() + gt.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, gt).sum() / denom)


def hausdorff95(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], percentile: float = 95.0
) -> float:
    """Symmetric percentile Hausdorff distance between mask surfaces, in millimetres.

    Uses MONAI's ``compute_hausdorff_distance`` (Euclidean, spacing-aware). Returns 0 when both
    masks are empty and ``inf`` when only one is.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return math.inf
    import torch
    from monai.metrics import compute_hausdorff_distance

    # crop to the union's bounding box (+1 voxel) so the distance transform stays small
    idx = np.nonzero(pred | gt)
    sl = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    p = torch.from_numpy(pred[sl][None, None].astype(np.float32))
    g = torch.from_numpy(gt[sl][None, None].astype(np.float32))
    with warnings.catch_warnings():  # MONAI's own internal deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            p,
            g,
            include_background=True,
            percentile=percentile,
            spacing=[float(s) for s in spacing],
        )
    return float(value.reshape(-1)[0])


def label_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    modality: str,
    labels: dict[int, str] | None = None,
) -> list[LabelScore]:
    """Dice and HD95 of every label of one modality's mask pair (same grid)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    if labels is None:
        labels = NM_LABELS if modality == "NM" else QSM_LABELS
    out = []
    for lab, name in labels.items():
        p, g = pred == lab, gt == lab
        out.append(LabelScore(modality, lab, name, dice(p, g), hausdorff95(p, g, spacing)))
    return out


def structure_scores(scores: Sequence[LabelScore], modality: str) -> dict[str, float]:
    """Per scored structure: mean of its right and left label scores."""
    table = NM_SCORED if modality == "NM" else QSM_SCORED
    by_label = {s.label: s.score for s in scores if s.modality == modality}
    out = {}
    for name, (_, labs) in table.items():
        present = [by_label[lab] for lab in labs if lab in by_label]
        if present:
            out[name] = float(np.mean(present))
    return out


def modality_score(structures: dict[str, float], modality: str) -> float:
    """Weight-normalised mean of structure scores (NaN when none is present)."""
    table = NM_SCORED if modality == "NM" else QSM_SCORED
    num = sum(table[n][0] * v for n, v in structures.items() if n in table)
    den = sum(table[n][0] for n in structures if n in table)
    return num / den if den else math.nan


def composite_score(qsm: float, nm: float) -> float:
    """``0.6 * QSM + 0.4 * NM``."""
    return MODALITY_WEIGHTS["QSM"] * qsm + MODALITY_WEIGHTS["NM"] * nm


def case_summary(scores: Sequence[LabelScore]) -> dict[str, float]:
    """Per-case scores: each scored structure per modality, the two modality scores, composite."""
    out: dict[str, float] = {}
    mod_scores = {}
    for modality in ("QSM", "NM"):
        structs = structure_scores(scores, modality)
        for name, v in structs.items():
            out[f"{modality}_{name}_score"] = v
        mod_scores[modality] = modality_score(structs, modality)
        out[f"{modality}_score"] = mod_scores[modality]
    out["composite_score"] = composite_score(mod_scores["QSM"], mod_scores["NM"])
    return out
