"""Add the healthy reference slice tokens to a bundle trained before ``mrn train`` wrote them.

``mrn calibrate BUNDLE --reference-cases ROOT``: for every fold, the mean slice token over the
controls of that fold's training split (``bundle.json``), from the labelled cohort they came
from (default: the ``cohort_root`` that ``bundle.json`` records), exactly as the trainer does
at the end of a fold (``training/reference_slices.py``). Only the reference files are written;
weights and everything else stay as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

from mrn_engine.bundle import open_bundle
from mrn_engine.errors import ConfigError, InputDataError
from mrn_engine.models import build_model
from mrn_engine.models.evidence import supports_slice_evidence
from mrn_engine.rois import RoiCache
from mrn_engine.runtime import resolve_device
from mrn_engine.training.cv import load_labelled_cohort, roi_loader
from mrn_engine.training.dataset import RoiStackDataset
from mrn_engine.training.reference_slices import fit_reference_slices, write_reference_slices


def fit_bundle_reference(
    bundle_root: str | os.PathLike,
    cases_root: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> dict[int, int]:
    """Write ``fold_k/reference_slices.safetensors`` for every fold; fold -> controls used.

    Raises
    ------
    InputDataError: the cohort lacks the fold's training cases, or the bundle has no splits.
    ConfigError: the model has no MRN slice tokens (a baseline).
    """
    bundle = open_bundle(bundle_root)
    root = cases_root if cases_root is not None else bundle.info.get("cohort_root")
    if not root or not Path(root).is_dir():
        raise InputDataError(
            f"{bundle.root}: the training cohort {root!r} is not there; give it "
            "(--reference-cases ROOT)"
        )
    missing_splits = [k for k in bundle.folds if not bundle.splits.get(k, {}).get("train")]
    if missing_splits:
        raise InputDataError(
            f"{bundle.root}/bundle.json: no training split for fold(s) {missing_splits}"
        )
    cfg = bundle.config
    model = build_model(cfg, pretrained=False)
    if not supports_slice_evidence(model):
        raise ConfigError(
            f"{bundle.root}: model {cfg.model.arch!r} has no MRN slice tokens; per-slice "
            "evidence (and its healthy reference) is for MRN bundles"
        )
    dev = resolve_device(device)
    model.to(dev)
    cohort = load_labelled_cohort(root)
    labels = {str(c): int(y) for c, y in (bundle.info.get("labels") or cohort.labels).items()}
    cache = RoiCache(cache_dir if cache_dir is not None else bundle.root.parent / "roi_cache")
    load = roi_loader(cohort.files, cfg, cache)
    used = {}
    for k in bundle.folds:
        train = list(bundle.splits[k]["train"])
        absent = [c for c in train if c not in cohort.files or c not in labels]
        if absent:
            raise InputDataError(
                f"{root}: fold {k} trained on {len(absent)} case(s) not in this cohort "
                f"(first: {absent[0]}); give the cohort the bundle was trained on"
            )
        model.load_state_dict(bundle.load_state(k))
        ref = fit_reference_slices(model, RoiStackDataset(train, labels, load), device=dev)
        if ref is None:
            raise InputDataError(f"{root}: fold {k}'s training split holds no control (label 0)")
        write_reference_slices(bundle.fold_dir(k), *ref)
        used[k] = len(ref[1])
    return used
