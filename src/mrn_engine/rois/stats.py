"""Per-case, per-ROI statistics of a cohort after the intensity mapping (``mrn cases --stats``).

The first thing to run on a new site's data: for every case and ROI the box extent, the
nucleus slices the model sees vs drops (:func:`seen_slices`, by the config's slice policy),
percentiles of the mapped intensities inside the nuclei (0-255, and in the mapping's units:
NM contrast-to-noise against the reference region, QSM ppm), and flags:

* ``empty ROI``: an ROI's labels are absent (the case cannot be used);
* ``QSM unit``: the case's QSM unit (ppb / ppm, detected) differs from most cases';
* ``far from cohort``: a robust z-score (median / 1.4826 MAD over the cases) beyond
  :data:`OUTLIER_Z` for the nuclei's median intensity or the box size;
* ``dropped slices``: nucleus slices outside the stack.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from mrn_engine.config import RoiConfig, atomic_write_text
from mrn_engine.data import discover_cases, find_labels, load_case
from mrn_engine.data.labels import ROIS
from mrn_engine.errors import InputDataError, MRNWarning
from mrn_engine.rois.boxes import roi_box
from mrn_engine.rois.extract import check_roi_labels, modality_mapping
from mrn_engine.rois.intensity import apply_window, qsm_to_ppm_factor

#: robust z-score beyond which a case is "far from the cohort"
OUTLIER_Z = 4.0
#: fewest cases for the cohort comparison
MIN_CASES_FOR_OUTLIERS = 5
FIELDS = [
    "case_id",
    "label",
    "roi",
    "box_x",
    "box_y",
    "box_z",
    "box_mm",
    "nucleus_slices",
    "stack_slices",
    "slice_policy",
    "kept",
    "dropped",
    "voxels",
    "p5",
    "p50",
    "p95",
    "p50_units",
    "units",
    "qsm_unit",
    "flags",
]


def seen_slices(z0: int, z1: int, n_stack: int, policy: str) -> set[int]:
    """Source slices of a box ``[z0, z1)`` that enter a stack of ``n_stack`` slices.

    ``"pad"``: the central ``n_stack`` (all if fewer). ``"resample"``: linear in z,
    antialiased when shrinking, so every box slice enters some stack slice.
    """
    n = z1 - z0
    if policy == "pad" and n > n_stack:
        start = z0 + (n - n_stack) // 2
        return set(range(start, start + n_stack))
    return set(range(z0, z1))


def case_stats(case, cfg: RoiConfig) -> list[dict]:
    """One row per ROI of a loaded case (with masks); an unusable ROI gets an ``empty ROI`` flag."""
    rows: list[dict] = []
    masks = {"NM": case.nm_mask, "QSM": case.qsm_mask}
    images = {"NM": case.nm, "QSM": case.qsm}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MRNWarning)
        unit = "ppb" if qsm_to_ppm_factor(case.qsm.array, cfg.qsm_unit) != 1.0 else "ppm"
    maps: dict = {}
    for spec in ROIS:
        row: dict = {"case_id": case.case_id, "label": case.label, "roi": spec.name}
        row["qsm_unit"] = unit
        row["flags"] = []
        mvol = masks[spec.modality]
        if mvol is None:
            row["flags"].append("empty ROI: no mask")
            rows.append(row)
            continue
        mask = mvol.array
        try:
            counts = np.bincount(mask.ravel(order="K"), minlength=256)
            check_roi_labels(counts, spec, mvol.name, strict=True)
            if spec.modality not in maps:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", MRNWarning)
                    qm = masks["QSM"].array if masks["QSM"] is not None else None
                    maps[spec.modality] = modality_mapping(
                        spec.modality,
                        images[spec.modality],
                        cfg,
                        mask,
                        qm if spec.modality == "NM" else None,
                    )
        except InputDataError as e:
            row["flags"].append(f"empty ROI: {e}")
            rows.append(row)
            continue
        m = maps[spec.modality]
        image = images[spec.modality]
        box = roi_box(mask, spec.labels, image.spacing, cfg.margin_mm)
        sel = np.isin(mask, spec.labels)
        zs = set(np.nonzero(sel.any(axis=(0, 1)))[0].tolist())
        n_stack = int(cfg.slices[spec.name])
        kept = zs & seen_slices(box.z0, box.z1, n_stack, cfg.slice_policy)
        raw = image.array[sel]
        mapped = apply_window(raw, m.window)
        p5, p50, p95 = (float(v) for v in np.percentile(mapped, [5, 50, 95]))
        lo, hi = m.window
        if cfg.intensity == "reference":
            info = dict(m.info)
            if spec.modality == "NM":
                units, value = "CNR", (float(np.median(raw)) - info["ref_median"]) / info["ref_sd"]
            else:
                units = "ppm"
                value = float(np.median(raw)) * (1e-3 if info.get("unit") == "ppb" else 1.0)
        else:
            units, value = "raw", float(np.median(raw))
        sx, sy, sz = box.size_mm(image.spacing)
        row.update(
            box_x=box.shape[0],
            box_y=box.shape[1],
            box_z=box.shape[2],
            box_mm=f"{sx:.0f}x{sy:.0f}x{sz:.0f}",
            nucleus_slices=len(zs),
            stack_slices=n_stack,
            slice_policy=cfg.slice_policy,
            kept=len(kept),
            dropped=len(zs) - len(kept),
            voxels=int(sel.sum()),
            p5=round(p5, 1),
            p50=round(p50, 1),
            p95=round(p95, 1),
            p50_units=round(value, 4),
            units=units,
        )
        if row["dropped"]:
            row["flags"].append(f"dropped slices: {row['dropped']} of {len(zs)}")
        if p50 >= 254.5 or p50 <= 0.5:
            row["flags"].append(f"saturated: median {p50:.0f}/255")
        rows.append(row)
    return rows


def _robust_z(values: np.ndarray) -> np.ndarray:
    med = np.nanmedian(values)
    mad = 1.4826 * np.nanmedian(np.abs(values - med))
    if not mad > 0:
        return np.zeros_like(values)
    return (values - med) / mad


def flag_outliers(rows: list[dict]) -> None:
    """Add cohort-level flags (unit differs from most cases, far from the cohort) in place."""
    units = Counter(r["qsm_unit"] for r in rows if r["roi"] == "qsm_bg")
    if units:
        common = units.most_common(1)[0][0]
        for r in rows:
            if r["qsm_unit"] != common:
                r["flags"].append(f"QSM unit: {r['qsm_unit']} (most cases: {common})")
    cases = {r["case_id"] for r in rows}
    if len(cases) < MIN_CASES_FOR_OUTLIERS:
        return
    for spec in ROIS:
        group = [r for r in rows if r["roi"] == spec.name and "p50" in r]
        if len(group) < MIN_CASES_FOR_OUTLIERS:
            continue
        for key, what in (("p50_units", "median intensity"), ("voxels", "nucleus volume")):
            z = _robust_z(np.array([float(r[key]) for r in group]))
            for r, v in zip(group, z, strict=True):
                if abs(v) > OUTLIER_Z:
                    r["flags"].append(f"far from cohort: {what} z={v:+.1f}")


def cohort_stats(root: str | os.PathLike, cfg: RoiConfig, progress: bool = True) -> list[dict]:
    """Rows of :func:`case_stats` for every case under ``root``, then :func:`flag_outliers`.

    A case that does not load gets one row flagged ``unreadable`` with the error.
    """
    from tqdm import tqdm

    labels = find_labels(root)
    rows: list[dict] = []
    for files in tqdm(discover_cases(root), desc="stats", unit="case", disable=not progress):
        try:
            case = load_case(files, labels.get(files.case_id))
        except InputDataError as e:
            rows.append(
                {
                    "case_id": files.case_id,
                    "roi": "-",
                    "qsm_unit": "-",
                    "flags": [f"unreadable: {e}"],
                }
            )
            continue
        rows.extend(case_stats(case, cfg))
    flag_outliers(rows)
    return rows


def stats_csv(rows: list[dict]) -> str:
    """The rows as CSV text (``flags`` joined by ``"; "``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "flags": "; ".join(r.get("flags", []))})
    return buf.getvalue()


def stats_table(rows: list[dict]) -> str:
    """Fixed-width text table for the terminal."""
    head = (
        f"{'case':<12} {'roi':<13} {'box (vox)':<13} {'nuc.sl':>6} {'kept':>4} {'drop':>4} "
        f"{'p5':>6} {'p50':>6} {'p95':>6} {'p50 units':>12}  flags"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "p50" not in r:
            lines.append(f"{r['case_id']:<12} {r['roi']:<13} {'-':<13} " + "; ".join(r["flags"]))
            continue
        box = f"{r['box_x']}x{r['box_y']}x{r['box_z']}"
        units = f"{r['p50_units']:.3g} {r['units']}"
        lines.append(
            f"{r['case_id']:<12} {r['roi']:<13} {box:<13} {r['nucleus_slices']:>6} "
            f"{r['kept']:>4} {r['dropped']:>4} {r['p5']:>6.1f} {r['p50']:>6.1f} {r['p95']:>6.1f} "
            f"{units:>12}  {'; '.join(r['flags'])}"
        )
    return "\n".join(lines)


def stats_figure(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """One PNG: mapped nucleus intensities (p5-p50-p95 per case) and kept/dropped slices per ROI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    names = [s.name for s in ROIS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {0: "tab:blue", 1: "tab:red", None: "tab:gray"}
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        group = [r for r in rows if r["roi"] == name and "p50" in r]
        for r in group:
            x = i + rng.uniform(-0.25, 0.25)
            c = (
                "black"
                if any(f.startswith("far") or f.startswith("QSM unit") for f in r["flags"])
                else colours.get(r["label"], "tab:gray")
            )
            axes[0].plot([x, x], [r["p5"], r["p95"]], color=c, alpha=0.35, lw=1)
            axes[0].plot(x, r["p50"], "o", color=c, ms=4)
            axes[1].plot(x, r["nucleus_slices"], "o", color="tab:green", ms=4, alpha=0.6)
            if r["dropped"]:
                axes[1].plot(x, r["kept"], "x", color="tab:red", ms=6)
        cfg_slices = {r["stack_slices"] for r in group}
        for s in cfg_slices:
            axes[1].plot([i - 0.35, i + 0.35], [s, s], color="k", lw=1.5)
    axes[0].set_xticks(range(len(names)), names)
    axes[0].set_ylabel("mapped intensity in the nuclei (0-255)")
    axes[0].set_ylim(-5, 260)
    axes[0].set_title(
        "nuclei after mapping: p5-p95, dot = median\nblue HC, red PD, grey unlabelled, black flagged"
    )
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_ylabel("axial slices")
    policies = sorted({r["slice_policy"] for r in rows if "slice_policy" in r})
    axes[1].set_title(
        f"nucleus slices per case (green) vs stack slices (line, {'/'.join(policies)})\n"
        "red x = kept when some are dropped"
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_stats(rows: list[dict], out_dir: str | os.PathLike, title: str = "") -> dict[str, Path]:
    """Write ``case_stats.csv``, ``case_stats.txt`` and ``case_stats.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "case_stats.csv", stats_csv(rows))
    atomic_write_text(out / "case_stats.txt", stats_table(rows) + "\n")
    png = stats_figure(rows, out / "case_stats.png", title)
    return {"csv": out / "case_stats.csv", "table": out / "case_stats.txt", "figure": png}
