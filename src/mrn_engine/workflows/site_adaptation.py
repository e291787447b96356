"""``mrn site-adapt``: fit a bundle's site harmonisation on a new site's healthy controls.

The method and its assumptions: :mod:`mrn_engine.inference.site_adaptation`. This module finds
the cases: the anchor controls of every fold (the training cohort's controls that fold did not
train on: stored by ``mrn train``, or from the bundle's ``cohort_root`` and fold splits, or
``train_root``), and the reference controls of the new site (cases labelled HC in the reference
folder's label files, or every case with ``all_controls``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from mrn_engine.bundle import read_oof
from mrn_engine.data import discover_cases, find_labels, load_case
from mrn_engine.errors import InputDataError, MRNWarning
from mrn_engine.inference import MRNPredictor
from mrn_engine.inference.site_adaptation import (
    FEW_CONTROLS,
    MIN_CONTROLS,
    ProgressFn,
    SiteAdaptation,
    anchors_from_vectors,
    fit_site_adaptation,
    head_p_pd,
    leave_one_out_p_pd,
    patient_vectors,
)
from mrn_engine.training.anchor import read_anchor

#: which training controls anchor a fold: those it never trained on (see training_controls)
ANCHOR = "val"


def training_controls(
    predictor: MRNPredictor, train_root: Path, anchor: str = ANCHOR
) -> dict[int, list[str]]:
    """Fold -> the training cohort's HC case ids that anchor it.

    ``anchor="val"``: the controls the fold did *not* train on (its out-of-fold cases), unseen
    by its weights like the new site's controls; ``"train"``: the controls it trained on.
    """
    if anchor not in ("val", "train"):
        raise InputDataError(f"anchor {anchor!r}: use 'val' or 'train'")
    bundle = predictor.bundle
    info = bundle.info if bundle is not None else {}
    labels = {str(c): int(v) for c, v in dict(info.get("labels") or {}).items()}
    if not labels:
        labels = find_labels(train_root)
    if not labels:
        raise InputDataError(
            f"{train_root}: no labels for the training cases (bundle.json has none and the "
            "folder has no train_cases.csv/val_cases.csv)"
        )
    controls = {c for c, y in labels.items() if y == 0}
    splits = bundle.splits if bundle is not None else {}
    out = {}
    for k in predictor.folds:
        ids = splits.get(k, {}).get(anchor) or sorted(labels)
        out[k] = sorted(c for c in ids if c in controls)
    return out


def resolve_train_root(predictor: MRNPredictor, train_root: str | os.PathLike | None) -> Path:
    if train_root is not None:
        root = Path(train_root)
    else:
        recorded = (predictor.bundle.info if predictor.bundle else {}).get("cohort_root")
        if not recorded:
            raise InputDataError(
                "the bundle does not record its training cohort: pass --train-root DIR "
                "(the labelled cases it was trained on)"
            )
        root = Path(recorded)
    if not root.is_dir():
        raise InputDataError(
            f"{root}: training cohort not found (the bundle's controls are the anchor); "
            "pass --train-root DIR"
        )
    return root


def reference_controls(reference_root: Path, *, all_controls: bool) -> list[str]:
    """The site's control case ids: labelled HC, or every case with ``all_controls``."""
    cases = [c.case_id for c in discover_cases(reference_root)]
    if not cases:
        raise InputDataError(f"{reference_root}: no cases found")
    labels = find_labels(reference_root)
    if all_controls:
        pd = sorted(c for c in cases if labels.get(c) == 1)
        if pd:
            raise InputDataError(
                f"{reference_root}: --all-controls, but the label files call {pd[:5]} PD"
            )
        return cases
    if not labels:
        raise InputDataError(
            f"{reference_root}: no label files, so the controls are unknown; add "
            "train_cases.csv (HC = 0) or pass --all-controls if every case is a healthy control"
        )
    return [c for c in cases if labels.get(c) == 0]


def fit_site(
    bundle: str | os.PathLike,
    reference_root: str | os.PathLike,
    *,
    train_root: str | os.PathLike | None = None,
    all_controls: bool = False,
    site: str | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    anchor: str = ANCHOR,
) -> SiteAdaptation:
    """Fit the site harmonisation of ``bundle`` for the scanner of ``reference_root``.

    ``anchor``: ``"val"`` (default) or ``"train"``, see :func:`training_controls`. With the
    default and no ``train_root``, the anchors ``mrn train`` stored in the bundle are used when
    every fold has one (no training case is read); otherwise they are computed from the cases.
    Every fold's anchor controls and every reference control get one diagnosis-only
    prediction (the patient vectors); nothing else is read or written.
    """
    reference_root = Path(reference_root)
    predictor = MRNPredictor.from_bundle(bundle, device=device)
    site_ids = reference_controls(reference_root, all_controls=all_controls)
    if len(site_ids) < FEW_CONTROLS:
        warnings.warn(
            f"{reference_root}: only {len(site_ids)} reference controls; the site shift is "
            f"noisy below {FEW_CONTROLS}",
            MRNWarning,
            stacklevel=2,
        )
    stored = stored_anchors(predictor) if train_root is None and anchor == "val" else None
    train_ids: list[str] = []
    if stored is None:
        root = resolve_train_root(predictor, train_root)
        per_fold = training_controls(predictor, root, anchor)
        train_files = {c.case_id: c for c in discover_cases(root)}
        train_ids = sorted({c for ids in per_fold.values() for c in ids})
        missing = [c for c in train_ids if c not in train_files]
        if missing:
            raise InputDataError(
                f"{root}: training controls {missing[:5]} not found; is this the bundle's "
                "training cohort?"
            )
    site_files = {c.case_id: c for c in discover_cases(reference_root)}
    n_all = len(train_ids) + len(site_ids)

    def _part(offset: int, n: int) -> ProgressFn | None:
        if progress is None:
            return None
        return lambda f, msg: progress((offset + f * n) / n_all, msg)

    if stored is None:
        train_vec = patient_vectors(
            predictor,
            (load_case(train_files[c]) for c in train_ids),
            len(train_ids),
            _part(0, len(train_ids)),
        )
        anchors = anchors_from_vectors(train_vec, per_fold)
        anchor_source = str(root.resolve())
    else:
        anchors, anchor_source = stored, "stored in the bundle (fold_k/anchor_controls.safetensors)"
    site_vec = patient_vectors(
        predictor,
        (load_case(site_files[c]) for c in site_ids),
        len(site_ids),
        _part(len(train_ids), len(site_ids)),
    )
    info = {
        "site": site or reference_root.name,
        "reference_root": str(reference_root.resolve()),
        "train_root": anchor_source,
        "bundle": str(Path(bundle).resolve()),
        "bundle_weights": dict(predictor.bundle.weights_sha256) if predictor.bundle else {},
        "folds": predictor.folds,
        "anchor": f"{anchor}: the training controls each fold "
        f"{'did not train' if anchor == 'val' else 'trained'} on",
    }
    adaptation = fit_site_adaptation(anchors, site_vec, site_ids, info)
    before = head_p_pd(predictor, site_vec, site_ids)
    after = head_p_pd(predictor, site_vec, site_ids, adaptation)
    adaptation.info["site_controls_p_pd"] = {
        "as_trained": float(sum(before) / len(before)),
        "adapted": float(sum(after) / len(after)),
        "called_pd_as_trained": sum(p >= 0.5 for p in before) / len(before),
        "called_pd_adapted": sum(p >= 0.5 for p in after) / len(after),
    }
    if len(site_ids) > MIN_CONTROLS:
        loo = leave_one_out_p_pd(predictor, anchors, site_vec, site_ids)
        adaptation.info["site_controls_p_pd"] |= {
            "adapted_leave_one_out": float(sum(loo) / len(loo)),
            "called_pd_leave_one_out": sum(p >= 0.5 for p in loo) / len(loo),
        }
    oof = training_controls_called_pd(predictor)
    if oof is not None:
        adaptation.info["site_controls_p_pd"]["training_oof_controls_called_pd"] = oof
    return adaptation


def training_controls_called_pd(predictor: MRNPredictor) -> float | None:
    """Share of the training cohort's controls called PD out of fold (one fold model each).

    The reference for a harmonised site's left-out controls; None without ``oof.csv`` files.
    """
    if predictor.bundle is None:
        return None
    rows = [r for fold in read_oof(predictor.bundle).values() for r in fold if r["label"] == 0]
    if not rows:
        return None
    return sum(r["p_pd"] >= 0.5 for r in rows) / len(rows)


def stored_anchors(predictor: MRNPredictor) -> dict[int, tuple] | None:
    """Fold -> (mean, case ids) that ``mrn train`` stored; None unless every fold has one."""
    if predictor.bundle is None:
        return None
    out = {}
    for k in predictor.folds:
        found = read_anchor(predictor.bundle.fold_dir(k))
        if found is None:
            return None
        out[k] = found
    return out
