"""``mrn calibrate`` (calibration of an existing bundle) and ``mrn explain``
(per-slice evidence maps of case folders)."""

from __future__ import annotations

from pathlib import Path

import click

from mrn_engine.cli.predict import build_predictor, predictor_options


@click.command("calibrate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["auto", "identity", "temperature", "platt", "isotonic", "fold-temperature"]),
    default=None,
    help="Map fitted on the pooled out-of-fold predictions [default: temperature] (auto: the "
    "lowest cross-fitted log loss); "
    "fold-temperature: one temperature per fold on its own cases (the older scheme).",
)
@click.option(
    "--unlabeled",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of cases the bundle never trained on (labels not needed, >= 10 cases): "
    "measure how far the fold models agree and sharpen the ensemble P(PD) accordingly "
    "(BUNDLE/ensemble_calibration.json), and refit the pooled map with each fold's logits on "
    "the common scale these cases measure (docs/explain.md).",
)
@click.option(
    "--reference-cases",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The labelled cohort the bundle was trained on: also write each fold's healthy "
    "reference slice tokens (fold_k/reference_slices.safetensors, the baseline of per-slice "
    "evidence; `mrn train` writes them itself since 2026-12-01).",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
def calibrate_cmd(
    bundle: Path,
    method: str | None,
    unlabeled: Path | None,
    reference_cases: Path | None,
    device: str,
) -> None:
    """Fit the calibration of P(PD) on BUNDLE/fold_k/oof.csv and write fold_k/calibration.json.

    ``mrn train`` does this when the last fold finishes; use it for older bundles or another
    method. Refits and overwrites existing calibration files; weights are not touched. With
    ``--unlabeled``, also the ensemble calibration (the fold models' agreement on unseen cases).
    """
    from mrn_engine.training.calibration import load_calibrations
    from mrn_engine.training.calibration_pooled import calibrate_bundle

    cals = calibrate_bundle(bundle, method)
    if reference_cases is not None:
        from mrn_engine.workflows.reference_slices import fit_bundle_reference

        used = fit_bundle_reference(bundle, reference_cases, device=device)
        counts = ", ".join(f"fold {k}: {n}" for k, n in used.items())
        click.echo(f"healthy reference slice tokens written ({counts} training controls)")
    if unlabeled is not None:
        from tqdm.auto import tqdm

        from mrn_engine.workflows.ensemble_calibration import calibrate_ensemble

        with tqdm(desc="unseen cases", unit="case") as bar:
            ens = calibrate_ensemble(
                bundle, unlabeled, device=device, method=method, on_case=lambda _: bar.update()
            )
        k = len(ens.folds)
        click.echo(
            f"ensemble: fold logits correlate at rho = {ens.rho_measured:.3f} on {ens.n_cases} "
            f"unseen cases; the {k}-fold ensemble logit is multiplied by {ens.factor(k):.2f} "
            f"({bundle / 'ensemble_calibration.json'})"
        )
        cals = load_calibrations(bundle, sorted(cals))  # refitted on the common logit scale
    _echo_calibrations(cals)


def _echo_calibrations(cals: dict) -> None:
    """One line per fold map (one for a pooled map) and the cross-fitted candidate table."""
    for k, cal in cals.items():
        what = {
            "temperature": f"T = {cal.temperature:.3f}",
            "platt": f"slope {1 / cal.temperature:.3f}, intercept {cal.intercept:.3f}",
            "isotonic": f"{len(cal.knots_x)} knots",
        }.get(cal.method, "")
        who = f"folds {sorted(cals)}" if cal.scope == "pooled" else f"fold {k}"
        click.echo(
            f"{who}: {cal.method} ({what}) on {cal.n_cases} {cal.scope} cases; "
            f"ECE ({cal.n_bins} bins) {cal.ece_before:.3f} -> {cal.ece_after:.3f}, "
            f"Brier {cal.brier_before:.3f} -> {cal.brier_after:.3f} (in-sample)"
        )
        if cal.note:
            click.echo(f"  {cal.note}")
        if cal.scope == "pooled":
            break  # the same map for every fold
    first = next(iter(cals.values()))
    for m, row in first.selection.items():
        loss = row.get("logloss_crossfit")
        click.echo(
            f"  cross-fitted on the out-of-fold cases: {m:11s} "
            + (f"log loss {loss:.4f}  " if loss is not None else "")
            + f"ECE {row['ece_crossfit']:.3f}  Brier {row['brier_crossfit']:.3f}"
        )


@click.command("explain")
@predictor_options("Output folder: OUT/<case>/evidence_*.nii.gz, summary.png; explain.json.")
@click.option(
    "--mask",
    "masked",
    multiple=True,
    help="ROI to replace by an empty volume (repeatable): evidence under that ROI toggle.",
)
def explain_cmd(
    cases_dir: Path,
    model: Path,
    out: Path,
    folds: str | None,
    tta: bool,
    device: str,
    ignore_masks: bool,
    site_adaptation: Path | None,
    quiet: bool,
    masked: tuple[str, ...],
) -> None:
    """Per-slice evidence of every case under CASES_DIR (ROOT): which slices moved P(PD).

    For each ROI slice, the change of P(PD) when that slice's token is replaced by the
    bundle's healthy reference (or, for bundles without one, left out of SFA; no new backbone
    pass), and SFA's attention over the slices; maps as NIfTI on the source grids.
    """
    from mrn_engine.inference.explain import explain_cases

    predictor = build_predictor(
        model, folds, tta, device, ignore_masks, site_adaptation=site_adaptation
    )
    if not predictor.calibrated:
        click.echo(f"{model}: bundle is uncalibrated (no calibration.json); P(PD) is raw", err=True)
    if not predictor.reference_slices:
        click.echo(
            f"{model}: no healthy reference slice tokens; evidence leaves each slice out of SFA "
            "instead (add them: mrn calibrate BUNDLE --reference-cases ROOT)",
            err=True,
        )

    def on_case(case_id: str, i: int, n: int) -> None:
        if not quiet:
            click.echo(f"[{i + 1}/{n}] {case_id}", err=True)

    data = explain_cases(predictor, cases_dir, out, masked=masked, on_case=on_case)
    for err in data["errors"]:
        click.echo(f"skipped {err['error']}", err=True)
    click.echo(f"{len(data['cases'])} case(s) explained -> {out}")
    if data["errors"]:
        click.echo(f"{len(data['errors'])} case(s) failed (see {out / 'explain.json'})")


def register(group: click.Group) -> None:
    group.add_command(calibrate_cmd)
    group.add_command(explain_cmd)
