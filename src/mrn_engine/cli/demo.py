"""``mrn demo``: synthetic cohort -> cpu-tiny k-fold ensemble -> held-out score, masking, report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from mrn_engine.threads import set_threads


@click.command("demo")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the cohorts, the model bundle (OUT/bundle) and the report.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Smoke run: tiny cohort, 1 AnatCL epoch, 2 folds, 1+1 epochs (does not learn).",
)
@click.option("--cases", type=int, help="Labelled phantom cases.")
@click.option("--heldout", type=int, help="Held-out phantom cases.")
@click.option("--folds", type=int, help="CV folds.")
@click.option("--epochs", type=int, help="Full-loss epochs.")
@click.option("--pretrain-epochs", type=int, help="Pretraining epochs (seg + contrastive).")
@click.option(
    "--anatcl-epochs",
    type=int,
    help="AnatCL pretraining epochs of the ViT on the labelled + unlabelled images (0: random init).",
)
@click.option("--seed", default=1, show_default=True, type=int)
@click.option(
    "--workers", default=2, show_default=True, type=int, help="Processes for the phantom generator."
)
@click.option(
    "--threads",
    type=int,
    help="torch CPU threads (default: the cores not already busy, one left free).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(
    out: Path,
    quick: bool,
    cases,
    heldout,
    folds,
    epochs,
    pretrain_epochs,
    anatcl_epochs,
    seed: int,
    workers: int,
    threads: int | None,
    quiet: bool,
) -> None:
    """Run the whole MRN job on a built-in synthetic (phantom) cohort, on CPU."""
    from mrn_engine.workflows.demo import DEFAULT, QUICK, run_demo

    set_threads(threads)
    size = QUICK if quick else DEFAULT
    changes = {
        k: v
        for k, v in {
            "cases": cases,
            "heldout": heldout,
            "folds": folds,
            "epochs": epochs,
            "pretrain_epochs": pretrain_epochs,
            "anatcl_epochs": anatcl_epochs,
        }.items()
        if v is not None
    }
    run_demo(
        out,
        size=replace(size, **changes),
        seed=seed,
        workers=workers,
        progress=not quiet,
        log=click.echo,
    )


def register(group: click.Group) -> None:
    """Add ``demo`` to the ``mrn`` group."""
    group.add_command(demo_cmd)
