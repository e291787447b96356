"""``mrn bench model|seg|io``: a preset's network, the mask-free segmentation, phantom I/O."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mrn_engine.config import atomic_write_text
from mrn_engine.segmentation.settings import BENCH_SETTINGS as DEFAULT_SEG_SETTINGS
from mrn_engine.threads import set_threads

#: ``--json PATH`` of every bench command
json_option = click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the figures as JSON.",
)
#: ``--threads N`` of the bench commands that do not pick a default themselves
threads_option = click.option(
    "--threads", default=None, type=int, help="torch intra-op threads on CPU."
)


def write_json(path: Path | None, result: dict) -> None:
    """Write a bench's figures to ``path`` (atomically) when one was given."""
    if path:
        atomic_write_text(path, json.dumps(result, indent=2))


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
    help="torch intra-op threads on CPU (default: the cores not already busy, one left free).",
)
@click.option("--no-train", is_flag=True, help="Skip the training-step measurement.")
@click.option(
    "--parts",
    default="forward,dinov2,masking,explain,train,flops",
    show_default=True,
    help="Comma-separated measurements to run.",
)
@json_option
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

    from mrn_engine.config import RunConfig, get_preset
    from mrn_engine.models.bench import bench_model, format_result

    cfg = RunConfig.load(config_path) if config_path else get_preset(preset)
    if arch:
        cfg = cfg.replace(model={"arch": arch})
    set_threads(threads)
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
    write_json(json_path, result)


@bench_group.command("seg")
@click.argument("cases_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--nnunet",
    "nnunet_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Bundle (or its nnunet/ folder) with the NM and QSM models.",
)
@click.option(
    "--random",
    "random_preset",
    type=click.Choice(["tiny", "full"]),
    default=None,
    help="Instead of --nnunet: random-weight models (speed only; masks meaningless).",
)
@click.option("--random-folds", default=1, show_default=True, help="Folds of --random models.")
@click.option(
    "--settings",
    default=",".join(DEFAULT_SEG_SETTINGS),
    show_default=True,
    help="Comma-separated {mirror|nomirror}-STEP-{whole|local}; the first is the reference.",
)
@click.option("--cases", "n_cases", default=2, show_default=True, help="Cases to time.")
@click.option(
    "--model",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="MRN bundle: also time the mask-free diagnosis with the last setting.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@threads_option
@json_option
def bench_seg_cmd(
    cases_dir: Path,
    nnunet_dir: Path | None,
    random_preset: str | None,
    random_folds: int,
    settings: str,
    n_cases: int,
    model: Path | None,
    device: str,
    threads: int | None,
    json_path: Path | None,
) -> None:
    """Seconds per case, tiles and Dice vs the reference of nnU-Net mask settings (mask-free
    diagnosis path) on the case folders of CASES_DIR (their mask files are not used)."""
    import tempfile

    from mrn_engine.errors import ConfigError
    from mrn_engine.segmentation.bench import bench_segmentation, format_result, random_nnunet

    if (nnunet_dir is None) == (random_preset is None):
        raise ConfigError("give exactly one of --nnunet DIR and --random tiny|full")
    set_threads(threads)

    def diagnose(seg):
        from mrn_engine.inference import MRNPredictor

        mrn = MRNPredictor.from_bundle(model, device=device, segmenter=seg, ignore_masks=True)
        return mrn.predict_case

    with tempfile.TemporaryDirectory(prefix="mrn_bench_seg_") as tmp:
        if random_preset:
            nnunet_dir = random_nnunet(tmp, random_preset, tuple(range(random_folds)))
        result = bench_segmentation(
            nnunet_dir,
            cases_dir,
            settings=[s for s in settings.split(",") if s.strip()],
            n_cases=n_cases,
            device=device,
            diagnose=diagnose if model else None,
            log=lambda m: click.echo(m, err=True),
        )
    result["random_weights"] = random_preset
    click.echo(format_result(result))
    write_json(json_path, result)


@bench_group.command("io")
@click.option("--cases", "n_cases", default=3, show_default=True, help="Phantom cases to time.")
@click.option("--seed", default=0, show_default=True, help="Seed of the phantom cases.")
@click.option("--preset", default="cpu-tiny", show_default=True, help="Preset whose ROIs to crop.")
@threads_option
@json_option
def bench_io_cmd(
    n_cases: int, seed: int, preset: str, threads: int | None, json_path: Path | None
) -> None:
    """Seconds per phantom case to make, write (ISA-L vs zlib), read (ISA-L vs nibabel) and
    crop into ROIs; checks both readers give the same voxels."""
    from mrn_engine.workflows.io_bench import bench_io, format_io

    set_threads(threads)
    result = bench_io(n_cases, seed=seed, preset=preset, log=lambda m: click.echo(m, err=True))
    click.echo(format_io(result))
    write_json(json_path, result)


def register(group: click.Group) -> None:
    """Add ``bench model`` / ``seg`` / ``io`` to the ``mrn`` group (``bench`` created if absent)."""
    existing = group.commands.get("bench")
    if isinstance(existing, click.Group):
        existing.add_command(bench_model_cmd)
        existing.add_command(bench_seg_cmd)
        existing.add_command(bench_io_cmd)
    else:
        group.add_command(bench_group)
