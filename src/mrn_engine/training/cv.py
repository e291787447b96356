"""k-fold cross-validation training into a model bundle (``mrn train``).

``BUNDLE/`` holds ``config.json`` (RunConfig), ``bundle.json`` (folds with their train/val case
ids, cohort root, weights provenance, sha256 of each fold's weights, created time, code
version) and ``fold_k/`` per fold (``model.safetensors``, ``config.json``, ``metrics.csv``,
``oof.csv``, ``optimizer.pt``, ``checkpoints/``); the layout is ``mrn_engine.bundle``'s. Each
fold can be trained alone (``folds=[k]``) so folds can run in parallel processes on one bundle:
every read-modify-write of ``bundle.json`` holds ``mrn_engine.bundle.bundle_lock``.

Under torchrun (``training/distributed.py``) every rank trains the same folds together; rank 0
alone creates the bundle, fills the ROI cache and records the weights, the others wait for it.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mrn_engine import __version__
from mrn_engine.bundle import DONE_FILE, create_bundle, fold_dir, update_bundle_weights
from mrn_engine.config import RunConfig
from mrn_engine.data import CaseFiles, check_duplicates, discover_cases, find_labels
from mrn_engine.errors import ConfigError, InputDataError, MRNWarning
from mrn_engine.rois import RoiCache
from mrn_engine.runtime import seed_everything
from mrn_engine.training import distributed
from mrn_engine.training.augment import RoiAugmenter
from mrn_engine.training.calibration_pooled import calibrate_bundle
from mrn_engine.training.dataset import RoiStackDataset
from mrn_engine.training.objective import MRNObjective
from mrn_engine.training.splits import Fold, make_folds, warn_split_duplicates
from mrn_engine.training.trainer import (
    FoldResult,
    check_global_batch,
    check_stages,
    epoch_seed,
    train_fold,
)

BUNDLE_FORMAT = 1


@dataclass
class LabelledCohort:
    """The labelled cases of a cohort root (train_cases.csv + val_cases.csv merged)."""

    root: Path
    files: dict[str, CaseFiles]
    labels: dict[str, int]
    duplicates: list[tuple[str, str]] = field(default_factory=list)


def load_labelled_cohort(root: str | os.PathLike) -> LabelledCohort:
    """Discover cases and labels under ``root``; every labelled case must have its folder."""
    root = Path(root)
    if not root.is_dir():
        raise InputDataError(f"{root}: cases folder not found")
    files = {c.case_id: c for c in discover_cases(root)}
    labels = find_labels(root)
    if not labels:
        raise InputDataError(f"{root}: no train_cases.csv / val_cases.csv with labels found")
    labelled = {c: files[c] for c in sorted(labels) if c in files}
    missing = sorted(set(labels) - set(labelled))
    if missing:
        raise InputDataError(f"{missing[0]}: labelled in {root} but has no case folder")
    for cid, f in labelled.items():
        absent = [n for n in ("nm", "qsm", "nm_mask", "qsm_mask") if getattr(f, n) is None]
        if absent:
            raise InputDataError(f"{f.folder}: training needs {', '.join(absent)} for case {cid}")
    dups = check_duplicates(list(labelled.values()), warn=False)
    return LabelledCohort(
        root=root, files=labelled, labels={c: labels[c] for c in labelled}, duplicates=dups
    )


def roi_loader(cohort_files: dict[str, CaseFiles], cfg: RunConfig, cache: RoiCache):
    """``case_id -> {name: {"image", "mask"}}`` through the on-disk ROI cache."""

    def load(case_id: str) -> dict[str, dict[str, Any]]:
        crops = cache.get_or_compute(cohort_files[case_id], cfg.roi)
        return {name: {"image": c.image, "mask": c.mask} for name, c in crops.items()}

    return load


def code_version() -> str:
    """Package version (+ git commit of the source tree when available)."""
    head = Path(__file__).resolve().parents[3] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        return f"{__version__}+g{ref[:10]}"
    except OSError:
        return __version__


def _bundle_info(
    cohort: LabelledCohort, folds: list[Fold], cfg: RunConfig, provenance: dict
) -> dict:
    return {
        "format": BUNDLE_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "cohort_root": str(cohort.root.resolve()),
        "n_cases": len(cohort.labels),
        "n_pd": int(sum(cohort.labels.values())),
        "cv": {
            "folds": cfg.train.folds,
            "cv_seed": cfg.train.cv_seed,
            "method": "sklearn StratifiedKFold(shuffle=True)",
        },
        "folds": [{"fold": f.index, **f.to_dict()} for f in folds],
        "labels": cohort.labels,
        "duplicates": [list(p) for p in cohort.duplicates],
        "weights_provenance": provenance,
        "weights": {},
    }


def prepare_bundle(
    out: str | os.PathLike, cohort: LabelledCohort, cfg: RunConfig, provenance: dict
) -> tuple[Path, list[Fold]]:
    """Create (or check) ``out/config.json`` and ``out/bundle.json``; returns the folds.

    An existing bundle must have the same configuration and folds (another fold of the same
    run, started in parallel or resumed); otherwise ``ConfigError``.
    """
    out = Path(out)
    folds = make_folds(cohort.labels, cfg.train.folds, cfg.train.cv_seed)
    warn_split_duplicates(folds, cohort.duplicates)
    info = _bundle_info(cohort, folds, cfg, provenance)
    create_bundle(out, cfg, info)
    return out, folds


def cache_rois(
    cohort: LabelledCohort, cfg: RunConfig, cache: RoiCache, progress: bool = True
) -> None:
    """Fill the ROI cache for all labelled cases (once, before the folds)."""
    for cid in tqdm(sorted(cohort.files), desc="ROI crops", unit="case", disable=not progress):
        cache.get_or_compute(cohort.files[cid], cfg.roi)


def discard_run(out: Path) -> None:
    """Remove what an earlier ``mrn train`` wrote to ``out`` (only its own files)."""
    if not out.is_dir():
        return
    for d in out.glob("fold_*"):
        if d.is_dir() and re.fullmatch(r"fold_\d+", d.name):
            shutil.rmtree(d)
    for name in ("bundle.json", "config.json"):
        (out / name).unlink(missing_ok=True)


def fold_augmenter(cfg: RunConfig, k: int) -> RoiAugmenter | None:
    """Fold ``k``'s training augmentation under ``cfg.train`` (None with ``augment`` off)."""
    if not cfg.train.augment:
        return None
    return RoiAugmenter(epoch_seed(cfg.train.seed, k, 0), intensity=cfg.train.augment_intensity)


def train_bundle(
    cases_root: str | os.PathLike,
    out: str | os.PathLike,
    cfg: RunConfig,
    *,
    folds: Sequence[int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[FoldResult]:
    """Train the k-fold ensemble of ``cfg`` on the labelled cases of ``cases_root`` into ``out``.

    Parameters
    ----------
    folds : which folds to train (default all ``cfg.train.folds``).
    cache_dir : ROI cache folder (default ``out/../roi_cache``).
    resume : continue killed folds from their checkpoints; finished folds are kept.
    stop_after : stop each fold after this epoch (time-boxing, tests).
    overwrite : discard an earlier run in ``out`` (its fold folders, bundle.json, config.json)
        and start from epoch 1; without it (and without ``resume``) checkpoints are refused.
    """
    out = Path(out)
    if overwrite and resume:
        raise ConfigError("--resume and --overwrite exclude each other")
    distributed.check_launch()
    check_global_batch(cfg.train.batch_size, distributed.world_size())  # before any file
    main = distributed.is_main()
    progress = progress and main
    if overwrite and main:
        discard_run(out)
    cohort = load_labelled_cohort(cases_root)
    wanted = list(range(cfg.train.folds)) if folds is None else sorted(set(int(k) for k in folds))
    bad = [k for k in wanted if not 0 <= k < cfg.train.folds]
    if bad:
        raise ConfigError(f"fold {bad[0]}: folds are numbered 0..{cfg.train.folds - 1}")
    check_stages(cfg)
    seed_everything(epoch_seed(cfg.train.seed, 0, 0))
    provenance = dict(getattr(MRNObjective(cfg).student, "weights_provenance", {}))
    cache = RoiCache(cache_dir if cache_dir is not None else out.parent / "roi_cache")
    if main:
        out, all_folds = prepare_bundle(out, cohort, cfg, provenance)
        cache_rois(cohort, cfg, cache, progress)
    distributed.barrier()  # the bundle and the ROI cache exist before the other ranks read them
    if not main:
        all_folds = make_folds(cohort.labels, cfg.train.folds, cfg.train.cv_seed)
    load = roi_loader(cohort.files, cfg, cache)
    results = []
    for k in wanted:
        fold = all_folds[k]
        fold_out = fold_dir(out, k)
        if resume and (fold_out / DONE_FILE).is_file():
            results.append(FoldResult(fold=k, out_dir=fold_out, epochs_done=-1, finished=True))
            continue
        seed_everything(epoch_seed(cfg.train.seed, k, 0))
        objective = MRNObjective(cfg)
        train_ds = RoiStackDataset(
            fold.train_ids,
            cohort.labels,
            load,
            fold_augmenter(cfg, k),
        )
        val_ds = RoiStackDataset(fold.val_ids, cohort.labels, load)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.interface.*")
            results.append(
                train_fold(
                    objective,
                    train_ds,
                    val_ds,
                    cfg,
                    fold_out,
                    fold=k,
                    resume=resume,
                    stop_after=stop_after,
                    progress=progress,
                )
            )
    if main:
        update_bundle_weights(out)
        _calibrate_when_complete(out, cfg.train.folds)
    distributed.barrier()
    return results


def _calibrate_when_complete(out: Path, n_folds: int) -> None:
    """Once every fold is done, refit the calibration on the pooled out-of-fold predictions
    (``training/calibration_pooled.py``; replaces the per-fold temperatures)."""
    if all((fold_dir(out, k) / DONE_FILE).is_file() for k in range(n_folds)):
        try:
            calibrate_bundle(out)
        except InputDataError as e:  # e.g. no out-of-fold cases: the per-fold files stay
            warnings.warn(f"{out}: pooled calibration not fitted: {e}", MRNWarning, stacklevel=2)
