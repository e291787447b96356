"""``mrn cases ROOT``: the case table of a challenge-format folder, validation and duplicates."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import click


def _yn(flag: bool) -> str:
    return "x" if flag else "."


@click.command("cases")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Load and validate every case (grids, NaN/Inf, mask labels, ROI labels).",
)
@click.option(
    "--csv",
    "csv_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the case table to this CSV file.",
)
@click.option(
    "--stats",
    is_flag=True,
    help="Also per case and ROI: box, nucleus slices kept/dropped, mapped intensities in the "
    "nuclei, outliers (docs/data.md); writes a table, a CSV and a figure to --stats-out.",
)
@click.option(
    "--stats-out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for --stats (default ./<ROOT name>_stats).",
)
@click.option(
    "--preset",
    default="cpu-tiny",
    show_default=True,
    help="Configuration whose ROI settings --stats uses (cpu-tiny, paper-vitb, vits).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cases_cmd(
    root: Path,
    check: bool,
    csv_out: Path | None,
    stats: bool,
    stats_out: Path | None,
    preset: str,
    quiet: bool,
) -> None:
    """List the cases under ROOT (recursive): files present, label, split; validate them."""
    import numpy as np
    from tqdm import tqdm

    from mrn_engine.config import atomic_write_text
    from mrn_engine.data import case_table, check_duplicates, discover_cases, load_case
    from mrn_engine.data.labels import ROIS
    from mrn_engine.errors import InputDataError, MRNWarning
    from mrn_engine.rois import check_roi_labels

    rows = case_table(root)
    if not rows:
        raise InputDataError(f"{root}: no case folders found (RJPD_xxx or folders with NM/QSM)")
    files = {c.case_id: c for c in discover_cases(root)}
    problems: dict[str, str] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MRNWarning)
        if check:
            for row in tqdm(rows, desc="validating", unit="case", disable=quiet):
                cf = files[row["case_id"]]
                try:
                    case = load_case(cf)
                    for spec in ROIS:
                        m = case.nm_mask if spec.modality == "NM" else case.qsm_mask
                        if m is not None:
                            check_roi_labels(
                                np.bincount(m.array.ravel(order="K"), minlength=256),
                                spec,
                                m.name,
                                strict=True,
                            )
                except InputDataError as e:
                    problems[row["case_id"]] = str(e)
        dups = check_duplicates(list(files.values()))
    head = f"{'case':<12} {'label':<5} {'split':<5} NM QSM T1 NMm QSMm  status"
    click.echo(head)
    click.echo("-" * len(head))
    for r in rows:
        lab = {0: "HC", 1: "PD"}.get(r["label"], "-")
        status = ("ERROR" if r["case_id"] in problems else "ok") if check else "-"
        click.echo(
            f"{r['case_id']:<12} {lab:<5} {r['split'] or '-':<5} {_yn(r['NM']):>2} {_yn(r['QSM']):>3} "
            f"{_yn(r['T1']):>2} {_yn(r['NM_mask']):>3} {_yn(r['QSM_mask']):>4}  {status}"
        )
    n = len(rows)
    n_lab = sum(r["label"] is not None for r in rows)
    n_pd = sum(r["label"] == 1 for r in rows)
    n_masks = sum(r["NM_mask"] and r["QSM_mask"] for r in rows)
    click.echo(
        f"\n{n} case(s): {n_lab} labelled ({n_pd} PD, {n_lab - n_pd} HC), {n_masks} with both masks, "
        f"{sum(r['T1'] for r in rows)} with T1"
    )
    if check:
        click.echo(f"validation: {n - len(problems)} ok, {len(problems)} with errors")
        for cid, msg in problems.items():
            click.echo(f"  {cid}: {msg}", err=True)
    else:
        click.echo("validation: skipped (--no-check)")
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    click.echo(
        f"duplicates (identical NM bytes): {len(dups)} pair(s)"
        + "".join(f"\n  {a} == {b}" for a, b in dups)
    )
    if csv_out is not None:
        buf = io.StringIO()
        fields = [
            "case_id",
            "label",
            "split",
            "NM",
            "QSM",
            "T1",
            "NM_mask",
            "QSM_mask",
            "folder",
            "status",
        ]
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            status = problems.get(r["case_id"], "ok") if check else ""
            w.writerow({**r, "status": status})
        atomic_write_text(csv_out, buf.getvalue())
        click.echo(f"table -> {csv_out}")
    if stats:
        _stats(root, stats_out or Path(f"{root.resolve().name}_stats"), preset, quiet)
    if problems:
        raise SystemExit(2)


def _stats(root: Path, out: Path, preset: str, quiet: bool) -> None:
    """``--stats``: per-case ROI statistics and outliers (``mrn_engine.rois.stats``)."""
    from mrn_engine.config import get_preset
    from mrn_engine.rois.stats import cohort_stats, stats_table, write_stats

    cfg = get_preset(preset).roi
    rows = cohort_stats(root, cfg, progress=not quiet)
    click.echo("\n" + stats_table(rows))
    paths = write_stats(rows, out, title=f"{root.resolve().name} ({preset}, {cfg.intensity})")
    flagged = sorted({r["case_id"] for r in rows if r.get("flags")})
    click.echo(
        f"\nstats: {len(flagged)} case(s) flagged{': ' + ', '.join(flagged) if flagged else ''}\n"
        f"table -> {paths['table']}\ncsv -> {paths['csv']}\nfigure -> {paths['figure']}"
    )


def register(group: click.Group) -> None:
    """Add ``cases`` to the ``mrn`` group."""
    group.add_command(cases_cmd)
