"""``mrn phantom``: generate the atlas-driven synthetic cohort (or its figure)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("phantom")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Cohort folder.")
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=2),
    default=300,
    show_default=True,
    help="Number of cases (balanced PD/HC).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Cohort seed.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Parallel worker processes.",
)
@click.option(
    "--effect",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="Scale of all class differences (1 = oracle ceiling about 0.90).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=1 / 3,
    show_default=True,
    help="Share of cases in val_cases.csv.",
)
@click.option(
    "--figure",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the PD-vs-HC figure (PNG) here instead of / besides a cohort.",
)
@click.option(
    "--site",
    default="A",
    show_default=True,
    help="Simulated scanner site(s): A, B, C, D, or several (A,B,C) spread evenly over the "
    "cases. Sites differ in NM gain/offset, bias field, noise and NM contrast, and QSM noise "
    "and unit (docs/phantom.md); the oracle is the same.",
)
@click.option(
    "--geometry",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder of real subjects' nuclei masks (QSM_pred/NM_pred or *_mask.nii.gz per "
    "subject folder): the cases' nuclei are those, randomly deformed.",
)
@click.option(
    "--nuclei",
    type=click.Choice(["challenge", "atlas"]),
    default="atlas",
    show_default=True,
    help="Without --geometry: 'atlas' keeps the atlas's nuclei whole (up to 3x the volume of "
    "the challenge's own masks); 'challenge' erodes them to per-subject volumes about those "
    "of the challenge's masks (docs/phantom.md).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def phantom(
    out: Path | None,
    n: int,
    seed: int,
    workers: int,
    effect: float,
    val_fraction: float,
    figure: Path | None,
    site: str,
    geometry: Path | None,
    nuclei: str,
    quiet: bool,
) -> None:
    """Synthetic PD/HC cohort in the PDCADxFoundation layout (NM, QSM, T1, masks, CSVs)."""
    from mrn_engine.phantom import generate_cohort, plot_pd_hc

    if out is None and figure is None:
        raise click.UsageError("give --out DIR (a cohort) and/or --figure PATH")
    if figure is not None:
        path = plot_pd_hc(figure, effect=effect)
        click.echo(f"figure: {path}")
    if out is None:
        return
    s = generate_cohort(
        out,
        n=n,
        seed=seed,
        workers=workers,
        val_fraction=val_fraction,
        progress=not quiet,
        effect=effect,
        site=site,
        geometry=geometry,
        nuclei=nuclei,
    )
    o = s["oracle"]
    click.echo(
        f"cohort: {s['root']}\n"
        f"cases: {s['n_cases']} ({s['generated']} generated, {s['skipped']} already complete)\n"
        f"classes: {s['n_pd']} PD / {s['n_hc']} HC; train {s['n_train']}, val {s['n_val']}\n"
        f"sites: {', '.join(f'{k} {v}' for k, v in s['sites'].items())}"
        f"{'; real nuclei of ' + ', '.join(s['geometry']) if s['geometry'] else ''}"
        f"{'; nuclei: ' + s['nuclei'] if s['nuclei'] else ''}\n"
        f"oracle ceiling: {o['accuracy_analytic']:.3f} analytic, "
        f"{o['accuracy_monte_carlo']:.3f} Monte Carlo, {o['accuracy_empirical']:.3f} on these cases\n"
        f"time: {s['seconds']:.1f} s with {s['workers']} worker(s)"
    )


def register(group: click.Group) -> None:
    """Add ``phantom`` to the ``mrn`` command group."""
    group.add_command(phantom)
