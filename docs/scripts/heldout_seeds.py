"""Several bundles on one labelled held-out folder: accuracy / AUC per bundle, mean +- sd per
arm over its seeds, and paired differences against a reference arm.

    python docs/scripts/heldout_seeds.py CASES CSV_DIR ARM_s1=BUNDLE ARM_s2=BUNDLE ... \
        [--reference ARM]

Used for docs/results.md "MRN from the AnatCL-pretrained ViT". Each bundle predicts every
labelled case under ``CASES`` once (``MRNPredictor.predict_case``, no nuclei) and the rows are
kept in ``CSV_DIR/<name>_big.csv`` (case_id, label, ensemble P(PD), raw and calibrated fold
P(PD)); an existing file is read instead. The arm of ``NAME`` is the name without its
``_s<seed>`` suffix; ``NAME=tta:BUNDLE`` predicts with mirror TTA. Paired difference: per
seed, the accuracy of the arm minus that of the reference on the same cases; 95 % bootstrap
interval over cases (4000 resamples) of the mean over the seeds the two arms share. The same
for the AUC, on the first 1000 of those resamples. ``--calibration`` adds per bundle the
binned ECE (with the noise floor of a perfectly calibrated model on the same P(PD)), Brier
score, log loss and calibration slope (Firth fit of the label on logit P(PD)). ``--folds``
adds each fold model's AUC (raw P(PD)), the mean pairwise correlation of the fold logits,
and with ``--calibration`` each calibrated fold's slope. The labels are read only to score.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from mrn_engine.data.cases import discover_cases, find_labels, load_case
from mrn_engine.inference.predictor import MRNPredictor
from mrn_engine.training.calibration import (
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    fit_logistic,
    logit,
)


def predictions(
    bundle: str, cases: str, out: Path, tta: bool = False
) -> dict[str, tuple[int, float]]:
    """case id -> (label, ensemble P(PD)); predicted once, then read from ``out``."""
    if not out.is_file():
        pred = MRNPredictor.from_bundle(bundle, device="cpu", tta=tta)
        labels = find_labels(cases)
        rows = []
        for f in discover_cases(cases):
            if f.case_id not in labels:
                continue
            c = pred.predict_case(load_case(f), nuclei=False)
            r = {"case_id": f.case_id, "label": labels[f.case_id], "p_pd": c.p_pd}
            r["p_pd_raw"] = c.p_pd_raw
            r.update({f"raw{k}": v for k, v in enumerate(c.p_pd_folds_raw)})
            r.update({f"cal{k}": v for k, v in enumerate(c.p_pd_folds)})
            rows.append(r)
        tmp = out.with_suffix(".tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        tmp.replace(out)
    with out.open() as fh:
        return {r["case_id"]: (int(r["label"]), float(r["p_pd"])) for r in csv.DictReader(fh)}


def fold_columns(path: Path, ids: list[str], prefix: str) -> np.ndarray:
    """(cases, folds) P(PD) of the columns ``<prefix>0, <prefix>1, ...`` of a stored CSV."""
    with path.open() as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    k = sum(1 for c in rows[ids[0]] if re.fullmatch(rf"{prefix}\d+", c))
    return np.array([[float(rows[i][f"{prefix}{j}"]) for j in range(k)] for i in ids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases")
    ap.add_argument("csv_dir", type=Path)
    ap.add_argument(
        "bundles", nargs="+", help="NAME=BUNDLE or NAME=tta:BUNDLE (mirror TTA), NAME = ARM_s<seed>"
    )
    ap.add_argument("--reference", default="mrn")
    ap.add_argument("--calibration", action="store_true", help="ECE, Brier, log loss, slope")
    ap.add_argument("--folds", action="store_true", help="each fold model's AUC, fold agreement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.csv_dir.mkdir(parents=True, exist_ok=True)
    correct: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    probs: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    ids: list[str] = []
    for item in args.bundles:
        name, bundle = item.split("=", 1)
        m = re.fullmatch(r"(.+)_s(\d+)", name)
        arm, seed = (m.group(1), int(m.group(2))) if m else (name, 0)
        tta = bundle.startswith("tta:")
        bundle = bundle.removeprefix("tta:")
        rows = predictions(bundle, args.cases, args.csv_dir / f"{name}_big.csv", tta)
        ids = ids or sorted(rows)
        y = np.array([rows[i][0] for i in ids])
        p = np.array([rows[i][1] for i in ids])
        correct[arm][seed] = (p >= 0.5) == y
        probs[arm][seed] = p
        acc, auc = float(correct[arm][seed].mean()), float(roc_auc_score(y, p))
        scores[arm].append((acc, auc))
        print(
            f"{name}: n {len(ids)}, accuracy {acc:.3f}, AUC {auc:.3f}, PD share {(p >= 0.5).mean():.2f}"
        )
        if args.calibration:
            floor, p95 = ece_noise_floor(p)
            slope, _ = fit_logistic(logit(p), y, intercept=True)
            print(
                f"  ECE {expected_calibration_error(y, p):.3f} (floor {floor:.3f} / p95 {p95:.3f}),"
                f" Brier {brier_score(y, p):.3f}, log loss {log_loss(y, p):.4f}, slope {slope:.2f}"
            )
        if args.folds:
            z = logit(fold_columns(args.csv_dir / f"{name}_big.csv", ids, "raw"))
            aucs = " / ".join(f"{roc_auc_score(y, z[:, j]):.3f}" for j in range(z.shape[1]))
            rho = np.corrcoef(z.T)[np.triu_indices(z.shape[1], 1)].mean()
            line = f"  fold AUCs {aucs}, fold logits' mean correlation {rho:.2f}"
            if args.calibration:
                zc = logit(fold_columns(args.csv_dir / f"{name}_big.csv", ids, "cal"))
                slopes = [fit_logistic(zc[:, j], y, intercept=True)[0] for j in range(zc.shape[1])]
                line += ", calibrated fold slopes " + " / ".join(f"{a:.2f}" for a in slopes)
            print(line)
    print(
        "\n| arm | seeds | accuracy, mean ± sd | AUC, mean ± sd | accuracy − reference [95 % CI] "
        "| AUC − reference [95 % CI] |"
    )
    print("|---|---|---|---|---|---|")
    ref = correct.get(args.reference, {})
    y = np.array([rows[i][0] for i in ids])
    for arm, s in scores.items():
        a = np.array(s)
        sd = a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(2)
        shared = sorted(set(correct[arm]) & set(ref))
        diff = auc_diff = "-"
        if arm != args.reference and shared:
            rng = np.random.default_rng(0)
            draws = [rng.integers(0, y.size, y.size) for _ in range(4000)]
            d = np.mean([correct[arm][k].astype(float) - ref[k] for k in shared], axis=0)
            lo, hi = np.percentile([d[i].mean() for i in draws], [2.5, 97.5])
            diff = f"{100 * d.mean():+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (seeds {shared})"
            pairs = [(probs[arm][k], probs[args.reference][k]) for k in shared]
            boot = [paired_auc_difference(y[i], pairs, i) for i in draws[:1000]]
            lo, hi = np.percentile(boot, [2.5, 97.5])
            auc_diff = f"{paired_auc_difference(y, pairs, slice(None)):+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(
            f"| {arm} | {len(a)} | {100 * a[:, 0].mean():.1f} ± {100 * sd[0]:.1f} % | "
            f"{a[:, 1].mean():.3f} ± {sd[1]:.3f} | {diff} | {auc_diff} |"
        )


def paired_auc_difference(y: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]], idx) -> float:
    """Mean over seeds of AUC(arm) − AUC(reference) on the cases ``idx`` (labels ``y``)."""
    return float(np.mean([roc_auc_score(y, a[idx]) - roc_auc_score(y, b[idx]) for a, b in pairs]))


if __name__ == "__main__":
    main()
