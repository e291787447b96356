"""Per-stage wall times of prediction: what each case spent reading, cropping, in the model...

Stages (seconds per case): ``read`` (NIfTI files), ``masks`` (choosing the cropping masks;
nnU-Net when it runs), ``crop`` (ROI extraction and model inputs), ``model`` (every fold, TTA),
``paste`` (segmentation back onto the source grids), ``write`` (the case's output files).
With DataLoader workers, ``read`` / ``masks`` / ``crop`` run in a worker, overlapping the model;
``wait`` is then the time the model loop waited for the next case.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager

#: stage names in pipeline order
STAGES: tuple[str, ...] = ("read", "masks", "crop", "model", "paste", "write")


@contextmanager
def timed(timings: MutableMapping[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timings[stage]`` (also on error)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def stage_line(timings: Mapping[str, float]) -> str:
    """One line for a status bar: the stages a case went through, in pipeline order.

    ``{"masks": 0.01, "model": 2.0}`` -> ``"masks 0.0 s, model 2.0 s"``; ``""`` when empty.
    """
    order = (*STAGES, "wait")
    return ", ".join(f"{s} {timings[s]:.1f} s" for s in order if s in timings)


def timing_row(case_id: str, timings: Mapping[str, float]) -> dict[str, object]:
    """One CSV row: ``case_id``, every stage (0 when absent), ``wait`` and ``total``."""
    row: dict[str, object] = {"case_id": case_id}
    row.update({s: float(timings.get(s, 0.0)) for s in STAGES})
    row["wait"] = float(timings.get("wait", 0.0))
    row["total"] = float(sum(timings.get(s, 0.0) for s in STAGES))
    return row


def summarize(
    rows: Sequence[Mapping[str, object]], *, wall_s: float, workers: int, skipped: int = 0
) -> dict[str, object]:
    """Totals and means per stage over the cases predicted in this run, plus throughput.

    ``wall_s``: the prediction loop's wall time (start-up and bundle loading excluded).
    """
    n = len(rows)
    stages = {}
    for s in (*STAGES, "wait"):
        total = float(sum(float(r.get(s, 0.0) or 0.0) for r in rows))  # type: ignore[arg-type]
        stages[s] = {"total_s": total, "mean_s": total / n if n else 0.0}
    return {
        "cases": n,
        "skipped": skipped,
        "workers": workers,
        "wall_s": wall_s,
        "cases_per_s": n / wall_s if wall_s > 0 else 0.0,
        "stages": stages,
    }


def format_summary(summary: Mapping[str, object]) -> str:
    """A few lines for the terminal: per-stage mean seconds per case and share of the sum."""
    stages: Mapping[str, Mapping[str, float]] = summary["stages"]  # type: ignore[assignment]
    busy = sum(stages[s]["total_s"] for s in STAGES) or 1.0
    lines = [
        f"timing: {summary['cases']} case(s) in {float(summary['wall_s']):.1f} s "  # type: ignore[arg-type]
        f"({float(summary['cases_per_s']):.3f} cases/s, {summary['workers']} loader worker(s)"  # type: ignore[arg-type]
        + (f", {summary['skipped']} already done" if summary.get("skipped") else "")
        + ")"
    ]
    for s in STAGES:
        st = stages[s]
        lines.append(f"  {s:<6} {st['mean_s']:8.3f} s/case  {100 * st['total_s'] / busy:5.1f} %")
    if stages["wait"]["total_s"]:
        lines.append(f"  {'wait':<6} {stages['wait']['mean_s']:8.3f} s/case  (model idle)")
    return "\n".join(lines)
