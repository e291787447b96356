"""``mrn site-adapt``: align a bundle with a new scanner through its healthy controls."""

from __future__ import annotations

from pathlib import Path

import click

from mrn_engine.threads import set_threads


@click.command("site-adapt")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("reference", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Site adaptation file to write (.safetensors); give it to mrn predict --site-adaptation.",
)
@click.option(
    "--train-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The bundle's labelled training cases (default: the cohort bundle.json records).",
)
@click.option(
    "--all-controls",
    is_flag=True,
    help="Every case under REFERENCE is a healthy control (it has no label files).",
)
@click.option("--site", default=None, help="Site name recorded in the file (default: folder name).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, mps.")
@click.option(
    "--threads", type=int, help="torch CPU threads (default: the cores not busy, one left free)."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def site_adapt_cmd(
    bundle: Path,
    reference: Path,
    out: Path,
    train_root: Path | None,
    all_controls: bool,
    site: str | None,
    device: str,
    threads: int | None,
    quiet: bool,
) -> None:
    """Fit BUNDLE's site harmonisation on the healthy controls of a new scanner (REFERENCE).

    The patient vectors of REFERENCE's controls are shifted, fold by fold, onto those of the
    controls the bundle trained on; PD cases of the new site are never needed, so its PD share
    does not matter. Use at least 10 controls scanned with the protocol of the cases to
    predict. Nothing is written but OUT.
    """
    from tqdm import tqdm

    from mrn_engine.inference.site_adaptation import shift_norms
    from mrn_engine.workflows.site_adaptation import fit_site

    if out.suffix != ".safetensors":
        raise click.BadParameter(f"{out}: give a .safetensors file name", param_hint="--out")
    set_threads(threads)
    bar = None if quiet else tqdm(total=1000, desc="patient vectors", unit="‰")

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = int(fraction * 1000)
            bar.set_postfix_str(message, refresh=True)

    try:
        adaptation = fit_site(
            bundle,
            reference,
            train_root=train_root,
            all_controls=all_controls,
            site=site,
            device=device,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    adaptation.save(out)
    norms = ", ".join(f"fold {k} |shift| {v:.3f}" for k, v in shift_norms(adaptation).items())
    click.echo(
        f"site {adaptation.site}: {adaptation.info['n_site_controls']} reference controls; "
        f"{norms} -> {out}"
    )
    p = adaptation.info.get("site_controls_p_pd")
    if p:
        click.echo(
            f"the site's controls: mean P(PD) {p['as_trained']:.3f} as trained -> "
            f"{p['adapted']:.3f} adapted; called PD {p['called_pd_as_trained']:.0%} -> "
            f"{p['called_pd_adapted']:.0%}"
        )
    if p and "called_pd_leave_one_out" in p:
        reference = p.get("training_oof_controls_called_pd")
        click.echo(
            f"each control left out of the fit and then scored: called PD "
            f"{p['called_pd_leave_one_out']:.0%} (mean P(PD) {p['adapted_leave_one_out']:.3f})"
            + (
                f"; the training site's own controls, out of fold: {reference:.0%}"
                if reference is not None
                else ""
            )
        )


def register(group: click.Group) -> None:
    """Add ``site-adapt`` to the ``mrn`` group."""
    group.add_command(site_adapt_cmd)
