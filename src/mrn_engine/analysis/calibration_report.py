"""The report's "Calibration and uncertainty" section.

Reliability diagram (scikit-learn ``calibration_curve``) and ECE / Brier before and after the
bundle's calibration (``training/calibration.py``: a map fitted on the pooled out-of-fold cases,
or older per-fold temperatures), on the out-of-fold cases (in-sample for the map) and on
held-out cases (honest); and the uncertainty rule's share flagged and
accuracy on confident vs uncertain cases (``analysis/uncertainty.py``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mrn_engine.analysis.html_parts import Rows, img, num, png, table
from mrn_engine.inference.uncertainty import assess, assess_row, confidence_summary
from mrn_engine.training.calibration import (
    N_BINS,
    Calibration,
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    read_calibration,
)
from mrn_engine.training.ensemble_calibration import (
    EnsembleCalibration,
    bundle_ensemble_calibration,
)

#: one evaluated set: (name, labels, raw P(PD), calibrated P(PD) or None)
CalSet = tuple[str, np.ndarray, np.ndarray, np.ndarray | None]


def fold_calibrations(fold_dirs: Mapping[int, Path]) -> dict[int, Calibration]:
    """The folds' ``calibration.json`` (only folds that have one)."""
    out = {}
    for k, d in fold_dirs.items():
        cal = read_calibration(d)
        if cal is not None:
            out[k] = cal
    return out


def oof_set(oof: Mapping[int, Rows], cals: Mapping[int, Calibration]) -> CalSet | None:
    """Pooled out-of-fold labels, raw and (when every fold has one) calibrated P(PD)."""
    if not oof:
        return None
    y = np.array([int(r["label"]) for k in sorted(oof) for r in oof[k]])  # type: ignore[call-overload]
    raw = np.array([num(r["p_pd"]) for k in sorted(oof) for r in oof[k]])
    after = None
    if all(k in cals for k in oof):
        after = np.concatenate(
            [cals[k].apply([num(r["p_pd"]) for r in oof[k]]) for k in sorted(oof)]
        )
    return "out-of-fold (calibration fitted on these)", y, raw, after


def held_out_set(
    rows: Rows,
    cals: Mapping[int, Calibration],
    ensemble: EnsembleCalibration | None = None,
) -> CalSet | None:
    """Held-out labels, raw and calibrated P(PD).

    Rows written by a calibrated predictor carry ``p_pd_raw`` (raw) and ``p_pd`` (calibrated);
    rows without ``p_pd_raw`` are raw: they are calibrated here per fold from ``p_pd_fold<k>``
    and combined as the predictor does (``ensemble.combine`` when given, else the mean).
    """
    rows = [r for r in rows if not math.isnan(num(r.get("label")))]
    if not rows:
        return None
    y = np.array([int(num(r["label"])) for r in rows])
    if all(not math.isnan(num(r.get("p_pd_raw"))) for r in rows):
        raw = np.array([num(r["p_pd_raw"]) for r in rows])
        calibrated = [str(r.get("calibrated", "")).lower() in ("true", "1") for r in rows]
        after = np.array([num(r["p_pd"]) for r in rows]) if all(calibrated) else None
        return "held-out", y, raw, after
    folds = sorted(int(c[len("p_pd_fold") :]) for c in rows[0] if c.startswith("p_pd_fold"))
    raw = np.array(
        [
            num(r["p_pd"]) if "p_pd" in r else np.mean([num(r[f"p_pd_fold{k}"]) for k in folds])
            for r in rows
        ]
    )
    after = None
    if folds and all(k in cals for k in folds):
        per_fold = np.array(
            [[float(cals[k].apply(num(r[f"p_pd_fold{k}"]))) for k in folds] for r in rows]
        )
        after = (
            np.array([ensemble.combine(p) for p in per_fold])
            if ensemble is not None and len(folds) > 1
            else per_fold.mean(axis=1)
        )
    return "held-out", y, raw, after


def calibration_rows(sets: Sequence[CalSet]) -> list[dict[str, object]]:
    """ECE and Brier before / after per set, and the ECE noise floor of the set's P(PD).

    ``ece_floor`` / ``ece_floor_p95``: the ECE a perfectly calibrated model with these
    (calibrated, else raw) probabilities would show on this many cases (``ece_noise_floor``).
    """
    out = []
    for name, y, raw, after in sets:
        floor, floor95 = ece_noise_floor(after if after is not None else raw)
        out.append(
            {
                "set": name,
                "n": int(y.size),
                "ece_raw": expected_calibration_error(y, raw),
                "ece_calibrated": expected_calibration_error(y, after)
                if after is not None
                else math.nan,
                "brier_raw": brier_score(y, raw),
                "brier_calibrated": brier_score(y, after) if after is not None else math.nan,
                "ece_floor": floor,
                "ece_floor_p95": floor95,
            }
        )
    return out


def reliability_figure(sets: Sequence[CalSet]) -> Figure | None:
    """Reliability diagram: observed PD fraction vs mean P(PD) per bin, raw and calibrated."""
    from sklearn.calibration import calibration_curve

    if not sets:
        return None
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect")
    colors = ("tab:blue", "black", "tab:green")
    for (name, y, raw, after), c in zip(sets, colors, strict=False):
        if len(set(y.tolist())) < 2:
            continue
        for p, ls, what in ((raw, "--", "raw"), (after, "-", "calibrated")):
            if p is None:
                continue
            frac, mean = calibration_curve(y, p, n_bins=N_BINS, strategy="uniform")
            ax.plot(mean, frac, ls=ls, marker="o", ms=3, color=c, label=f"{name}, {what}")
    ax.set(
        xlabel="mean predicted P(PD) in bin",
        ylabel="fraction PD in bin",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        title=f"Reliability ({N_BINS} bins)",
    )
    ax.legend(loc="upper left", fontsize=7)
    return fig


def uncertainty_rows(oof: CalSet | None, held_rows: Rows) -> list[dict[str, object]]:
    """Share flagged and accuracy on confident / uncertain cases, held-out and out-of-fold."""
    out = []
    held = [r for r in held_rows if not math.isnan(num(r.get("label")))]
    if held:
        flags = [assess_row(r) for r in held]
        s = confidence_summary(
            [int(num(r["label"])) for r in held], flags, [num(r["p_pd"]) for r in held]
        )
        out.append({"set": "held-out (ensemble: all three criteria)", **s})
    if oof is not None:
        name, y, raw, after = oof
        p = after if after is not None else raw
        flags = [assess(float(x)) for x in p]  # one model per case: threshold distance only
        out.append(
            {
                "set": "out-of-fold (one model per case: near-threshold only)",
                **confidence_summary(y, flags, p),
            }
        )
    return out


def map_text(c: Calibration) -> str:
    """``"temperature (T = 1.74)"``, ``"platt (slope 0.6, intercept -0.06)"``, ..."""
    if c.method == "temperature":
        return f"temperature (T = {c.temperature:.3g})"
    if c.method == "platt":
        return f"Platt (slope {1 / c.temperature:.3g}, intercept {c.intercept:.3g})"
    if c.method == "isotonic":
        return f"isotonic ({len(c.knots_x)} knots)"
    return "identity"


def calibration_section(
    fold_dirs: Mapping[int, Path], oof: Mapping[int, Rows], held_rows: Rows
) -> tuple[str, Figure | None]:
    """HTML of the section and its reliability figure (None when there is nothing to show)."""
    cals = fold_calibrations(fold_dirs)
    root = next(iter(fold_dirs.values())).parent if fold_dirs else None
    ens = bundle_ensemble_calibration(root, list(fold_dirs))[0] if root is not None else None
    o = oof_set(oof, cals)
    h = held_out_set(held_rows, cals, ens) if held_rows else None
    sets = [s for s in (o, h) if s is not None]
    if not sets:
        return "", None
    if cals and len(cals) == len(fold_dirs) and next(iter(cals.values())).scope == "pooled":
        c = next(iter(cals.values()))
        note = (
            f"One {html.escape(map_text(c))} map fitted on {html.escape(c.fitted_on)}, applied "
            "to each fold model's P(PD); "
            + html.escape(
                "; ".join(
                    f"{m} {r['logloss_crossfit']:.3f} / {r['ece_crossfit']:.3f}"
                    for m, r in c.selection.items()
                    if r.get("logloss_crossfit") is not None and r.get("ece_crossfit") is not None
                )
            ).join(("cross-fitted out-of-fold log loss / ECE: ", ". "))
            + html.escape(c.note)
        )
    elif cals and len(cals) == len(fold_dirs):
        temps = ", ".join(
            f"fold {k}: {c.method} T={c.temperature:.3g} (n={c.n_cases})"
            for k, c in sorted(cals.items())
        )
        note = f"Per-fold temperature scaling fitted on each fold's out-of-fold cases ({html.escape(temps)})."
    else:
        note = "<b>This bundle is uncalibrated</b> (no fold_k/calibration.json; run <code>mrn calibrate BUNDLE</code>)."
    if ens is not None and cals:
        note += html.escape(
            f" Ensemble calibration: the fold logits correlate at rho = {ens.rho_measured:.2f} on "
            f"{ens.n_cases} unseen cases ({ens.fitted_on}); the ensemble P(PD) is the mean "
            f"calibrated logit x {ens.factor(len(fold_dirs)):.2f}."
        )
    fig = reliability_figure(sets)
    pct = ("share_uncertain", "accuracy_all", "accuracy_confident", "accuracy_uncertain")
    unc = uncertainty_rows(o, held_rows)
    body = (
        "<h2>Calibration and uncertainty</h2>"
        f'<p class="muted">{note} ECE: {N_BINS} equal-width bins of P(PD) (torchmetrics); Brier: '
        "scikit-learn. Out-of-fold figures are in-sample for the map; held-out ones are not. "
        "ece_floor: the mean (and 95th percentile) ECE that a perfectly calibrated model with "
        "these P(PD) would show on this many cases (labels drawn from P(PD)); an ECE below "
        "the 95th percentile is not evidence of miscalibration.</p>"
        '<div class="figs">'
        + (img(png(fig), "reliability") if fig is not None else "")
        + table(
            calibration_rows(sets),
            (
                "set",
                "n",
                "ece_raw",
                "ece_calibrated",
                "ece_floor",
                "ece_floor_p95",
                "brier_raw",
                "brier_calibrated",
            ),
        )
        + "</div>"
        + (
            '<p class="muted">Uncertain = |P(PD) - 0.5| &lt; 0.10, or fold std &gt; 0.15, or TTA '
            "|original - mirrored| &gt; 0.10 (analysis/uncertainty.py).</p>"
            + table(unc, ("set", "n", "n_uncertain", *pct), pct)
            if unc
            else ""
        )
    )
    return body, fig
