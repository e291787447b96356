"""Transfer loss vs site difficulty: two bundles' per-case calls on the same travelling subjects.

    python docs/scripts/site_difficulty.py REF ROW [ROW ...] [--draws 4000] [--seed 0]

Each ``REF`` / ``ROW`` is ``LABEL=OUT_DIR:COHORT:SCORING``: ``OUT_DIR`` is a
``site_adaptation_benchmark.py`` output (its ``per_case.csv``), ``COHORT`` one of its cohorts,
and ``SCORING`` either ``trained`` (P(PD) >= 0.5 as the bundle was trained) or ``shiftN``
(the share of PD calls with the site shift fitted on ``N`` local controls, over the repeated
splits; the AUC is then taken on the case's mean P(PD) over those splits). Rows that hold the same case ids with the same labels as ``REF`` (travelling
subjects: ``mrn phantom`` with the same ``--seed``/``--n``, another ``--site``) get the
accuracy gap ``ROW - REF`` with a 95 % interval from resampling the subjects, stratified by
label, the same subjects in both. Used for docs/results.md "Is scanner B harder, or is it
transfer?": the bundle trained at site A and scored at site B, against a bundle trained on the
same training subjects imaged at site B.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def _load(spec: str) -> tuple[str, dict[str, int], dict[str, float], dict[str, float]]:
    """``LABEL=DIR:COHORT:SCORING`` -> (label, labels, P(PD) call rates, scores for AUC)."""
    label, rest = spec.split("=", 1)
    folder, cohort, scoring = rest.rsplit(":", 2)
    path = Path(folder) / "per_case.csv"
    if not path.is_file():
        raise SystemExit(f"{spec}: {path} not found (run site_adaptation_benchmark.py first)")
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["cohort"] == cohort]
    if not rows:
        raise SystemExit(f"{spec}: no cases of cohort {cohort!r} in {path}")
    if scoring == "trained":
        rate = {r["case_id"]: float(float(r["p_trained"]) >= 0.5) for r in rows}
        score = {r["case_id"]: float(r["p_trained"]) for r in rows}
    elif scoring.startswith("shift") and f"pd_rate_{scoring[5:]}" in rows[0]:
        rate = {r["case_id"]: float(r[f"pd_rate_{scoring[5:]}"]) for r in rows}
        score = {r["case_id"]: float(r[f"p_shift_{scoring[5:]}"]) for r in rows}
    else:
        raise SystemExit(f"{spec}: scoring must be 'trained' or shiftN with N in {path}")
    return label, {r["case_id"]: int(r["label"]) for r in rows}, rate, score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("ref")
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    ref_name, ref_y, ref_rate, _ = _load(args.ref)
    ids = sorted(ref_y)
    y = np.array([ref_y[c] for c in ids])
    groups = [np.flatnonzero(y == k) for k in (0, 1)]
    picks = [np.concatenate([rng.choice(g, g.size) for g in groups]) for _ in range(args.draws)]

    def correct(rate: dict[str, float], labels: dict[str, int]) -> np.ndarray:
        return np.array([rate[c] if labels[c] == 1 else 1.0 - rate[c] for c in ids])

    ref_ok = correct(ref_rate, ref_y)
    print("| row | cohort, scoring | accuracy | AUC | predicted PD share | gap to reference |")
    print("|---|---|---|---|---|---|")
    for spec in [args.ref, *args.rows]:
        name, labels, rate, score = _load(spec)
        scoring = spec.rsplit(":", 2)
        auc = float(roc_auc_score([labels[c] for c in labels], [score[c] for c in labels]))
        acc = float(np.mean([rate[c] if labels[c] else 1 - rate[c] for c in labels]))
        share = float(np.mean(list(rate.values())))
        if spec == args.ref:
            gap = "reference"
        elif sorted(labels) == ids and all(labels[c] == ref_y[c] for c in ids):
            ok = correct(rate, labels)
            draws = [ok[i].mean() - ref_ok[i].mean() for i in picks]
            lo, hi = np.percentile(draws, [2.5, 97.5])
            gap = f"{100 * (ok.mean() - ref_ok.mean()):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        else:
            gap = "other subjects"
        print(
            f"| {name} | {scoring[1]}, {scoring[2]} | {100 * acc:.1f} % | {auc:.3f} | "
            f"{share:.2f} | {gap} |"
        )
    print(f"\n(reference: {ref_name}; {len(ids)} subjects, {args.draws} paired resamples)")


if __name__ == "__main__":
    main()
