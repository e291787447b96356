"""The ``mrn`` command line: one subcommand per engine job.

Subcommands live in small modules of this package, each exposing ``register(group)``; they
import their heavy dependencies lazily so ``mrn --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from mrn_engine.errors import MRNError

#: modules of this package that add subcommands (a missing module is skipped)
SUBCOMMAND_MODULES = (
    "phantom",
    "data",
    "rois",
    "model",
    "train",
    "predict",
    "analysis",
    "segmentation",
    "demo",
    "explain",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="napari-mrn")
def cli() -> None:
    """MRN: Parkinson's disease vs healthy control from paired NM-MRI and QSM."""


def _register_all() -> None:
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue
            raise
        module.register(cli)


_register_all()


def main() -> None:
    """Console entry point: engine errors become one clear line and exit code 2."""
    # a dependency (MONAI/nnU-Net) uses torch.jit.interface, deprecated in torch 2.14: not ours
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.*", category=FutureWarning)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MRNError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
