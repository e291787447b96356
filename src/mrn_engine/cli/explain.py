"""``mrn calibrate`` (per-fold temperature of an existing bundle) and ``mrn explain``
(per-slice evidence maps of case folders)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("calibrate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
def calibrate_cmd(bundle: Path) -> None:
    """Fit one temperature per fold on BUNDLE/fold_k/oof.csv and write fold_k/calibration.json.

    For bundles trained before calibration existed (``mrn train`` now does it at the end of
    each fold). Refits and overwrites existing calibration files; weights are not touched.
    """
    from mrn_engine.training.calibration import calibrate_bundle

    for k, cal in calibrate_bundle(bundle).items():
        what = f"T = {cal.temperature:.3f}" if cal.method == "temperature" else cal.note
        click.echo(
            f"fold {k}: {cal.method} ({what}) on {cal.n_cases} cases; "
            f"ECE {cal.ece_before:.3f} -> {cal.ece_after:.3f}, "
            f"Brier {cal.brier_before:.3f} -> {cal.brier_after:.3f} (in-sample)"
        )


def register(group: click.Group) -> None:
    group.add_command(calibrate_cmd)
