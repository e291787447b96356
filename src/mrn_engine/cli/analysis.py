"""``mrn ablate-rois`` (ROI masking table, paper Table 4) and ``mrn report`` (HTML run report)."""

from __future__ import annotations

from pathlib import Path

import click

from mrn_engine.cli.predict import build_predictor, predictor_options


@click.command("ablate-rois")
@predictor_options("Output folder for the tables (CSV + markdown).")
def ablate_rois_cmd(
    cases_dir: Path,
    model: Path,
    out: Path,
    folds: str | None,
    tta: bool,
    device: str,
    ignore_masks: bool,
    site_adaptation: Path | None,
    quiet: bool,
) -> None:
    """ROI masking analysis on labelled cases: no masking + the 15 masked ROI subsets."""
    from mrn_engine.workflows import masking_markdown, run_masking_analysis

    predictor = build_predictor(
        model, folds, tta, device, ignore_masks, site_adaptation=site_adaptation
    )
    result = run_masking_analysis(predictor, cases_dir, out, progress=not quiet)
    click.echo(masking_markdown(result.masking))
    click.echo(f"tables written to {out}")
    if result.errors:
        click.echo(f"{len(result.errors)} case(s) failed (see {out / 'errors.json'})", err=True)


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file (default: RUN_DIR/report.html).",
)
@click.option(
    "--eval",
    "eval_csv",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Held-out predictions.csv (default: RUN_DIR/ablation/predictions.csv if present).",
)
@click.option(
    "--masking",
    "masking_csv",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="masking_table.csv (default: RUN_DIR/ablation/masking_table.csv if present).",
)
def report_cmd(
    run_dir: Path, out: Path | None, eval_csv: Path | None, masking_csv: Path | None
) -> None:
    """Self-contained HTML report of a run: ROC, confusion matrix, masking heatmap, losses, config."""
    from mrn_engine.analysis import write_report

    path = write_report(
        run_dir,
        out or run_dir / "report.html",
        eval_predictions=eval_csv,
        masking_table=masking_csv,
    )
    click.echo(f"report written to {path}")


def register(group: click.Group) -> None:
    """Add ``ablate-rois`` and ``report`` to the ``mrn`` group."""
    group.add_command(ablate_rois_cmd)
    group.add_command(report_cmd)
