"""``mrn seg``: nnU-Net v2 nucleus segmentation (export, train, predict, evaluate)."""

from __future__ import annotations

from pathlib import Path

import click

from mrn_engine.cli.predict import trust_option

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_OUT_DIR = click.Path(file_okay=False, path_type=Path)


def _specs(nm_id: int, qsm_id: int, nm_name: str, qsm_name: str):
    from mrn_engine.segmentation.export import default_specs

    return default_specs(nm_id, qsm_id, nm_name, qsm_name)


def _dataset_options(f):
    f = click.option(
        "--qsm-name", default="PDCADxQSM", show_default=True, help="QSM dataset name."
    )(f)
    f = click.option("--nm-name", default="PDCADxNM", show_default=True, help="NM dataset name.")(f)
    f = click.option("--qsm-id", default=505, show_default=True, type=int, help="QSM dataset id.")(
        f
    )
    f = click.option("--nm-id", default=504, show_default=True, type=int, help="NM dataset id.")(f)
    return f


def _parse_folds(value: str) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for v in value.split(","):
        v = v.strip()
        if not v:
            continue
        if v == "all":
            out.append("all")
        elif v.isdigit():
            out.append(int(v))
        else:
            raise click.BadParameter(f"{value!r}: give fold indices like 0,1,2 or 'all'")
    if not out:
        raise click.BadParameter("no fold given")
    return tuple(out)


@click.group("seg")
def seg() -> None:
    """nnU-Net v2 nucleus segmentation of NM and QSM (paper 4.1.2)."""


@seg.command("export")
@click.argument("cases_dir", type=_DIR)
@click.option("--out", "out", required=True, type=_OUT_DIR, help="nnU-Net raw folder (nnUNet_raw).")
@_dataset_options
@click.option(
    "--modality", type=click.Choice(["nm", "qsm", "both"]), default="both", show_default=True
)
@click.option("--copy", "copy", is_flag=True, help="Copy files instead of hard-linking them.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_cmd(
    cases_dir: Path,
    out: Path,
    nm_id: int,
    qsm_id: int,
    nm_name: str,
    qsm_name: str,
    modality: str,
    copy: bool,
    quiet: bool,
) -> None:
    """Write the labelled cases of CASES_DIR as nnU-Net raw datasets (NM and QSM)."""
    from mrn_engine.segmentation.export import export_datasets
    from mrn_engine.segmentation.train import parse_modalities

    done = export_datasets(
        cases_dir,
        out,
        specs=_specs(nm_id, qsm_id, nm_name, qsm_name),
        modalities=parse_modalities(modality),
        link=not copy,
        progress=not quiet,
    )
    for mod, folder in done.items():
        n = len(list((folder / "labelsTr").glob("*.nii.gz")))
        click.echo(f"{mod}: {n} case(s) -> {folder}")


@seg.command("train")
@click.argument("cases_dir", type=_DIR)
@click.option(
    "--workspace",
    required=True,
    type=_OUT_DIR,
    help="Folder for nnUNet_raw / nnUNet_preprocessed / nnUNet_results.",
)
@click.option(
    "--modality", type=click.Choice(["nm", "qsm", "both"]), default="both", show_default=True
)
@click.option(
    "--config",
    "configuration",
    default="3d_fullres",
    show_default=True,
    help="nnU-Net configuration.",
)
@click.option("--folds", default="0", show_default=True, help="Comma-separated folds, or 'all'.")
@click.option("--epochs", type=int, default=None, help="Epochs (nnU-Net default 1000).")
@click.option(
    "--iters-per-epoch", type=int, default=None, help="Training iterations per epoch (default 250)."
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--tiny", is_flag=True, help="Small network and patch (CPU smoke runs).")
@click.option("--threads", type=int, default=None, help="torch CPU threads while training.")
@click.option(
    "--workers",
    type=int,
    default=0,
    show_default=True,
    help="nnU-Net worker processes (0 = run in this process).",
)
@click.option(
    "--bundle", type=_OUT_DIR, default=None, help="Copy the trained models into BUNDLE/nnunet/."
)
@_dataset_options
@click.option("--quiet", is_flag=True, help="Less output.")
def train_cmd(
    cases_dir: Path,
    workspace: Path,
    modality: str,
    configuration: str,
    folds: str,
    epochs: int | None,
    iters_per_epoch: int | None,
    device: str,
    tiny: bool,
    threads: int | None,
    workers: int,
    bundle: Path | None,
    nm_id: int,
    qsm_id: int,
    nm_name: str,
    qsm_name: str,
    quiet: bool,
) -> None:
    """Train nnU-Net NM/QSM nucleus models on the labelled cases of CASES_DIR."""
    from mrn_engine.segmentation.train import SegTrainConfig, train_segmentation

    cfg = SegTrainConfig(
        configuration=configuration,
        folds=_parse_folds(folds),
        epochs=epochs,
        iters_per_epoch=iters_per_epoch,
        device=device,
        tiny=tiny,
        threads=threads,
        num_processes=workers,
        specs=_specs(nm_id, qsm_id, nm_name, qsm_name),
    )
    done = train_segmentation(
        cases_dir, workspace, modality=modality, cfg=cfg, bundle=bundle, progress=not quiet
    )
    for mod, folder in done.items():
        click.echo(f"{mod}: model -> {folder}")


@seg.command("predict")
@click.argument("cases_dir", type=_DIR)
@click.option("--model", "model", required=True, type=_DIR, help="Bundle (or its nnunet/ folder).")
@click.option(
    "--out", "out", required=True, type=_OUT_DIR, help="Output folder (<case>/NM_pred, QSM_pred)."
)
@click.option("--folds", default=None, help="Comma-separated folds (default: all present).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--mirroring/--no-mirroring",
    default=True,
    show_default=True,
    help="Mirror test-time augmentation.",
)
@click.option(
    "--step",
    "tile_step_size",
    default=0.5,
    show_default=True,
    type=float,
    help="Sliding-window step (fraction of the patch).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@trust_option
def predict_cmd(
    cases_dir: Path,
    model: Path,
    out: Path,
    folds: str | None,
    device: str,
    mirroring: bool,
    tile_step_size: float,
    quiet: bool,
) -> None:
    """Segment the nuclei of every case under CASES_DIR with the bundle's nnU-Net models."""
    from mrn_engine.segmentation.batch import segment_cases
    from mrn_engine.segmentation.predict import NNUNetSegmenter

    seg_ = NNUNetSegmenter.from_bundle(
        model,
        device=device,
        folds=list(_parse_folds(folds)) if folds else None,
        use_mirroring=mirroring,
        tile_step_size=tile_step_size,
    )
    res = segment_cases(seg_, cases_dir, out, progress=not quiet)
    click.echo(f"{len(res.written)} case(s) segmented -> {out}")
    for w in res.warnings:
        click.echo(f"warning: {w['warning']}", err=True)
    for e in res.errors:
        click.echo(f"error: {e['error']}", err=True)
    if res.errors and not res.written:
        raise SystemExit(2)


@seg.command("convert")
@click.argument("model_dir", type=_DIR)
@click.option("--out", "bundle", required=True, type=_OUT_DIR, help="Bundle folder to write.")
@click.option("--modality", required=True, type=click.Choice(["nm", "qsm"], case_sensitive=False))
@trust_option
def convert_cmd(model_dir: Path, bundle: Path, modality: str) -> None:
    """Convert an nnU-Net model folder (pickled checkpoint_final.pth) to BUNDLE/nnunet/<MOD>.

    The bundle then holds safetensors + JSON only (no pickle); hashes go to mrn_nnunet.json.
    """
    import os

    from mrn_engine.segmentation.predict import available_folds
    from mrn_engine.segmentation.safe_model import PICKLED_CHECKPOINT, TRUST_ENV
    from mrn_engine.segmentation.train import copy_model_to_bundle

    folds = [
        f
        for f in available_folds(model_dir)
        if (model_dir / f"fold_{f}" / PICKLED_CHECKPOINT).is_file()
    ]
    if not folds:
        raise click.ClickException(f"{model_dir}: no fold_k/{PICKLED_CHECKPOINT} to convert")
    mod = modality.upper()
    dest = copy_model_to_bundle(
        model_dir,
        bundle,
        mod,
        folds,
        {"modality": mod, "converted_from": str(model_dir), "folds": folds},
        trust_pickled=os.environ.get(TRUST_ENV) == "1",
    )
    click.echo(f"{mod}: {len(folds)} fold(s) converted -> {dest}")


@seg.command("evaluate")
@click.argument("pred_dir", type=_DIR)
@click.argument("gt_dir", type=_DIR)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the per-case table as CSV.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_cmd(pred_dir: Path, gt_dir: Path, out: Path | None, quiet: bool) -> None:
    """Dice, HD95 (mm) and the challenge's weighted segmentation score of PRED_DIR vs GT_DIR."""
    from mrn_engine.segmentation.evaluate import evaluate_folders

    rows = evaluate_folders(pred_dir, gt_dir, out_csv=out, progress=not quiet)
    mean = rows[-1]
    click.echo(
        f"{len(rows) - 1} case(s): QSM score {mean['QSM_score']:.4f}, NM score "
        f"{mean['NM_score']:.4f}, composite {mean['composite_score']:.4f}"
    )
    if out is not None:
        click.echo(f"table -> {out}")


def register(group: click.Group) -> None:
    """Add the ``seg`` group to ``mrn``."""
    group.add_command(seg)
