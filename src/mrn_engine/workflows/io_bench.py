"""``mrn bench io``: what one phantom case costs to make, write, read and crop into ROIs.

The engine writes and reads ``.nii.gz`` through ISA-L (python-isal); this bench times that
against nibabel's own zlib (level 1) on the same volumes and checks both give the same voxels.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from mrn_engine.config import get_preset
from mrn_engine.data import load_case, load_volume
from mrn_engine.data.nifti import write_nifti
from mrn_engine.inference.timing import timed
from mrn_engine.phantom.case import MASK_FILES, make_phantom_case, write_phantom_case
from mrn_engine.rois import extract_rois

#: the files a diagnosis reads (T1 is written but never read)
READ_FILES = ("NM.nii.gz", "QSM.nii.gz", "NM_mask.nii.gz", "QSM_mask.nii.gz")


def _write_both(folder: Path, other: Path, t: dict[str, float]) -> None:
    """Time writing the case's five files with ISA-L and with nibabel's zlib; add their MB."""
    for path in sorted(folder.glob("*.nii.gz")):
        src = nib.load(str(path))
        img = nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine, src.header)
        for how, write in (("isal", write_nifti), ("zlib", nib.save)):
            out = other / f"{how}_{path.name}"
            with timed(t, f"{how}_s"):
                write(img, str(out))
            t[f"{how}_mb"] = t.get(f"{how}_mb", 0.0) + out.stat().st_size / 1e6


def _read_both(folder: Path, t: dict[str, float]) -> bool:
    """Time reading the four files a diagnosis needs, fast and through nibabel; same voxels?"""
    same = True
    for name in READ_FILES:
        kind = "mask" if name in MASK_FILES else "image"
        with timed(t, "fast_s"):
            fast = load_volume(folder / name, kind=kind)
        with timed(t, "nibabel_s"):
            slow = load_volume(folder / name, kind=kind, fast_gzip=False)
        same &= bool(np.array_equal(fast.array, slow.array))
    return same


def bench_io(
    n_cases: int = 3, *, seed: int = 0, preset: str = "cpu-tiny", log=None
) -> dict[str, object]:
    """Median seconds per phantom case for each step; see :func:`format_io`.

    One case is made first and not counted (it loads the atlas).
    """
    if n_cases < 1:
        raise ValueError("n_cases must be >= 1")
    cfg = get_preset(preset)
    make_phantom_case(0, seed)  # atlas load, not counted
    rows: list[dict[str, float]] = []
    identical = True
    with tempfile.TemporaryDirectory(prefix="mrn_bench_io_") as tmp:
        root, other = Path(tmp) / "cases", Path(tmp) / "other"
        other.mkdir()
        for i in range(n_cases):
            t: dict[str, float] = {}
            with timed(t, "make_s"):
                case = make_phantom_case(i % 2, seed + 1 + i, f"RJPD_{i:03d}")
            with timed(t, "write_case_s"):
                folder = write_phantom_case(case, root)
            _write_both(folder, other, t)
            identical &= _read_both(folder, t)
            with timed(t, "rois_s"):
                extract_rois(load_case(folder), cfg)
            rows.append(t)
            if log:
                log(
                    f"case {i + 1}/{n_cases}: make {t['make_s']:.2f} s, write {t['write_case_s']:.2f} s"
                )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "n_cases": n_cases,
        "preset": preset,
        "median": med,
        "write_speedup": med["zlib_s"] / med["isal_s"],
        "read_speedup": med["nibabel_s"] / med["fast_s"],
        "identical": identical,
    }


def format_io(result: dict) -> str:
    """A plain-text table of :func:`bench_io`'s figures."""
    m = result["median"]
    lines = [
        f"median seconds per phantom case ({result['n_cases']} cases, ROIs of {result['preset']}):",
        f"  make (simulate)            {m['make_s']:7.3f}",
        f"  write case (ISA-L gzip)    {m['write_case_s']:7.3f}",
        f"  write 5 files: ISA-L       {m['isal_s']:7.3f}  ({m['isal_mb']:.1f} MB)",
        f"  write 5 files: zlib lvl 1  {m['zlib_s']:7.3f}  ({m['zlib_mb']:.1f} MB)"
        f"  -> ISA-L {result['write_speedup']:.1f}x faster",
        f"  read 4 files: ISA-L        {m['fast_s']:7.3f}",
        f"  read 4 files: nibabel      {m['nibabel_s']:7.3f}"
        f"  -> ISA-L {result['read_speedup']:.1f}x faster",
        f"  load + crop the 4 ROIs     {m['rois_s']:7.3f}",
        f"  same voxels both ways: {'yes' if result['identical'] else 'NO'}",
    ]
    return "\n".join(lines)
