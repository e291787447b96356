"""``mrn pretrain``: anatomy-aware (AnatCL) pretraining of a preset's backbone (no labels read)."""

from __future__ import annotations

from pathlib import Path

import click

from mrn_engine.threads import set_threads


@click.command("pretrain")
@click.argument(
    "cases_roots",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Weights file to write (.safetensors); its card goes beside it (.card.json).",
)
@click.option("--preset", default="cpu-tiny", show_default=True, help="paper-vitb, vits, cpu-tiny.")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A config.json (RunConfig) instead of the preset.",
)
@click.option(
    "--arch",
    type=click.Choice(["vit", "anatcl3d"]),
    default="vit",
    show_default=True,
    help="vit: the preset's DINOv2 slice backbone; anatcl3d: AnatCL's 3D ResNet-18.",
)
@click.option(
    "--variant",
    type=click.Choice(["global", "local", "roi"]),
    default=None,
    help="AnatCL kernel on all descriptors (global), one per nucleus, losses averaged (local), "
    "or one projection per ROI with the kernel of its own nuclei (roi).  [default: roi for "
    "vit, global for anatcl3d]",
)
@click.option(
    "--init-weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Start the ViT from these weights (e.g. DINOv2 .safetensors) instead of random init.",
)
@click.option("--sigma", type=float, default=0.5, show_default=True, help="RBF width (cohort SDs).")
@click.option("--temperature", type=float, default=0.1, show_default=True)
@click.option(
    "--augment",
    type=click.Choice(["geometric", "full"]),
    default="geometric",
    show_default=True,
    help="Views: rotation + mild noise (keeps the contrasts the weak labels measure), or the "
    "full training augmentation (intensity and scanner transforms too).",
)
@click.option(
    "--distill",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of a DINO self-distillation term beside AnatCL's loss (0: off; "
    "docs/pretraining.md measures it).",
)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, mps.")
@click.option(
    "--threads", type=int, help="torch CPU threads (default: the cores not busy, one left free)."
)
@click.option(
    "--ages",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with header case_id,age: adds age as a descriptor (unknown ages = cohort mean).",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="ROI cache folder (default: beside OUT, roi_cache/).",
)
@click.option("--resume", is_flag=True, help="Continue from the last epoch checkpoint.")
@click.option("--stop-after", type=int, help="Stop after this epoch (continue with --resume).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def pretrain_cmd(
    cases_roots: tuple[Path, ...],
    out: Path,
    preset: str,
    config: Path | None,
    arch: str,
    variant: str | None,
    init_weights: Path | None,
    sigma: float,
    temperature: float,
    augment: str,
    distill: float,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    threads: int | None,
    ages: Path | None,
    cache: Path | None,
    resume: bool,
    stop_after: int | None,
    quiet: bool,
) -> None:
    """Pretrain the backbone of a preset on the cases of CASES_ROOTS with AnatCL's
    anatomy-aware contrastive loss; weak labels are nucleus volumes, contrasts and
    asymmetries from each case's masks (diagnosis labels are not read). Use the result
    with ``mrn train --weights OUT``."""
    from mrn_engine.config import RunConfig, get_preset
    from mrn_engine.pretraining.cohort import read_ages
    from mrn_engine.pretraining.loop import PretrainOptions, card_path, pretrain

    set_threads(threads)
    if out.suffix != ".safetensors":
        raise click.BadParameter(
            f"{out}: the weights file must end in .safetensors", param_hint="--out"
        )
    cfg = RunConfig.load(config) if config is not None else get_preset(preset)
    if init_weights is not None:
        cfg = cfg.replace(model={"backbone_weights": str(init_weights)})
    opts = PretrainOptions(
        arch=arch,
        variant=variant or "",
        sigma=sigma,
        temperature=temperature,
        augment=augment,
        distill=distill,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
    )
    card = pretrain(
        cases_roots,
        out,
        cfg,
        opts,
        cache_dir=cache,
        ages=read_ages(ages) if ages else None,
        resume=resume,
        stop_after=stop_after,
        progress=not quiet,
    )
    curve = card["loss_curve"]
    if not card["finished"]:
        click.echo(f"stopped after epoch {card['epochs_done']} of {epochs} (use --resume)")
        return
    click.echo(
        f"loss {curve[0]['loss']:.4f} -> {curve[-1]['loss']:.4f} over {len(curve)} epochs, "
        f"{card['data']['n_cases']} cases"
    )
    click.echo(f"weights: {out}\ncard: {card_path(out)}")
    if card["collapsed"]:
        click.echo(  # the last line the user reads; the warning above has the figures
            f"COLLAPSED: the loss ended {curve[-1]['loss']:.3f}, not below the collapsed value "
            f"{curve[-1]['uniform']:.3f}; these weights did not learn",
            err=True,
        )


def register(group: click.Group) -> None:
    """Add ``pretrain`` to the ``mrn`` group."""
    group.add_command(pretrain_cmd)
