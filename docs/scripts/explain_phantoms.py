"""Measure issue 15's targets on held-out phantoms with a trained bundle.

    python docs/scripts/explain_phantoms.py BUNDLE HELDOUT_ROOT OUT.json

- calibration: ECE / Brier of the ensemble P(PD), raw vs the bundle's calibration
  (``calibration.json``; fitted with ``mrn calibrate`` first when absent; see also
  ``calibration_heldout.py``);
- uncertainty: share flagged, accuracy on confident vs uncertain cases;
- per-slice evidence: for the correctly classified PD cases, whether the top (most PD-ward)
  slice of the NM-SN ROI holds NM SN voxels, and the top slice of the QSM midbrain ROI holds
  QSM SN voxels (where the phantom's PD effect sits), with the chance rate (share of the ROI's
  stack slices that hold the nucleus);
- cost: wall time of evidence (head side) vs the prediction forward, per case.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main(bundle: str, heldout: str, out: str) -> None:
    import torch

    from mrn_engine.data import discover_cases, find_labels, load_case
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.inference.evidence import case_evidence
    from mrn_engine.inference.uncertainty import assess_prediction, confidence_summary
    from mrn_engine.training.calibration import (
        brier_score,
        expected_calibration_error,
        load_calibrations,
    )
    from mrn_engine.training.calibration_pooled import calibrate_bundle

    torch.set_num_threads(1)
    folds = sorted(int(p.name[5:]) for p in Path(bundle).glob("fold_*"))
    if not load_calibrations(bundle, folds):
        calibrate_bundle(bundle)
    predictor = MRNPredictor.from_bundle(bundle, device="cpu")
    labels = find_labels(heldout)
    nucleus = {"nm_sn": ("nm_mask", (1, 2)), "qsm_midbrain": ("qsm_mask", (11, 12))}
    y, p_raw, p_cal, flags, hits, chance, t_pred, t_ev = [], [], [], [], {}, {}, [], []
    for cf in discover_cases(heldout):
        case = load_case(cf, label=labels.get(cf.case_id))
        t0 = time.perf_counter()
        pred = predictor.predict_case(case, keep_slice_tokens=True)
        t1 = time.perf_counter()
        ev = case_evidence(predictor, pred)
        t_ev.append(time.perf_counter() - t1)
        t_pred.append(t1 - t0)
        y.append(int(case.label))
        p_raw.append(pred.p_pd_raw)
        p_cal.append(pred.p_pd)
        flags.append(assess_prediction(pred))
        if case.label == 1 and pred.call == 1:
            for roi, (mask_attr, values) in nucleus.items():
                mask = getattr(case, mask_attr).array
                has = np.isin(mask, values).any(axis=(0, 1))  # per source z
                z = ev.source_z[roi]
                top = ev.top_slice(roi)
                hits.setdefault(roi, []).append(bool(top >= 0 and has[top]))
                real = z[z >= 0]
                chance.setdefault(roi, []).append(float(has[real].mean()) if real.size else 0.0)
    result = {
        "bundle": str(bundle),
        "heldout": str(heldout),
        "n": len(y),
        "folds": predictor.folds,
        "temperatures": {k: c.temperature for k, c in predictor.calibration.items()},
        "ece_raw": expected_calibration_error(y, p_raw),
        "ece_calibrated": expected_calibration_error(y, p_cal),
        "brier_raw": brier_score(y, p_raw),
        "brier_calibrated": brier_score(y, p_cal),
        "accuracy_raw": float(np.mean((np.array(p_raw) >= 0.5) == np.array(y))),
        "uncertainty": confidence_summary(y, flags, p_cal),
        "pd_correct": len(next(iter(hits.values()), [])),
        "top_slice_on_nucleus": {r: float(np.mean(h)) for r, h in hits.items()},
        "chance_slice_on_nucleus": {r: float(np.mean(c)) for r, c in chance.items()},
        "predict_s_median": float(np.median(t_pred)),
        "evidence_s_median": float(np.median(t_ev)),
        "explain_over_predict": float(np.median(np.add(t_pred, t_ev)) / np.median(t_pred)),
    }
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
