"""``mrn bench model``: parameters, latency and peak memory of a preset's network."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("bench")
def bench_group() -> None:
    """Measure the engine's components."""


@bench_group.command("model")
@click.option(
    "--preset", default="cpu-tiny", show_default=True, help="paper-vitb, vits or cpu-tiny."
)
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A config.json instead of a preset.",
)
@click.option(
    "--arch", type=click.Choice(["mrn", "seres10"]), default=None, help="Override model.arch."
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--batch", default=4, show_default=True, help="Batch size of the training step.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per figure (median).")
@click.option(
    "--threads",
    default=None,
    type=int,
    help="torch intra-op threads on CPU (default: the cores not already busy).",
)
@click.option("--no-train", is_flag=True, help="Skip the training-step measurement.")
@click.option(
    "--parts",
    default="forward,dinov2,masking,explain,train,flops",
    show_default=True,
    help="Comma-separated measurements to run.",
)
@click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the figures as JSON.",
)
def bench_model_cmd(
    preset: str,
    config_path: Path | None,
    arch: str | None,
    device: str,
    batch: int,
    repeats: int,
    threads: int | None,
    no_train: bool,
    parts: str,
    json_path: Path | None,
) -> None:
    """Parameters, forward latency / peak memory (one patient), training step (batch B),
    MRN / bare-DINOv2 ratio, 16-subset masking / forward and explain (per-slice evidence) /
    forward ratios, on random weights."""
    import torch

    from mrn_engine.config import RunConfig, atomic_write_text, get_preset
    from mrn_engine.models.bench import bench_model, format_result

    cfg = RunConfig.load(config_path) if config_path else get_preset(preset)
    if arch:
        cfg = cfg.replace(model={"arch": arch})
    if threads:
        torch.set_num_threads(threads)
    result = bench_model(
        cfg,
        device,
        repeats=repeats,
        batch=batch,
        train=not no_train,
        parts=tuple(p.strip() for p in parts.split(",") if p.strip()),
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(format_result(result))
    if json_path:
        atomic_write_text(json_path, json.dumps(result, indent=2))


def register(group: click.Group) -> None:
    """Add ``bench model`` to the ``mrn`` group (the ``bench`` group is created if absent)."""
    existing = group.commands.get("bench")
    if isinstance(existing, click.Group):
        existing.add_command(bench_model_cmd)
    else:
        group.add_command(bench_group)
