"""Transfer loss vs site difficulty: two bundles' per-case calls on the same travelling subjects.

    python docs/scripts/site_difficulty.py REF ROW [ROW ...] [--draws 4000] [--seed 0] \
        [--figure PNG --title TEXT]

Each ``REF`` / ``ROW`` is ``LABEL=OUT_DIR:COHORT:SCORING``: ``OUT_DIR`` is a
``site_adaptation_benchmark.py`` output (its ``per_case.csv``), ``COHORT`` one of its cohorts,
and ``SCORING`` either ``trained`` (P(PD) >= 0.5 as the bundle was trained) or ``shiftN``
(the share of PD calls with the site shift fitted on ``N`` local controls, over the repeated
splits; the AUC is then taken on the case's mean P(PD) over those splits). Rows that hold the same case ids with the same labels as ``REF`` (travelling
subjects: ``mrn phantom`` with the same ``--seed``/``--n``, another ``--site``) get the
accuracy gap ``ROW - REF`` with a 95 % interval from resampling the subjects, stratified by
label, the same subjects in both. Used for docs/results.md "Is scanner B harder, or is it
transfer?": the bundle trained at site A and scored at site B, against a bundle trained on the
same training subjects imaged at site B. ``--figure``: every row's accuracy with its 95 %
interval (subjects resampled), coloured by the cohort scored.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def _stratified_picks(y: np.ndarray, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``draws`` resamples of the indices of ``y``, each class resampled within itself."""
    groups = [np.flatnonzero(y == k) for k in (0, 1)]
    return [np.concatenate([rng.choice(g, g.size) for g in groups]) for _ in range(draws)]


def _load(spec: str) -> tuple[str, str, str, dict[str, int], dict[str, float], dict[str, float]]:
    """``LABEL=DIR:COHORT:SCORING`` -> (label, cohort, scoring, labels, P(PD) call rates,
    scores for AUC)."""
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
    return label, cohort, scoring, {r["case_id"]: int(r["label"]) for r in rows}, rate, score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("ref")
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--title", default="Accuracy on the same subjects, per training and test site")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    ref_name, _, _, ref_y, ref_rate, _ = _load(args.ref)
    ids = sorted(ref_y)
    picks = _stratified_picks(np.array([ref_y[c] for c in ids]), args.draws, rng)

    def correct(rate: dict[str, float], labels: dict[str, int], order: list[str]) -> np.ndarray:
        """Per case: the share of correct calls."""
        return np.array([rate[c] if labels[c] == 1 else 1.0 - rate[c] for c in order])

    ref_ok = correct(ref_rate, ref_y, ids)
    bars: list[tuple[str, str, float, float, float]] = []
    print("| row | cohort, scoring | accuracy | AUC | predicted PD share | gap to reference |")
    print("|---|---|---|---|---|---|")
    for spec in [args.ref, *args.rows]:
        name, cohort, scoring, labels, rate, score = _load(spec)
        order = list(labels)
        auc = float(roc_auc_score([labels[c] for c in order], [score[c] for c in order]))
        ok_all = correct(rate, labels, order)
        acc = float(ok_all.mean())
        share = float(np.mean(list(rate.values())))
        boot = [
            ok_all[i].mean()
            for i in _stratified_picks(np.array([labels[c] for c in order]), args.draws // 4, rng)
        ]
        bars.append((name, cohort, acc, *np.percentile(boot, [2.5, 97.5])))
        if spec == args.ref:
            gap = "reference"
        elif sorted(labels) == ids and all(labels[c] == ref_y[c] for c in ids):
            ok = correct(rate, labels, ids)
            draws = [ok[i].mean() - ref_ok[i].mean() for i in picks]
            lo, hi = np.percentile(draws, [2.5, 97.5])
            gap = f"{100 * (ok.mean() - ref_ok.mean()):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        else:
            gap = "other subjects"
        print(
            f"| {name} | {cohort}, {scoring} | {100 * acc:.1f} % | {auc:.3f} | "
            f"{share:.2f} | {gap} |"
        )
    print(f"\n(reference: {ref_name}; {len(ids)} subjects, {args.draws} paired resamples)")
    if args.figure:
        _figure(bars, args.figure, args.title)


def _figure(bars: list[tuple[str, str, float, float, float]], path: Path, title: str) -> None:
    """Horizontal bars: accuracy per row with its 95 % interval, coloured by cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = sorted({b[1] for b in bars})
    colours = dict(zip(cohorts, plt.get_cmap("tab10").colors, strict=False))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(bars) + 1.2))
    for i, (_name, cohort, acc, lo, hi) in enumerate(bars):
        ax.barh(i, 100 * acc, color=colours[cohort], alpha=0.8)
        ax.errorbar(100 * acc, i, xerr=[[100 * (acc - lo)], [100 * (hi - acc)]], color="k", lw=1)
        ax.text(100 * hi + 0.8, i, f"{100 * acc:.1f} %", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(50, color="grey", lw=0.8, ls=":")
    ax.set_xlim(40, 100)
    ax.set_xlabel("held-out accuracy (%), 95 % interval over subjects")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c], alpha=0.8) for c in cohorts]
    ax.legend(handles, [f"scored at {c}" for c in cohorts], fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
