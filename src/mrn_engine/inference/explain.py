"""``mrn explain``: per-slice evidence of case folders, as NIfTI maps and a PNG summary per case.

Per case ``OUT/<case_id>/``:

- ``evidence_NM.nii.gz`` / ``evidence_QSM.nii.gz``: float32 on the NM / QSM source grid; each
  ROI slice's evidence (P(PD) - P(PD) without that slice; > 0 PD-ward, < 0 HC-ward) painted
  over the ROI box on that slice's source z, 0 elsewhere;
- ``attention_NM.nii.gz`` / ``attention_QSM.nii.gz``: the SFA ROI token's attention, same way;
- ``evidence.csv``: one row per ROI and slice; ``summary.png``: bars per ROI and the slices.

At the top of ``OUT``: ``evidence.csv`` (all cases) and ``explain.json`` (bundle, folds, TTA,
calibration, per case P(PD), call, uncertainty flag, top-evidence slices, errors). A case folder
is assembled under a hidden name and renamed into place when complete; failed cases are listed
in ``explain.json`` and leave no folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mrn_engine.data import discover_cases, load_case
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.data.nifti import save_volume
from mrn_engine.data.tables import write_csv, write_json
from mrn_engine.errors import InputDataError, MRNError
from mrn_engine.inference.evidence import CaseEvidence, case_evidence, evidence_volume
from mrn_engine.inference.uncertainty import assess_prediction
from mrn_engine.results import CALL_NAMES

EVIDENCE_CSV = "evidence.csv"
EXPLAIN_JSON = "explain.json"
SUMMARY_PNG = "summary.png"
EVIDENCE_COLUMNS = ("case_id", "roi", "slice", "source_z", "evidence", "p_without", "attention")


def summary_figure(ev: CaseEvidence, crops: dict[str, Any], title: str) -> Figure:
    """Per ROI: evidence bars per slice (red PD-ward, blue HC-ward) + attention, and the slices."""
    fig = Figure(figsize=(3.2 * len(ROI_NAMES), 5.4))
    grid = fig.add_gridspec(2, len(ROI_NAMES), height_ratios=(2.2, 1.0))
    lim = max(1e-6, max(float(np.abs(ev.evidence[n]).max()) for n in ROI_NAMES))
    for i, name in enumerate(ROI_NAMES):
        e = ev.evidence[name]
        ax = fig.add_subplot(grid[0, i])
        x = np.arange(len(e))
        ax.bar(x, e, color=np.where(e >= 0, "tab:red", "tab:blue"))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylim(-1.1 * lim, 1.1 * lim)
        z = ev.source_z[name]
        ax.set_xticks(x, [str(v) if v >= 0 else "pad" for v in z.tolist()], fontsize=7)
        ax.set_xlabel("slice (source z)", fontsize=8)
        tag = " (masked)" if name in ev.masked else ""
        ax.set_title(f"{name}{tag}", fontsize=9)
        ax.tick_params(labelsize=7, labelleft=i == 0)
        if i == 0:
            ax.set_ylabel("evidence: P(PD) - P(PD | slice left out)", fontsize=8)
        twin = ax.twinx()
        twin.plot(x, ev.attention[name], color="black", marker=".", lw=1)
        twin.set_ylim(0, max(0.05, 1.2 * max(float(ev.attention[n].max()) for n in ROI_NAMES)))
        twin.tick_params(labelsize=7, labelright=i == len(ROI_NAMES) - 1)
        if i == len(ROI_NAMES) - 1:
            twin.set_ylabel("SFA attention (line)", fontsize=8)
        crop = crops.get(name)
        if crop is not None:
            strip = np.concatenate(list(np.asarray(crop.image)), axis=1)  # (H, S*W)
            ax2 = fig.add_subplot(grid[1, i])
            ax2.imshow(strip, cmap="gray", vmin=0, vmax=255, aspect="equal")
            w = crop.image.shape[2]
            for s, v in enumerate(e.tolist()):
                a = min(1.0, abs(v) / lim)
                ax2.add_patch(
                    _rect(s * w, crop.image.shape[1], w, "tab:red" if v >= 0 else "tab:blue", a)
                )
            ax2.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return fig


def _rect(x0: float, h: float, w: float, color: str, alpha: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x0 - 0.5, -0.5), w, h, fill=False, ec=color, lw=3, alpha=max(alpha, 0.05))


def _save_png(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def write_case_explanation(case: Any, pred: Any, ev: CaseEvidence, folder: Path) -> None:
    """Write one case's maps, table and summary into ``folder`` (which must exist)."""
    crops = pred.crops or {}
    for modality, vol in (("NM", case.nm), ("QSM", case.qsm)):
        for what in ("evidence", "attention"):
            data = evidence_volume(ev, crops, modality, vol.array.shape, what)
            save_volume(vol.like(data, kind="image"), folder / f"{what}_{modality}.nii.gz")
    write_csv(ev.rows(), folder / EVIDENCE_CSV, columns=EVIDENCE_COLUMNS)
    flag = assess_prediction(pred)
    cal = "calibrated" if pred.calibrated else "uncalibrated"
    title = (
        f"{pred.case_id}: P(PD) = {pred.p_pd:.3f} ({cal}) -> {CALL_NAMES[pred.call]}, "
        f"{flag.label}" + (f"; masked: {', '.join(sorted(ev.masked))}" if ev.masked else "")
    )
    _save_png(summary_figure(ev, crops, title), folder / SUMMARY_PNG)


def explain_cases(
    predictor: Any,
    cases_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    masked: Iterable[str] = (),
    on_case: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Explain every case under ``cases_dir`` into ``out_dir``; returns the ``explain.json`` data."""
    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    masked = frozenset(masked)
    if masked - set(ROI_NAMES):
        raise InputDataError(f"--mask: unknown ROI(s) {sorted(masked - set(ROI_NAMES))}")
    if out_dir.resolve() == cases_dir.resolve() or cases_dir.resolve() in out_dir.resolve().parents:
        raise InputDataError(f"{out_dir}: the output folder must lie outside the input {cases_dir}")
    files = discover_cases(cases_dir)
    if not files:
        raise InputDataError(f"{cases_dir}: no case folders (with NM/QSM files) found")
    out_dir.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict[str, object]] = []
    cases: list[dict[str, object]] = []
    errors: list[dict[str, str]] = []
    for i, cf in enumerate(files):
        if on_case:
            on_case(cf.case_id, i, len(files))
        tmp = Path(tempfile.mkdtemp(prefix=f".{cf.case_id}.", dir=out_dir))
        try:
            case = load_case(cf)
            pred = predictor.predict_case(case, keep_slice_tokens=True)
            ev = case_evidence(predictor, pred, masked)
            write_case_explanation(case, pred, ev, tmp)
        except (MRNError, OSError, ValueError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            msg = str(e) if isinstance(e, MRNError) else f"{type(e).__name__}: {e}"
            errors.append({"case_id": cf.case_id, "error": msg})
            continue
        final = out_dir / cf.case_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        all_rows.extend(ev.rows())
        flag = assess_prediction(pred)
        cases.append(
            {
                "case_id": cf.case_id,
                "p_pd": pred.p_pd,
                "p_pd_raw": pred.p_pd_raw,
                "p_pd_std": pred.p_pd_std,
                "call": pred.call,
                "uncertain": flag.uncertain,
                "uncertain_reasons": list(flag.reasons),
                "evidence_p_pd": ev.p_pd,
                "top_slice": {n: ev.top_slice(n) for n in ROI_NAMES},
            }
        )
    write_csv(all_rows, out_dir / EVIDENCE_CSV, columns=EVIDENCE_COLUMNS)
    bundle = getattr(predictor, "bundle", None)
    meta = {
        "model": str(bundle.root) if bundle is not None else None,
        "folds": list(predictor.folds),
        "tta": bool(predictor.tta),
        "calibrated": bool(predictor.calibrated),
        "masked": sorted(masked),
        "evidence": "P(PD) - P(PD with the slice left out of SFA); > 0 PD-ward",
    }
    data = {"meta": meta, "cases": cases, "errors": errors}
    write_json(data, out_dir / EXPLAIN_JSON)
    return data
