"""``mrn doctor``: versions, devices, threads and set-up checks, each problem with its fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command("doctor")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder to check for write access and free space (default: current folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for bug reports).")
@click.option("--no-qt", is_flag=True, help="Skip starting a Qt application in a child process.")
def doctor(out: Path | None, as_json: bool, no_qt: bool) -> None:
    """Check the set-up before asking for help. Exit code 1 when a check fails."""
    from mrn_engine.doctor import format_report, run_doctor

    report = run_doctor(out, try_qt=not no_qt)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))
    if not report.ok:
        sys.exit(1)


def register(group: click.Group) -> None:
    group.add_command(doctor)
