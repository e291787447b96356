"""The ``mrn`` command line: one subcommand per engine job.

Subcommands live in small modules of this package, each exposing ``register(group)``; they
import their heavy dependencies lazily so ``mrn --help`` stays fast.
"""

from __future__ import annotations

import errno
import importlib
import sys
import warnings

import click

from mrn_engine.errors import MRNError, MRNWarning
from mrn_engine.threads import apply_default_threads

#: modules of this package that add subcommands (a missing module is skipped)
SUBCOMMAND_MODULES = (
    "phantom",
    "data",
    "rois",
    "model",
    "train",
    "pretrain",
    "predict",
    "site",
    "analysis",
    "segmentation",
    "demo",
    "doctor",
    "explain",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="napari-mrn")
def cli() -> None:
    """MRN: Parkinson's disease vs healthy control from paired NM-MRI and QSM.

    CPU threads: unless OMP_NUM_THREADS or a command's --threads says otherwise, the cores
    not already busy on this machine (1-minute load average), so a shared machine is not
    oversubscribed.
    """
    apply_default_threads()


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
    # our warnings name the file and the problem: print them as one line, not as source code
    plain = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: (
        f"warning: {message}\n"
        if issubclass(category, MRNWarning)
        else plain(message, category, *a, **k)
    )
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
    except OSError as e:  # disk full, permissions: the file and the reason, no traceback
        where = f"{e.filename}: " if e.filename else ""
        name = errno.errorcode.get(e.errno or 0, "")
        click.echo(f"Error: {where}{e.strerror or e}{f' ({name})' if name else ''}", err=True)
        sys.exit(2)
    except MemoryError:
        click.echo(
            "Error: out of memory (an input or a setting is far larger than expected)", err=True
        )
        sys.exit(2)
