"""Is a bundle's held-out calibration slope the noise of its fitted temperature?

    python docs/scripts/calibration_slope_noise.py BUNDLE=CSV[=COHORT] ... [--resamples 2000]

Used for docs/results.md "The slope of about 1.2 is the noise of the temperature". ``CSV`` is
a ``heldout_seeds.py`` file of the bundle on a large labelled held-out set (columns ``raw<k>``:
fold ``k``'s raw P(PD)); ``COHORT``, optional, is the bundle's training cohort (its
``phantom_latents.csv`` holds the oracle). Per bundle it prints:

- per fold: the AUC and the slope (Firth fit of the label on the raw logit, no intercept) on
  the fold's own out-of-fold cases (``fold_k/oof.csv``) and on the held-out set; with
  ``COHORT`` also the oracle's AUC on that fold's out-of-fold cases, i.e. how hard they are;
- the slope fitted on the pooled out-of-fold logits (what a pooled temperature is, inverted),
  with a 95 % bootstrap interval over those cases, against the mean single-fold slope on the
  held-out set. Their ratio is the held-out slope the pooled temperature would leave; its
  interval comes from the pooled slope's (the held-out slopes taken as known).

Nothing is fitted on the held-out labels except the slopes being reported.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from mrn_engine.bundle import fold_dirs
from mrn_engine.training.calibration import fit_logistic, logit, read_oof_rows


def _oof(fold_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Case ids, labels and raw logits of a fold's own out-of-fold cases (its ``oof.csv``)."""
    rows = read_oof_rows(fold_dir / "oof.csv")
    ids = [r["case_id"] for r in rows]
    y = np.array([r["label"] for r in rows])
    return ids, y, logit([r["p_pd"] for r in rows])


def _slope(z: np.ndarray, y: np.ndarray) -> float:
    return fit_logistic(z, y, intercept=False)[0]


def report(bundle: Path, big_csv: Path, cohort: Path | None, resamples: int) -> None:
    """Print the per-fold and pooled figures of one bundle."""
    with big_csv.open() as fh:
        big = list(csv.DictReader(fh))
    yb = np.array([int(r["label"]) for r in big])
    oracle = {}
    if cohort is not None:
        with (cohort / "phantom_latents.csv").open() as fh:
            oracle = {r["case_id"]: float(r["oracle_p_pd"]) for r in csv.DictReader(fh)}
    pooled_z, pooled_y, pooled_ids, big_slopes = [], [], [], []
    print(f"{bundle} (held-out: {big_csv.name}, n {len(yb)})")
    for k, fold_dir in fold_dirs(bundle).items():
        ids, y, z = _oof(fold_dir)
        zb = logit([float(r[f"raw{k}"]) for r in big])
        big_slopes.append(_slope(zb, yb))
        line = (
            f"  fold {k}: out-of-fold n {len(y)}, AUC {roc_auc_score(y, z):.3f}, "
            f"slope {_slope(z, y):.2f} | held-out AUC {roc_auc_score(yb, zb):.3f}, "
            f"slope {big_slopes[-1]:.2f}"
        )
        if oracle:
            line += f" | oracle AUC on its out-of-fold cases {roc_auc_score(y, [oracle[i] for i in ids]):.3f}"
        print(line)
        pooled_z.append(z)
        pooled_y.append(y)
        pooled_ids += ids
    z, y = np.concatenate(pooled_z), np.concatenate(pooled_y)
    s0 = _slope(z, y)
    rng = np.random.default_rng(0)
    boot = [_slope(z[i], y[i]) for i in (rng.integers(0, y.size, y.size) for _ in range(resamples))]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    mean_big = float(np.mean(big_slopes))
    print(
        f"  pooled out-of-fold slope {s0:.2f} [95 %: {lo:.2f}, {hi:.2f}] (n {y.size}); "
        f"mean fold slope on the held-out set {mean_big:.2f}; ratio {mean_big / s0:.2f} "
        f"[{mean_big / hi:.2f}, {mean_big / lo:.2f}]"
    )
    if oracle:
        auc = roc_auc_score(y, [oracle[i] for i in pooled_ids])
        print(f"  oracle AUC: all out-of-fold cases {auc:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="BUNDLE=CSV[=COHORT]")
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args()
    for pair in args.pairs:
        bundle, big, *cohort = pair.split("=")
        report(Path(bundle), Path(big), Path(cohort[0]) if cohort else None, args.resamples)


if __name__ == "__main__":
    main()
