"""``mrn rois CASE_DIR``: the four ROI boxes of a case and a PNG montage of the crops.

The montage is always written: ``./<case_id>_rois.png`` in the current directory unless
``--out`` names another file. An input file (the case's NIfTIs, the ``--config``) is never
overwritten.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("rois")
@click.argument("case_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--preset",
    default="cpu-tiny",
    show_default=True,
    help="Configuration preset whose ROI settings to use (cpu-tiny, paper-vitb, vits).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A config.json (overrides --preset).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the PNG montage of the crops here [default: ./<case_id>_rois.png].",
)
def rois_cmd(case_dir: Path, preset: str, config_path: Path | None, out: Path | None) -> None:
    """Print the ROI boxes of the case in CASE_DIR (voxels, mm, slices, labels).

    Also writes a PNG montage of the crops: ./<case_id>_rois.png, or --out.
    """
    from mrn_engine.config import RunConfig, get_preset
    from mrn_engine.data import load_case
    from mrn_engine.rois import extract_rois
    from mrn_engine.rois.montage import describe_crop, save_montage

    cfg = RunConfig.load(config_path) if config_path else get_preset(preset)
    case = load_case(case_dir, require_masks=True)
    if out is None:
        out = Path.cwd() / f"{case.case_id}_rois.png"
    inputs = list(case.files.input_paths().values()) if case.files is not None else []
    if config_path is not None:
        inputs.append(config_path)
    if any(out.resolve() == p.resolve() for p in inputs):
        raise click.BadParameter(
            f"{out} is an input file; choose another montage path", param_hint="'--out'"
        )
    crops = extract_rois(case, cfg.roi)
    sp = case.spacing
    click.echo(
        f"{case.case_id}: grid {case.shape}, voxel {sp[0]:.3f} x {sp[1]:.3f} x {sp[2]:.3f} mm; "
        f"preset {cfg.preset}: image {cfg.roi.image_size} px, margin {cfg.roi.margin_mm} mm, "
        f"slice policy {cfg.roi.slice_policy}"
    )
    head = f"{'roi':<13} {'x':>9} {'y':>9} {'z':>7} {'voxels':>10} {'mm':>16} {'scale':>6}  slices / labels (pixels)"
    click.echo(head)
    for crop in crops.values():
        d = describe_crop(crop)
        click.echo(
            f"{d['roi']:<13} {d['x']:>9} {d['y']:>9} {d['z']:>7} {d['size_vox']:>10} "
            f"{d['size_mm']:>16} {d['scale']:>6}  {d['slices']}; {d['labels']}"
        )
    path = save_montage(crops, out)
    click.echo(f"montage -> {path.resolve()}")


def register(group: click.Group) -> None:
    """Add ``rois`` to the ``mrn`` group."""
    group.add_command(rois_cmd)
