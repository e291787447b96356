"""``mrn train`` (k-fold ensemble into a model bundle) and ``mrn compare`` (baselines).

``mrn train`` also runs under ``torchrun`` (DistributedDataParallel, one process per device;
docs/training.md "Distributed training"): ``torchrun --nproc_per_node N -m mrn_engine.cli train ...``.
"""

from __future__ import annotations

from pathlib import Path

import click

from mrn_engine.threads import set_threads


def _folds(values: tuple[int, ...]) -> list[int] | None:
    return sorted(set(values)) if values else None


def build_config(
    preset: str, config: Path | None, overrides: dict, model_overrides: dict | None = None
):
    """A RunConfig from ``--config`` (or the preset) with the command-line overrides applied."""
    from mrn_engine.config import RunConfig, get_preset

    cfg = RunConfig.load(config) if config is not None else get_preset(preset)
    train = {k: v for k, v in overrides.items() if v is not None}
    model = {k: v for k, v in (model_overrides or {}).items() if v is not None}
    return cfg.replace(train=train, model=model)


_common = [
    click.option(
        "--preset",
        default="cpu-tiny",
        show_default=True,
        help="Named configuration: paper-vitb, vits, cpu-tiny.",
    ),
    click.option(
        "--config",
        "config",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A config.json (RunConfig) instead of the preset.",
    ),
    click.option(
        "--folds", "n_folds", type=int, help="Number of CV folds (default from the config)."
    ),
    click.option("--epochs", type=int, help="Full-loss epochs."),
    click.option(
        "--pretrain-epochs", type=int, help="Segmentation + contrastive pretraining epochs."
    ),
    click.option("--batch-size", type=int),
    click.option("--lr-backbone", type=float),
    click.option("--lr-head", type=float),
    click.option("--seed", type=int, help="Training seed."),
    click.option("--device", default=None, help="auto (CUDA if present), cpu, cuda."),
    click.option(
        "--weights",
        type=click.Path(exists=True, dir_okay=False),
        help="Local DINOv2 weights (.safetensors or Meta .pth) for the backbone.",
    ),
    click.option(
        "--threads",
        type=int,
        help="torch CPU threads (default: the cores not already busy, one left free).",
    ),
    click.option("--quiet", is_flag=True, help="No progress bars."),
]


def common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


def _overrides(
    n_folds, epochs, pretrain_epochs, batch_size, lr_backbone, lr_head, seed, device
) -> dict:
    return {
        "folds": n_folds,
        "epochs": epochs,
        "pretrain_epochs": pretrain_epochs,
        "batch_size": batch_size,
        "lr_backbone": lr_backbone,
        "lr_head": lr_head,
        "seed": seed,
        "device": device,
    }


@click.command("train")
@click.argument("cases_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Model bundle folder to create (or resume).",
)
@click.option(
    "--fold",
    "fold",
    type=int,
    multiple=True,
    help="Train only this fold (repeatable); run folds in parallel processes.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="ROI cache folder (default: OUT/../roi_cache).",
)
@click.option("--resume", is_flag=True, help="Continue killed folds from their last checkpoint.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Discard an earlier run in OUT (fold folders, checkpoints) and start from epoch 1.",
)
@click.option("--stop-after", type=int, help="Stop each fold after this epoch (resume later).")
@common
def train_cmd(
    cases_root: Path,
    out: Path,
    fold: tuple[int, ...],
    cache: Path | None,
    resume: bool,
    overwrite: bool,
    stop_after: int | None,
    preset: str,
    config: Path | None,
    n_folds,
    epochs,
    pretrain_epochs,
    batch_size,
    lr_backbone,
    lr_head,
    seed,
    device,
    weights,
    threads,
    quiet: bool,
) -> None:
    """Train the k-fold MRN ensemble on the labelled cases of CASES_ROOT
    (train_cases.csv + val_cases.csv) into a model bundle.

    Under torchrun every process trains the same folds with DistributedDataParallel
    (--batch-size is the global batch; only rank 0 writes and prints)."""
    from mrn_engine.bundle import CONFIG_FILE
    from mrn_engine.training import distributed
    from mrn_engine.training.cv import train_bundle

    set_threads(threads)
    if resume and config is None and (out / CONFIG_FILE).is_file():
        config = out / CONFIG_FILE
    cfg = build_config(
        preset,
        config,
        _overrides(
            n_folds, epochs, pretrain_epochs, batch_size, lr_backbone, lr_head, seed, device
        ),
        {"backbone_weights": weights},
    )
    with distributed.session(cfg.train.device):
        results = train_bundle(
            cases_root,
            out,
            cfg,
            folds=_folds(fold),
            cache_dir=cache,
            resume=resume,
            stop_after=stop_after,
            progress=not quiet,
            overwrite=overwrite,
        )
        main, world = distributed.is_main(), distributed.world_size()
    if not main:
        return
    if world > 1:
        click.echo(f"distributed: {world} ranks (DDP), global batch {cfg.train.batch_size}")
    for r in results:
        state = "done" if r.finished else f"stopped after epoch {r.epochs_done} (use --resume)"
        last = r.metrics[-1] if r.metrics else {}
        extra = f", val acc {last['val_acc']:.3f}, val AUC {last['val_auc']:.3f}" if last else ""
        click.echo(f"fold {r.fold}: {state}{extra}")
    click.echo(f"model bundle: {out}")


@click.command("compare")
@click.argument("cases_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--variants",
    default="mrn,seres10,seres10-moco,dinov2-only",
    show_default=True,
    help="Comma-separated: mrn, seres10, seres10-moco, dinov2-only, anatcl3d (AnatCL-pretrained 3D ResNet-18).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for one bundle per variant and comparison.md / comparison.csv.",
)
@click.option(
    "--heldout",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled held-out cases to score each fold ensemble on.",
)
@click.option("--resume", is_flag=True, help="Keep finished variants/folds, continue killed ones.")
@common
def compare_cmd(
    cases_root: Path,
    variants: str,
    out: Path,
    heldout: Path | None,
    resume: bool,
    preset: str,
    config: Path | None,
    n_folds,
    epochs,
    pretrain_epochs,
    batch_size,
    lr_backbone,
    lr_head,
    seed,
    device,
    weights,
    threads,
    quiet: bool,
) -> None:
    """Train MRN and the paper's baselines on the same folds and print the comparison table."""
    from mrn_engine.workflows.compare import compare_variants, comparison_markdown

    set_threads(threads)
    cfg = build_config(
        preset,
        config,
        _overrides(
            n_folds, epochs, pretrain_epochs, batch_size, lr_backbone, lr_head, seed, device
        ),
        {"backbone_weights": weights},
    )
    names = [v.strip() for v in variants.split(",") if v.strip()]
    rows = compare_variants(
        cases_root, out, cfg, names, heldout_root=heldout, resume=resume, progress=not quiet
    )
    click.echo(comparison_markdown(rows))
    click.echo(f"tables: {out / 'comparison.md'}, {out / 'comparison.csv'}")


def register(group: click.Group) -> None:
    """Add ``train`` and ``compare`` to the ``mrn`` group."""
    group.add_command(train_cmd)
    group.add_command(compare_cmd)
