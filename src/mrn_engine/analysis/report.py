"""A self-contained HTML report of a training run (plots embedded as base64 PNG).

Sections: metrics tables (out-of-fold per fold and pooled; held-out per fold and ensemble),
ROC curves, confusion matrix, ROI masking heatmap (Table 4), per-fold training-loss curves
(``fold_k/metrics.csv``) and the run's configuration. Figures use matplotlib's Agg canvas
(``matplotlib.figure.Figure``; pyplot's global state is never touched).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mrn_engine.analysis.calibration_report import calibration_section
from mrn_engine.analysis.html_parts import Rows, img, num, png, table
from mrn_engine.analysis.metrics import binary_metrics, ensemble_metrics, fold_metrics, roc_points
from mrn_engine.bundle import CONFIG_FILE, METRICS_FILE, fold_dirs, read_info, read_oof
from mrn_engine.config import atomic_write_text
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.data.roi_subsets import ROI_SHORT
from mrn_engine.data.tables import read_csv
from mrn_engine.errors import InputDataError


# ---------------------------------------------------------------------------- inputs
def _read_losses(folds: Mapping[int, Path]) -> dict[int, dict[str, np.ndarray]]:
    """Per fold, column -> values of the numeric columns of ``metrics.csv`` (x in ``epoch``)."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for k, d in folds.items():
        p = d / METRICS_FILE
        if not p.is_file():
            continue
        rows = read_csv(p)
        if not rows:
            continue
        cols: dict[str, np.ndarray] = {}
        if "stage" in rows[0]:
            cols["stage"] = np.array([r["stage"] or "" for r in rows], dtype=object)
        for c in rows[0]:
            try:
                cols[c] = np.array(
                    [float(r[c]) if r[c] not in ("", None) else np.nan for r in rows]
                )
            except (TypeError, ValueError):
                continue
        out[k] = cols
    return out


def _load_rows(value: Rows | str | os.PathLike | None) -> list[dict[str, object]] | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return [dict(r) for r in read_csv(value)]
    rows = []
    for r in value:
        if hasattr(r, "summary"):  # a CasePrediction
            rows.append({**r.summary(), "label": "" if r.label is None else r.label})
        else:
            rows.append(dict(r))
    return rows


# ---------------------------------------------------------------------------- figures
def roc_figure(oof: Mapping[int, Rows], held_out: Rows | None) -> Figure | None:
    """ROC curves: each fold's out-of-fold cases, pooled OOF, and the held-out ensemble."""
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    drawn = False
    for k, rows in sorted(oof.items()):
        pts = roc_points([r["label"] for r in rows], [r["p_pd"] for r in rows])  # type: ignore[misc]
        if pts is not None:
            m = binary_metrics([r["label"] for r in rows], [r["p_pd"] for r in rows])  # type: ignore[misc]
            ax.plot(*pts, lw=1.2, alpha=0.8, label=f"fold {k} OOF (AUC {m.auc:.2f})")
            drawn = True
    if held_out:
        y = [int(num(r["label"])) for r in held_out]
        p = [num(r["p_pd"]) for r in held_out]
        pts = roc_points(y, p)
        if pts is not None:
            ax.plot(
                *pts,
                color="black",
                lw=2.2,
                label=f"ensemble, eval cases (AUC {binary_metrics(y, p).auc:.2f})",
            )
            drawn = True
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(
        xlabel="false positive rate (HC called PD)",
        ylabel="true positive rate (PD found)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        title="ROC",
    )
    ax.legend(loc="lower right", fontsize=8)
    return fig


def confusion_figure(confusion: Sequence[Sequence[int]], title: str) -> Figure:
    """2x2 confusion matrix with counts."""
    cm = np.asarray(confusion)
    fig = Figure(figsize=(3.6, 3.2))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, cm.max()))
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=14,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks([0, 1], ["HC", "PD"])
    ax.set_yticks([0, 1], ["HC", "PD"])
    ax.set(xlabel="predicted", ylabel="truth", title=title)
    return fig


def masking_figure(rows: Rows) -> Figure:
    """Heatmap of accuracy / AUC / F1 per masked ROI subset (Table 4)."""
    metrics = ("accuracy", "auc", "f1")
    vals = np.array([[num(r.get(m)) for m in metrics] for r in rows])
    labels = [str(r.get("masked", "")) for r in rows]
    fig = Figure(figsize=(5.0, 0.34 * len(rows) + 1.2))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(vals), cmap="RdYlGn", vmin=0.4, vmax=1.0, aspect="auto")
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            v = vals[i, j]
            txt = "n/a" if math.isnan(v) else f"{100 * v:.1f}"
            dark = not math.isnan(v) and (v < 0.5 or v > 0.92)  # ends of the colour map
            ax.text(
                j, i, txt, ha="center", va="center", fontsize=8, color="white" if dark else "black"
            )
    ax.set_xticks(range(len(metrics)), ["accuracy", "ROC AUC", "F1"])
    ax.set_yticks(range(len(labels)), [f"masked: {lab}" for lab in labels], fontsize=8)
    ax.xaxis.tick_top()
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    ax.set_title("ROI masking (fold ensemble, %)", pad=22)
    return fig


def loss_figure(losses: Mapping[int, Mapping[str, np.ndarray]]) -> Figure | None:
    """Per-fold training curves, one panel per loss column of ``metrics.csv``."""
    skip = {"epoch", "step", "fold", "lr", "time", "seconds", "stage"}
    names: list[str] = []
    for cols in losses.values():
        for c in cols:
            if c.lower() not in skip and not c.lower().startswith("lr") and c not in names:
                names.append(c)
    loss_like = [c for c in names if "loss" in c.lower()]
    scores = [c for c in names if c.lower().endswith(("_acc", "_auc"))]
    names = (loss_like + scores) or names
    if not names:
        return None
    names = names[:9]
    ncol = min(3, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig = Figure(figsize=(4.0 * ncol, 2.8 * nrow))
    for i, c in enumerate(names):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for k, cols in sorted(losses.items()):
            if c in cols:
                x = cols.get("epoch", np.arange(1, len(cols[c]) + 1))
                ax.plot(
                    x,
                    cols[c],
                    lw=1.2,
                    label=f"fold {k}",
                    marker="o" if len(x) <= 12 else None,
                    ms=3,
                )
                stage = cols.get("stage")
                if stage is not None and k == min(losses):
                    change = [j for j in range(1, len(stage)) if stage[j] != stage[j - 1]]
                    for j in change:  # e.g. pretrain (seg + contrastive) -> full loss
                        ax.axvline(x[j] - 0.5, color="grey", ls=":", lw=1)
        ax.set(title=c, xlabel="epoch")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;font-size:0.88em;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.muted{color:#777;font-size:0.85em}
.figs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}img{max-width:100%}
pre{background:#f7f7f7;padding:10px;font-size:0.78em;max-height:420px;overflow:auto}
"""


def _held_out_rows(
    rows: list[dict[str, object]],
) -> tuple[list[int], list[list[float]], list[str], list[dict[str, object]]]:
    """Labels, per-fold probabilities and fold names of held-out predictions (labelled rows only)."""
    rows = [
        r
        for r in rows
        if str(r.get("label", "")).strip() not in ("", "None") and not r.get("error")
    ]
    if not rows:
        return [], [], [], []
    fold_cols = [c for c in rows[0] if c.startswith("p_pd_fold")]
    y = [int(num(r["label"])) for r in rows]
    if fold_cols:
        pf = [[num(r[c]) for c in fold_cols] for r in rows]
    else:
        pf = [[num(r["p_pd"])] for r in rows]
    for r, p in zip(rows, pf, strict=True):
        r.setdefault("p_pd", float(np.mean(p)))
    names = [f"fold {c[len('p_pd_fold') :]}" for c in fold_cols] or ["model"]
    return y, pf, names, rows


def write_report(
    run_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    eval_predictions: Rows | str | os.PathLike | None = None,
    masking_table: Rows | str | os.PathLike | None = None,
    png_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report of a run (a model bundle) and return its path.

    Parameters
    ----------
    run_dir: the bundle (``config.json``, ``fold_k/metrics.csv``, ``fold_k/oof.csv``).
    out_path: the HTML file to write (atomically).
    eval_predictions: held-out predictions: rows (dicts with ``label``, ``p_pd`` and optionally
        ``p_pd_fold<k>``), ``CasePrediction`` objects with a ``label``, or a CSV path
        (``mrn ablate-rois``'s ``predictions.csv``); unlabelled rows are ignored. Default:
        ``RUN_DIR/ablation/predictions.csv`` if present.
    masking_table: Table 4 rows or CSV (``masking_table.csv``). Default:
        ``RUN_DIR/ablation/masking_table.csv`` if present.
    png_dir: also write the figures there as ``report_<name>.png``.
    """
    run_dir, out_path = Path(run_dir), Path(out_path)
    if not run_dir.is_dir():
        raise InputDataError(f"{run_dir}: run folder not found")
    ablation = run_dir / "ablation"
    if eval_predictions is None and (ablation / "predictions.csv").is_file():
        eval_predictions = ablation / "predictions.csv"
    if masking_table is None and (ablation / "masking_table.csv").is_file():
        masking_table = ablation / "masking_table.csv"
    config_text = (run_dir / CONFIG_FILE).read_text() if (run_dir / CONFIG_FILE).is_file() else ""
    try:
        info = read_info(run_dir)
    except InputDataError:  # a damaged bundle.json only loses its section of the report
        info = {}
    folds = fold_dirs(run_dir)
    oof = read_oof(run_dir)
    losses = _read_losses(folds)
    held = _load_rows(eval_predictions)
    masking = _load_rows(masking_table)

    figures: dict[str, Figure] = {}
    sections: list[str] = []
    pct = ("accuracy", "auc", "f1", "f1_pd")
    cols = ("set", "n", "accuracy", "auc", "f1", "f1_pd", "tn", "fp", "fn", "tp", "note")

    metric_html = []
    cm_source = None
    if oof:
        rows = fold_metrics(oof)
        metric_html.append(
            "<h3>Out-of-fold (each fold model on its own validation cases)</h3>"
            + table(rows, cols, pct)
        )
        pooled = rows[-1]
        cm_source = (
            [[pooled["tn"], pooled["fp"]], [pooled["fn"], pooled["tp"]]],
            f"{pooled['set']} (n={pooled['n']})",
        )
    held_rows: list[dict[str, object]] = []
    if held:
        y, pf, names, held_rows = _held_out_rows(held)
        if y:
            rows = ensemble_metrics(y, pf, fold_names=names)
            metric_html.append(
                "<h3>Evaluation cases (eval predictions, e.g. a held-out set: every fold model and the ensemble mean)</h3>"
                + table(rows, cols, pct)
            )
            ens = rows[-1]
            cm_source = (
                [[ens["tn"], ens["fp"]], [ens["fn"], ens["tp"]]],
                f"ensemble, eval cases (n={ens['n']})",
            )
    sections.append(
        "<h2>Metrics</h2>"
        + (
            "".join(metric_html)
            or '<p class="muted">No out-of-fold or held-out predictions found.</p>'
        )
    )

    fig_html = []
    roc = roc_figure(oof, held_rows or None)
    if roc is not None:
        figures["roc"] = roc
    if cm_source is not None:
        figures["confusion"] = confusion_figure(cm_source[0], cm_source[1])
    for name in ("roc", "confusion"):
        if name in figures:
            fig_html.append(img(png(figures[name]), name))
    if fig_html:
        sections.append(
            '<h2>ROC and confusion matrix</h2><div class="figs">' + "".join(fig_html) + "</div>"
        )

    if masking:
        figures["masking"] = masking_figure(masking)
        mcols = ("masked", "accuracy", "auc", "f1", "delta_accuracy", "n")
        sections.append(
            "<h2>ROI masking (paper Table 4)</h2>"
            f'<p class="muted">Masked ROI input replaced by an empty volume; ROIs: '
            f"{html.escape(', '.join(f'{v} = {k}' for k, v in ROI_SHORT.items() if k in ROI_NAMES))}.</p>"
            '<div class="figs">'
            + img(png(figures["masking"]), "masking")
            + table(masking, mcols, ("accuracy", "auc", "f1", "delta_accuracy"))
            + "</div>"
        )

    cal_html, cal_fig = calibration_section(folds, oof, held_rows)
    if cal_fig is not None:
        figures["reliability"] = cal_fig
    if cal_html:
        sections.append(cal_html)

    lf = loss_figure(losses)
    if lf is not None:
        figures["losses"] = lf
        sections.append("<h2>Training curves per fold</h2>" + img(png(lf), "losses"))

    if config_text:
        sections.append("<h2>Configuration</h2><pre>" + html.escape(config_text) + "</pre>")
    if info:
        sections.append(
            "<h2>Bundle</h2><pre>" + html.escape(json.dumps(_brief(info), indent=2)) + "</pre>"
        )

    preset = ""
    if config_text:
        try:
            preset = json.loads(config_text).get("preset", "")
        except json.JSONDecodeError:
            preset = ""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>MRN report</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>MRN run report</h1><p class='muted'>{html.escape(str(run_dir))} &middot; preset "
        f"<b>{html.escape(str(preset))}</b> &middot; folds {sorted(folds)} &middot; generated {now}</p>"
        + "".join(sections)
        + "</body></html>"
    )
    atomic_write_text(out_path, doc)
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            tmp = png_dir / f".report_{name}.png.tmp"
            tmp.write_bytes(png(fig))
            os.replace(tmp, png_dir / f"report_{name}.png")
    return out_path


def _brief(info: Mapping[str, object]) -> dict[str, object]:
    """bundle.json with case-id lists shortened to counts."""
    out: dict[str, object] = {}
    for k, v in info.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out[k] = [
                {kk: (f"{len(vv)} cases" if isinstance(vv, list) else vv) for kk, vv in x.items()}
                for x in v
            ]
        elif isinstance(v, dict):
            out[k] = {
                kk: (f"{len(vv)} items" if isinstance(vv, list) else vv) for kk, vv in v.items()
            }
        else:
            out[k] = v
    return out
