"""Baselines on the same folds (paper Table 2 / 4.2): ``mrn compare``.

Variants (each a change of the base configuration's model section):

* ``mrn`` -- the full MRN of the preset;
* ``seres10`` -- the SERes10 CNN baseline (``model.arch="seres10"``, no mSupMoCo);
* ``seres10-moco`` -- SERes10-mSupMoCo;
* ``dinov2-only`` -- DINOv2 slice tokens averaged, no FFA/SFA/DPT/mSupMoCo (``dinov2_only``);
* ``anatcl3d`` -- AnatCL's baseline: a MONAI 3D ResNet-18 on the ROI volumes
  (:mod:`mrn_engine.models.anatcl3d`), first pretrained on the cohort's cases with AnatCL's
  anatomy-aware contrastive loss (``mrn pretrain --arch anatcl3d``; diagnosis labels unread,
  the validation folds' images included), then fine-tuned for PD/HC per fold. Its weights and
  card are ``out/anatcl3d_pretrain/anatcl3d.safetensors`` / ``.card.json``.

The folds depend only on the labels, ``train.folds`` and ``train.cv_seed``, so every variant
is trained and scored on the same splits.

The pretraining stage optimises segmentation + contrastive losses only (Eq. 12 without ``cls``).
A variant with neither a segmentation head nor mSupMoCo (``seres10``, ``dinov2-only``) has no
pretraining objective: its pretraining loss is identically 0, so those epochs would only apply
weight decay. :func:`variant_config` sets ``train.pretrain_epochs = 0`` for such a variant; the
saved ``config.json`` of its bundle, ``comparison.csv`` (``pretrain_epochs`` column) and the note
of ``comparison.md`` record it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mrn_engine.config import RunConfig, atomic_write_text
from mrn_engine.errors import ConfigError
from mrn_engine.models.losses import loss_terms
from mrn_engine.pretraining.loop import PretrainOptions, pretrained_weights
from mrn_engine.training.cv import train_bundle
from mrn_engine.workflows.evaluate import heldout_metrics, oof_metrics

VARIANTS: dict[str, dict[str, Any]] = {
    "mrn": {},
    "seres10": {"arch": "seres10", "use_moco": False},
    "seres10-moco": {"arch": "seres10", "use_moco": True},
    "dinov2-only": {
        "dinov2_only": True,
        "use_ffa": False,
        "use_sfa": False,
        "use_dpt": False,
        "use_moco": False,
    },
    "anatcl3d": {"arch": "anatcl3d", "use_moco": False},
}
#: variants whose backbone is pretrained with AnatCL's loss before fine-tuning
ANATCL_PRETRAINED = ("anatcl3d",)
#: default AnatCL pretraining of the ``anatcl3d`` variant (epochs etc.; seed/device from the run)
ANATCL3D_PRETRAIN = PretrainOptions(arch="anatcl3d", variant="global", epochs=20)
TITLES = {
    "mrn": "MRN",
    "seres10": "SERes10",
    "seres10-moco": "SERes10-mSupMoCo",
    "dinov2-only": "DINOv2 only",
    "anatcl3d": "AnatCL 3D ResNet-18",
}
COLUMNS = (
    "variant",
    "pretrain_epochs",
    "epochs",
    "oof_accuracy",
    "oof_auc",
    "oof_f1",
    "heldout_accuracy",
    "heldout_auc",
    "heldout_f1",
    "n_oof",
    "n_heldout",
)


def variant_config(base: RunConfig, variant: str) -> RunConfig:
    """The configuration of one variant: ``base`` with the variant's model section.

    A variant whose pretraining stage has no loss term (no segmentation head and no mSupMoCo,
    see :func:`~mrn_engine.models.losses.loss_terms`) gets ``train.pretrain_epochs = 0``: it is
    trained for ``train.epochs`` full-loss epochs only.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    cfg = base.replace(model=dict(VARIANTS[variant]))
    if cfg.train.pretrain_epochs and not loss_terms(cfg.model, "pretrain"):
        cfg = cfg.replace(train={"pretrain_epochs": 0})
    return cfg


def _pct(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "N/A"
    return "N/A" if math.isnan(f) else f"{100 * f:.1f}%"


def comparison_markdown(rows: Sequence[dict[str, Any]], note: str = "") -> str:
    """The paper-style table (Accuracy / ROC_AUC / F1, out-of-fold and held-out)."""
    lines = [
        "| Model | OOF Accuracy | OOF ROC_AUC | OOF F1 | Held-out Accuracy | Held-out ROC_AUC | Held-out F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {TITLES.get(r['variant'], r['variant'])} | {_pct(r['oof_accuracy'])} | {_pct(r['oof_auc'])} | "
            f"{_pct(r['oof_f1'])} | {_pct(r['heldout_accuracy'])} | {_pct(r['heldout_auc'])} | "
            f"{_pct(r['heldout_f1'])} |"
        )
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def compare_variants(
    cases_root: str | os.PathLike,
    out: str | os.PathLike,
    base: RunConfig,
    variants: Sequence[str] = ("mrn", "seres10", "seres10-moco", "dinov2-only"),
    *,
    heldout_root: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    anatcl: PretrainOptions | None = None,
) -> list[dict[str, Any]]:
    """Train every variant on the same folds into ``out/<variant>/`` and tabulate the scores.

    Writes ``out/comparison.md`` and ``out/comparison.csv`` (rewritten after each variant).
    ``anatcl``: the AnatCL pretraining of ``anatcl3d`` (default :data:`ANATCL3D_PRETRAIN`).
    """
    out = Path(out)
    cfgs = {v: variant_config(base, v) for v in variants}  # validate all names first
    rows: list[dict[str, Any]] = []
    for v, cfg in cfgs.items():
        bundle = out / v
        if progress and base.train.pretrain_epochs and not cfg.train.pretrain_epochs:
            tqdm.write(
                f"{v}: no pretraining objective (no segmentation head, no mSupMoCo): "
                f"pretraining stage skipped (train.pretrain_epochs = 0, {cfg.train.epochs} epochs)"
            )
        if v in ANATCL_PRETRAINED:
            cfg = anatcl_pretrained(cases_root, out, cfg, anatcl, resume=resume, progress=progress)
        train_bundle(
            cases_root, bundle, cfg, cache_dir=out / "roi_cache", resume=resume, progress=progress
        )
        oof = oof_metrics(bundle)
        row: dict[str, Any] = {
            "variant": v,
            "pretrain_epochs": cfg.train.pretrain_epochs,
            "epochs": cfg.train.epochs,
            "oof_accuracy": oof["accuracy"],
            "oof_auc": oof["auc"],
            "oof_f1": oof["f1"],
            "n_oof": oof["n"],
            "heldout_accuracy": math.nan,
            "heldout_auc": math.nan,
            "heldout_f1": math.nan,
            "n_heldout": 0,
        }
        if heldout_root is not None:
            held = heldout_metrics(bundle, heldout_root, progress=progress)
            row.update(
                heldout_accuracy=held["accuracy"],
                heldout_auc=held["auc"],
                heldout_f1=held["f1"],
                n_heldout=held["n"],
            )
        rows.append(row)
        write_comparison(out, rows, base)
    return rows


def anatcl_pretrained(
    cases_root: str | os.PathLike,
    out: Path,
    cfg: RunConfig,
    opts: PretrainOptions | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> RunConfig:
    """Pretrain the ``anatcl3d`` trunk on ``cases_root`` (no labels) and return ``cfg`` using it.

    With ``resume``, a finished earlier pretraining with the same options is reused
    (:func:`~mrn_engine.pretraining.loop.pretrained_weights`).
    """
    base = opts or ANATCL3D_PRETRAIN
    opts = PretrainOptions(
        **{**asdict(base), "arch": "anatcl3d", "seed": cfg.train.seed, "device": cfg.train.device}
    )
    if progress:
        tqdm.write(f"anatcl3d: AnatCL pretraining of the 3D ResNet-18 ({opts.epochs} epochs)")
    weights = pretrained_weights(
        cases_root,
        out / "anatcl3d_pretrain" / "anatcl3d.safetensors",
        cfg,
        opts,
        cache_dir=out / "roi_cache",
        resume=resume,
        progress=progress,
    )
    return cfg.replace(model={"backbone_weights": str(weights)})


def write_comparison(out: Path, rows: Sequence[dict[str, Any]], base: RunConfig) -> None:
    """``comparison.csv`` + ``comparison.md`` (atomic)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(out / "comparison.csv", buf.getvalue())
    t = base.train
    note = (
        f"Preset `{base.preset}`, {t.folds}-fold CV (cv_seed {t.cv_seed}), "
        f"{t.pretrain_epochs}+{t.epochs} epochs; F1 = macro F1. Config: "
        + json.dumps(
            {"lr_backbone": t.lr_backbone, "lr_head": t.lr_head, "batch_size": t.batch_size}
        )
    )
    skipped = [
        r["variant"]
        for r in rows
        if t.pretrain_epochs and r["pretrain_epochs"] == 0 and r["variant"] not in ANATCL_PRETRAINED
    ]
    anatcl = [r["variant"] for r in rows if r["variant"] in ANATCL_PRETRAINED]
    if anatcl:
        note += (
            "\n\n"
            + ", ".join(TITLES.get(v, v) for v in anatcl)
            + ": trunk pretrained first with AnatCL's anatomy-aware contrastive loss on the "
            "cases' images and nucleus descriptors (labels unread; card: "
            "anatcl3d_pretrain/anatcl3d.card.json), then fine-tuned for "
            f"{t.epochs} epochs (no MRN segmentation/contrastive stage)."
        )
    if skipped:
        note += (
            "\n\nNo pretraining objective (no segmentation head, no mSupMoCo), pretraining "
            f"stage skipped (0+{t.epochs} epochs): "
            + ", ".join(TITLES.get(v, v) for v in skipped)
            + "."
        )
    atomic_write_text(out / "comparison.md", comparison_markdown(rows, note))
