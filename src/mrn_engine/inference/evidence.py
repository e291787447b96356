"""Per-slice evidence of a predicted case: fold ensemble, calibration, maps on the source grid.

``predictor.predict_case(case, keep_slice_tokens=True)`` keeps every fold's SFA inputs (the
slice tokens after FFA); :func:`case_evidence` then runs, per fold, only SFA over copies of the
case with one slice changed at a time and the classification head (``models/evidence.py``) --
no backbone pass. Per fold the views (TTA) are averaged and the fold's calibration applied,
like ``p_pd``; the ensemble is the mean over folds.
``evidence = P(PD) - P(PD with the slice made healthy)``: > 0 the slice pushes towards PD,
< 0 towards HC. "Made healthy" replaces the slice token by the fold's healthy reference
(``training/reference_slices.py``) when the bundle has one (method ``"reference"``); older
bundles leave the slice out of SFA instead (``"leave-out"``). :func:`evidence_volume` paints
each slice's value over its ROI box in the source volume (the slice-to-z mapping of
``rois.paste_back``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import InputDataError
from mrn_engine.models.evidence import slice_evidence
from mrn_engine.rois.extract import _stack_to_source  # the paste-back slice mapping

#: evidence method -> what it measures
DEFINITIONS = {
    "reference": "evidence = P(PD) - P(PD with the slice replaced by the healthy reference)",
    "leave-out": "evidence = P(PD) - P(PD with the slice left out of SFA)",
}
#: the methods :func:`case_evidence` accepts
METHODS = ("auto", "reference", "leave-out")


@dataclass
class CaseEvidence:
    """Per-slice evidence of one case under one ROI-masking condition.

    Attributes
    ----------
    case_id: the case.
    masked: ROIs replaced by empty volumes (their evidence is 0).
    p_pd: ensemble P(PD) with all slices (calibrated when the predictor is).
    p_without: ROI -> (S,) ensemble P(PD) with that slice left out of SFA.
    evidence: ROI -> (S,) ``p_pd - p_without``.
    attention: ROI -> (S,) SFA ROI-token attention on each slice (last block; mean of folds, views).
    source_z: ROI -> (S,) source z of each stack slice (-1: padding slice).
    method: ``"reference"`` (slice replaced by the healthy reference) or ``"leave-out"``.
    """

    case_id: str
    masked: frozenset[str]
    p_pd: float
    p_without: dict[str, np.ndarray]
    evidence: dict[str, np.ndarray]
    attention: dict[str, np.ndarray]
    source_z: dict[str, np.ndarray]
    method: str = "leave-out"

    @property
    def definition(self) -> str:
        """One line: what ``evidence`` measures for this case."""
        return DEFINITIONS[self.method]

    def top_slice(self, roi: str) -> int:
        """Source z of the slice with the largest PD-ward evidence of ``roi`` (-1 if padding)."""
        return int(self.source_z[roi][int(np.argmax(self.evidence[roi]))])

    def top_slices(self, roi: str, k: int = 3) -> list[dict[str, float | int]]:
        """The ``k`` most PD-ward slices of ``roi`` (largest evidence first; padding skipped)."""
        ev, z = self.evidence[roi], self.source_z[roi]
        order = [int(s) for s in np.argsort(-ev, kind="stable") if z[int(s)] >= 0][:k]
        return [
            {
                "slice": s,
                "source_z": int(z[s]),
                "evidence": float(ev[s]),
                "p_without": float(self.p_without[roi][s]),
            }
            for s in order
        ]

    def summary(self, k: int = 3) -> dict[str, object]:
        """JSON form: P(PD), masked ROIs, per ROI the top-``k`` PD-ward slices with their deltas
        and the most HC-ward slice."""
        rois = {}
        for n in ROI_NAMES:
            real = np.nonzero(self.source_z[n] >= 0)[0]
            low = int(real[np.argmin(self.evidence[n][real])]) if real.size else -1
            rois[n] = {
                "top_pd": self.top_slices(n, k),
                "top_hc": None
                if low < 0
                else {
                    "slice": low,
                    "source_z": int(self.source_z[n][low]),
                    "evidence": float(self.evidence[n][low]),
                },
                "n_slices": int(real.size),
            }
        return {
            "p_pd": self.p_pd,
            "masked": sorted(self.masked, key=ROI_NAMES.index),
            "method": self.method,
            "definition": self.definition,
            "rois": rois,
        }

    def rows(self) -> list[dict[str, object]]:
        """One row per ROI and slice, for CSV/JSON."""
        return [
            {
                "case_id": self.case_id,
                "roi": n,
                "slice": s,
                "source_z": int(self.source_z[n][s]),
                "evidence": float(self.evidence[n][s]),
                "p_without": float(self.p_without[n][s]),
                "attention": float(self.attention[n][s]),
            }
            for n in ROI_NAMES
            for s in range(len(self.evidence[n]))
        ]


def source_slices(crop: object) -> np.ndarray:
    """(S,) source z of each stack slice of ``crop`` (-1 for padding; nearest for resampling)."""

    z = np.full(len(crop.slice_index), -1, dtype=np.int64)  # type: ignore[attr-defined]
    ss, zs = _stack_to_source(crop)  # type: ignore[arg-type]
    for s, zz in zip(ss.tolist(), zs.tolist(), strict=True):
        if z[s] < 0:
            z[s] = zz  # resample: a stack slice may stand for several z; keep the first
    return z


def case_evidence(
    predictor: object, pred: object, masked: Iterable[str] = (), method: str = "auto"
) -> CaseEvidence:
    """Evidence of every ROI slice for ``pred`` (made with ``keep_slice_tokens=True``).

    ``method``: ``"auto"`` (the healthy reference when the predictor has one, else leave-out),
    ``"reference"`` or ``"leave-out"``.

    Raises
    ------
    InputDataError: the prediction kept no slice tokens, folds / ROIs do not match, or
        ``"reference"`` was asked of a bundle without one.
    """

    masked = frozenset(masked)
    case_id = getattr(pred, "case_id", "?")
    references = getattr(predictor, "reference_slices", None) or {}
    if method not in METHODS:
        raise InputDataError(f"evidence method {method!r}: choose one of {list(METHODS)}")
    if method == "reference" and not references:
        raise InputDataError(
            "the bundle has no healthy reference slice tokens (fold_k/reference_slices."
            "safetensors); add them with `mrn calibrate BUNDLE --reference-cases ROOT`"
        )
    use_reference = method != "leave-out" and bool(references)
    kept = getattr(pred, "slice_tokens", None)
    if not kept:
        raise InputDataError(
            f"{case_id}: no slice tokens kept; predict with keep_slice_tokens=True for evidence"
        )
    folds = list(predictor.folds)
    if list(pred.folds) != folds:
        raise InputDataError(
            f"{case_id}: prediction made with folds {pred.folds}, predictor has {folds}"  # type: ignore[attr-defined]
        )
    model = predictor.model  # type: ignore[attr-defined]
    device = predictor.device  # type: ignore[attr-defined]
    full, without, attn = [], {n: [] for n in ROI_NAMES}, {n: [] for n in ROI_NAMES}
    for j, k in enumerate(folds):
        predictor.ensemble.load(k)  # type: ignore[attr-defined]
        tokens = {n: t.to(device) for n, t in kept[j].items()}
        # the masking cache's empty tokens (warmed in the run): no ROI-encoder pass on a toggle
        empty = predictor.masker.empty_tokens(k) if masked and predictor.can_mask else None  # type: ignore[attr-defined]
        ev = slice_evidence(model, tokens, masked, empty, references[k] if use_reference else None)
        p_full = float(ev.p_full.mean())
        full.append(_calibrated(predictor, k, np.array([p_full]))[0])
        for n in ROI_NAMES:
            p = ev.p_without[n].mean(dim=0).cpu().numpy()  # views averaged, (S,)
            without[n].append(_calibrated(predictor, k, p))
            attn[n].append(ev.attention[n].mean(dim=0).cpu().numpy())
    p_pd = float(np.mean(full))
    p_without = {n: np.mean(without[n], axis=0) for n in ROI_NAMES}
    crops = getattr(pred, "crops", None) or {}
    source_z = {
        n: source_slices(crops[n]) if n in crops else np.full(len(p_without[n]), -1)
        for n in ROI_NAMES
    }
    return CaseEvidence(
        case_id=case_id,
        masked=masked,
        p_pd=p_pd,
        p_without=p_without,
        evidence={n: p_pd - p_without[n] for n in ROI_NAMES},
        attention={n: np.mean(attn[n], axis=0) for n in ROI_NAMES},
        source_z=source_z,
        method="reference" if use_reference else "leave-out",
    )


def _calibrated(predictor: object, fold: int, p: np.ndarray) -> np.ndarray:
    cals = getattr(predictor, "calibration", None) or {}
    return np.asarray(cals[fold].apply(p) if fold in cals else p, dtype=np.float64)


def evidence_volume(
    ev: CaseEvidence,
    crops: Mapping[str, object],
    modality: str,
    volume_shape: tuple[int, int, int],
    values: str = "evidence",
) -> np.ndarray:
    """(X, Y, Z) float32 on the ``modality`` grid: each slice's value over its ROI box.

    ``values``: ``"evidence"`` or ``"attention"``. Outside the boxes 0; where boxes of two ROIs
    overlap, the value of larger magnitude is kept.
    """
    if values not in ("evidence", "attention"):
        raise ValueError(f"values must be 'evidence' or 'attention', not {values!r}")
    out = np.zeros(volume_shape, np.float32)
    for name in ROI_NAMES:
        if ROI_BY_NAME[name].modality != modality or name not in crops:
            continue
        box = crops[name].box  # type: ignore[attr-defined]
        vals = getattr(ev, values)[name]
        for s, z in enumerate(ev.source_z[name].tolist()):
            if z < 0 or z >= volume_shape[2]:
                continue
            region = out[box.x0 : box.x1, box.y0 : box.y1, z]
            v = np.float32(vals[s])
            out[box.x0 : box.x1, box.y0 : box.y1, z] = np.where(np.abs(region) >= abs(v), region, v)
    return out
