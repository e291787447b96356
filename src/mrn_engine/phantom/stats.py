"""Measured value ranges of a written cohort, by class (for docs/phantom.md).

``python -m mrn_engine.phantom.stats ROOT [MAX_CASES]`` prints a markdown table.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from mrn_engine.data.labels import QSM_LABELS

#: nucleus type -> (right, left) QSM labels
_TYPES = {name.rsplit("_", 1)[0]: (lab, lab + 1) for lab, name in QSM_LABELS.items() if lab % 2}


def _labels(root: Path) -> dict[str, int]:
    """Labels from the CSVs, or (cohort still being written) from the per-case records."""
    out: dict[str, int] = {}
    if not (root / "train_cases.csv").is_file():
        for rec in sorted((root / ".phantom_cases").glob("RJPD_*.json")):
            data = json.loads(rec.read_text())
            out[data["case_id"]] = int(data["label"])
        return out
    for name in ("train_cases.csv", "val_cases.csv"):
        with open(root / name, newline="") as fh:
            out.update({row[0]: int(row[1]) for row in csv.reader(fh) if row})
    return out


def case_values(folder: Path) -> dict[str, float]:
    """Per-case measurements: QSM nucleus means, NM SN/floor, QSM percentiles, maxima, volume."""

    def load(name: str) -> np.ndarray:
        return np.asanyarray(nib.load(folder / f"{name}.nii.gz").dataobj)

    qsm, qmask, nm, nmask, t1 = (load(n) for n in ("QSM", "QSM_mask", "NM", "NM_mask", "T1"))
    brain = qsm != 0
    vals = {f"QSM {t}": float(qsm[np.isin(qmask, labs)].mean()) for t, labs in _TYPES.items()}
    p10, p90 = np.percentile(qsm, [10, 90])
    vals.update(
        {
            "QSM whole-volume p10": float(p10),
            "QSM whole-volume p90": float(p90),
            "QSM max": float(qsm.max()),
            "NM SN mean": float(nm[nmask > 0].mean()),
            "NM brain floor (median)": float(np.median(nm[brain & (nmask == 0)])),
            "NM whole-volume mean": float(nm.mean()),
            "NM max": float(nm.max()),
            "NM SN volume (mm3)": float(
                (nmask > 0).sum()
                * np.prod(nib.load(folder / "NM_mask.nii.gz").header.get_zooms()[:3])
            ),
            "T1 max": float(t1.max()),
        }
    )
    return vals


def value_table(root: str | Path, max_cases: int = 40) -> str:
    """Markdown table: mean +- SD of :func:`case_values` over HC and PD cases."""
    root = Path(root)
    labels = _labels(root)
    ids = sorted(labels)[:max_cases]
    rows = {0: [], 1: []}
    for case_id in ids:
        rows[labels[case_id]].append(case_values(root / case_id))
    keys = list(next(r for r in rows.values() if r)[0])
    lines = [f"| quantity | HC (n={len(rows[0])}) | PD (n={len(rows[1])}) |", "|---|---|---|"]
    for key in keys:
        cells = []
        for lab in (0, 1):
            v = np.array([r[key] for r in rows[lab]])
            cells.append(f"{v.mean():.1f} +- {v.std():.1f}" if v.size else "-")
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(value_table(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40))
