"""``mrn predict``: fold-ensemble prediction of case folders in the challenge submission format."""

from __future__ import annotations

from pathlib import Path

import click


def _parse_folds(value: str | None) -> list[int] | None:
    if value is None or value.strip() in ("", "all"):
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give fold indices like 0,1,2") from None


def _set_trust(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        import os

        from mrn_engine.segmentation.safe_model import TRUST_ENV

        os.environ[TRUST_ENV] = "1"
        click.echo(
            "WARNING: --trust-pickled-nnunet: legacy nnU-Net checkpoints will be fully "
            "unpickled, which runs any code stored in them; use only bundles you trust",
            err=True,
        )


#: opt-in for full unpickling of legacy nnU-Net checkpoints (sets MRN_TRUST_PICKLED_NNUNET=1)
trust_option = click.option(
    "--trust-pickled-nnunet",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_trust,
    help="DANGEROUS: fully unpickle legacy nnU-Net checkpoint_final.pth files of the bundle "
    "(can run code stored in them). Only for bundles whose origin you trust.",
)


def predictor_options(out_help: str):
    """The options of every command that runs a bundle on case folders (predict, ablate-rois)."""

    def apply(f):
        for option in reversed(
            (
                click.argument(
                    "cases_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)
                ),
                click.option(
                    "--model",
                    "model",
                    required=True,
                    type=click.Path(exists=True, file_okay=False, path_type=Path),
                    help="Model bundle folder (output of mrn train / mrn demo).",
                ),
                click.option(
                    "--out",
                    "out",
                    required=True,
                    type=click.Path(file_okay=False, path_type=Path),
                    help=out_help,
                ),
                click.option(
                    "--folds", default=None, help="Comma-separated fold indices (default: all)."
                ),
                click.option(
                    "--tta/--no-tta",
                    default=False,
                    show_default=True,
                    help="Mirror test-time augmentation.",
                ),
                click.option(
                    "--device",
                    default="auto",
                    show_default=True,
                    help="auto (cuda > mps > cpu), cpu, cuda, mps.",
                ),
                click.option(
                    "--ignore-masks",
                    is_flag=True,
                    help="Ignore mask files in the case folders (segment with nnU-Net).",
                ),
                click.option(
                    "--site-adaptation",
                    "site_adaptation",
                    default=None,
                    type=click.Path(exists=True, dir_okay=False, path_type=Path),
                    help="Site harmonisation file from mrn site-adapt (the new scanner's "
                    "controls aligned with the training controls).",
                ),
                click.option("--quiet", is_flag=True, help="No progress bar."),
                trust_option,
            )
        ):
            f = option(f)
        return f

    return apply


def seg_options(f):
    """nnU-Net speed settings of the mask-free path (``SegInferenceSettings``)."""
    for option in reversed(
        (
            click.option(
                "--seg-mirroring/--no-seg-mirroring",
                default=None,
                help="nnU-Net test-time mirroring for cases without masks (default: off).",
            ),
            click.option(
                "--seg-tile-step",
                type=click.FloatRange(0.5, 1.0),
                default=None,
                help="nnU-Net sliding-window step, fraction of the patch (default 1.0).",
            ),
            click.option(
                "--seg-localize/--no-seg-localize",
                default=None,
                help="Coarse pass first, full sliding window only around the nuclei (default: on).",
            ),
        )
    ):
        f = option(f)
    return f


def seg_settings(mirroring: bool | None, step: float | None, localize: bool | None):
    """``SegInferenceSettings`` from the options (None when none was given: the defaults)."""
    from dataclasses import replace

    from mrn_engine.segmentation.settings import SegInferenceSettings

    given = {
        k: v
        for k, v in (("use_mirroring", mirroring), ("tile_step_size", step), ("localize", localize))
        if v is not None
    }
    return replace(SegInferenceSettings(), **given) if given else None


def build_predictor(
    model: Path,
    folds: str | None,
    tta: bool,
    device: str,
    ignore_masks: bool,
    seg=None,
    site_adaptation: Path | None = None,
):
    """``MRNPredictor`` of a bundle from the command-line values (``seg``: nnU-Net settings)."""
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.inference.mask_source import bundle_segmenter_factory

    predictor = MRNPredictor.from_bundle(
        model,
        device=device,
        folds=_parse_folds(folds),
        tta=tta,
        ignore_masks=ignore_masks,
        site_adaptation=site_adaptation,
    )
    if seg is not None and predictor.bundle is not None:
        predictor.masks.segmenter_factory = bundle_segmenter_factory(predictor.bundle, device, seg)
        predictor.masks.seg_settings = seg
    return predictor


def cohort_options(f):
    """``--workers``, ``--shard``, ``--overwrite``: streaming, splitting and resuming a cohort."""
    f = click.option(
        "--overwrite",
        is_flag=True,
        help="Predict every case again (default: skip cases an earlier run with the same "
        "bundle and settings already wrote to OUT, e.g. a killed run).",
    )(f)
    f = click.option(
        "--shard",
        default=None,
        metavar="I/N",
        help="Only the I-th of N slices of the sorted case ids (1 <= I <= N); one OUT per "
        "shard, joined by mrn merge-shards.",
    )(f)
    f = click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="Loader processes reading and cropping cases ahead of the model "
        "(default: 0 on 1-2 cores, else half the free cores, at most 4).",
    )(f)
    return f


#: exit status of ``mrn predict`` when some (not all) cases failed, without --allow-partial
EXIT_PARTIAL = 3
#: exit status when no case could be predicted (and of every other engine error)
EXIT_FAILED = 2


@click.command("predict")
@predictor_options("Output folder (per-case NM_pred/QSM_pred/PD_pred.txt + label_predict.csv).")
@click.option(
    "--allow-partial",
    is_flag=True,
    help=f"Exit 0 when some cases failed but others were predicted (default: exit {EXIT_PARTIAL}).",
)
@click.option(
    "--no-nuclei",
    is_flag=True,
    help="Diagnosis only: skip the DPT segmentation head (same P(PD), faster); "
    "no NM_pred/QSM_pred files.",
)
@cohort_options
@seg_options
def predict_cmd(
    cases_dir: Path,
    model: Path,
    out: Path,
    folds: str | None,
    tta: bool,
    device: str,
    ignore_masks: bool,
    site_adaptation: Path | None,
    quiet: bool,
    allow_partial: bool,
    no_nuclei: bool,
    workers: int | None,
    shard: str | None,
    overwrite: bool,
    seg_mirroring: bool | None,
    seg_tile_step: float | None,
    seg_localize: bool | None,
) -> None:
    """Predict PD/HC and the nuclei masks for every case folder under CASES_DIR.

    A rerun skips the cases an earlier (killed or finished) run with the same bundle and
    settings has already written; --shard I/N runs one slice of a big cohort (merge the
    slices with mrn merge-shards).

    Exit status: 0 all cases predicted; 3 some cases failed (0 with --allow-partial);
    2 no case predicted or an error that stopped the run.
    """
    from mrn_engine.inference.cohort import parse_shard
    from mrn_engine.inference.timing import format_summary

    chosen = parse_shard(shard)  # bad syntax fails before the bundle is read
    seg = seg_settings(seg_mirroring, seg_tile_step, seg_localize)
    predictor = build_predictor(
        model, folds, tta, device, ignore_masks, seg, site_adaptation=site_adaptation
    )
    if predictor.device.type == "cpu" and not quiet:
        click.echo("note: running on CPU (slow for ViT backbones)", err=True)
    if predictor.site_adaptation is not None:
        click.echo(f"site adaptation: {predictor.site_adaptation.site}", err=True)
    result = predictor.predict_cases(
        cases_dir,
        out,
        progress=not quiet,
        nuclei=not no_nuclei,
        workers=workers,
        shard=chosen,
        overwrite=overwrite,
    )
    done = f" ({len(result.skipped)} by an earlier run, skipped)" if result.skipped else ""
    click.echo(f"{result.n_ok} case(s) predicted{done} -> {out}")
    click.echo(format_summary(result.timing))
    if result.errors:
        for e in result.errors:
            click.echo(f"  {e['error']}", err=True)
        ids = ", ".join(e["case_id"] for e in result.errors)
        click.echo(
            f"FAILED: {len(result.errors)} of {len(result.rows)} case(s): {ids} "
            f"(details in {out / 'errors.json'})",
            err=True,
        )
        if result.n_ok == 0:
            raise SystemExit(EXIT_FAILED)
        if not allow_partial:
            raise SystemExit(EXIT_PARTIAL)


def register(group: click.Group) -> None:
    """Add ``predict`` and ``merge-shards`` to the ``mrn`` group."""
    from mrn_engine.cli.merge import merge_shards_cmd

    group.add_command(predict_cmd)
    group.add_command(merge_shards_cmd)
