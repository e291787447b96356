"""``mrn bench io``: what one phantom case costs to make, write, read and crop into ROIs.

The engine writes and reads ``.nii.gz`` through ISA-L (python-isal); this bench times that
against nibabel's own zlib (level 1) on the same volumes and checks both give the same voxels.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from mrn_engine.config import get_preset
from mrn_engine.data import load_case, load_volume
from mrn_engine.data.nifti import write_nifti
from mrn_engine.phantom.case import MASK_FILES, make_phantom_case, write_phantom_case
from mrn_engine.rois import extract_rois

#: the files a diagnosis reads (T1 is written but never read)
READ_FILES = ("NM.nii.gz", "QSM.nii.gz", "NM_mask.nii.gz", "QSM_mask.nii.gz")


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _write_both(folder: Path, other: Path) -> dict[str, float]:
    """Seconds to write the case's five files with ISA-L and with nibabel's zlib, and sizes."""
    isal_s = zlib_s = 0.0
    isal_b = zlib_b = 0
    for path in sorted(folder.glob("*.nii.gz")):
        src = nib.load(str(path))
        img = nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine, src.header)
        dt, _ = _timed(lambda img=img, p=other / f"isal_{path.name}": write_nifti(img, p))
        isal_s += dt
        dt, _ = _timed(lambda img=img, p=other / f"zlib_{path.name}": nib.save(img, str(p)))
        zlib_s += dt
        isal_b += (other / f"isal_{path.name}").stat().st_size
        zlib_b += (other / f"zlib_{path.name}").stat().st_size
    return {"isal_s": isal_s, "zlib_s": zlib_s, "isal_mb": isal_b / 1e6, "zlib_mb": zlib_b / 1e6}


def _read_both(folder: Path) -> dict[str, float | bool]:
    """Seconds to read the four files a diagnosis needs, fast and through nibabel."""
    fast_s = slow_s = 0.0
    same = True
    for name in READ_FILES:
        kind = "mask" if name in MASK_FILES else "image"
        dt, fast = _timed(lambda n=name, k=kind: load_volume(folder / n, kind=k))
        fast_s += dt
        dt, slow = _timed(lambda n=name, k=kind: load_volume(folder / n, kind=k, fast_gzip=False))
        slow_s += dt
        same &= bool(np.array_equal(fast.array, slow.array))  # type: ignore[union-attr]
    return {"fast_s": fast_s, "nibabel_s": slow_s, "identical": same}


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
            make_s, case = _timed(
                lambda i=i: make_phantom_case(i % 2, seed + 1 + i, f"RJPD_{i:03d}")
            )
            write_s, folder = _timed(lambda c=case: write_phantom_case(c, root))
            both = _write_both(folder, other)  # type: ignore[arg-type]
            reads = _read_both(folder)  # type: ignore[arg-type]
            identical &= bool(reads.pop("identical"))
            crop_s, _ = _timed(lambda f=folder: extract_rois(load_case(f), cfg))
            rows.append(
                {"make_s": make_s, "write_case_s": write_s, **both, **reads, "rois_s": crop_s}
            )
            if log:
                log(f"case {i + 1}/{n_cases}: make {make_s:.2f} s, write {write_s:.2f} s")
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
