"""How much of the oracle can a model reach from the images? Hand-made nucleus features + a
logistic regression, trained on one labelled cohort and scored on another.

    python docs/scripts/feature_ceiling.py TRAIN_ROOT TEST_ROOT [TRAIN_ROOT2 ...] \
        --cache DIR [--bootstrap 2000]

The phantom oracle knows each case's latent severity and age; a model sees images with noise,
per-case NM contrast and nucleus iron offsets. This script measures what a simple, explicit
model gets from the same images the engine crops, as a reference for MRN's gap to the oracle
(docs/results.md, issue 14). Per case, from the engine's own intensity mapping
(``modality_mapping``, ``RoiConfig`` defaults, i.e. ``intensity = "reference"``):

* ``nm_*``: NM contrast-to-noise (CNR against the reference region next to the SN) averaged
  over the anatomical SN (QSM labels 11/12, which do not depend on the class) and over its
  four quadrants per side: lateral / medial of the side's median distance from the midline,
  posterior / anterior of its median y. Depigmentation in the phantoms is lateral-posterior;
* ``qsm_*``: mean susceptibility (ppm) of each of the eight nucleus types (both sides);
* ``nm_mask_mm3``: volume of the NM mask (pigment-defined; only in the ``+ NM mask volume``
  feature set, since a predicted mask would carry it only as well as the segmentation does).

Feature rows are kept in ``--cache/<root name>.csv``. Each TRAIN_ROOT is fitted on all its
labelled cases (``StandardScaler`` + ``LogisticRegressionCV``, C chosen by 5-fold CV inside
the training cases only) and scored on TEST_ROOT, whose labels are read only to score.
Printed per training set and feature set: accuracy and AUC on the test cases, with 95 %
bootstrap intervals over test cases, and the oracle's accuracy on the same test cases
(``phantom_latents.csv``). ``--subsets K`` also fits on K disjoint stratified subsets of each
training set (e.g. four sets of 75 from 300) and prints the mean +- sd over them.
"""

from __future__ import annotations

import argparse
import csv
import io
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mrn_engine.config import RoiConfig, atomic_write_text, get_preset
from mrn_engine.data.cases import discover_cases, find_labels, load_case
from mrn_engine.data.labels import QSM_LABELS
from mrn_engine.data.tables import read_csv
from mrn_engine.errors import MRNWarning
from mrn_engine.rois.cache import RoiCache
from mrn_engine.rois.extract import modality_mapping

#: QSM nucleus types and their (right, left) labels, from the engine's label table
NUCLEI = {QSM_LABELS[r][:-2]: (r, r + 1) for r in sorted(QSM_LABELS) if r % 2 == 1}
QUADRANTS = ("lat_post", "lat_ant", "med_post", "med_ant")
NM_FEATURES = ["nm_sn"] + [f"nm_{q}" for q in QUADRANTS]
QSM_FEATURES = [f"qsm_{n}" for n in NUCLEI]
FEATURE_SETS = {
    "NM SN quadrants": NM_FEATURES,
    "QSM nuclei": QSM_FEATURES,
    "NM + QSM": NM_FEATURES + QSM_FEATURES,
    "NM + QSM + NM mask volume": NM_FEATURES + QSM_FEATURES + ["nm_mask_mm3"],
}
#: the same from the model's own input (``--crops PRESET``): ROI crops, 0..255
CROP_NM = ["crop_nm_sn_SN", "crop_nm_box"] + [f"crop_nm_{q}" for q in QUADRANTS]
CROP_QSM = (
    [f"crop_qsm_bg_{n}" for n in ("caudate", "putamen", "globus_pallidus", "thalamus")]
    + [f"crop_qsm_midbrain_{n}" for n in ("STN", "SN", "RN")]
    + ["crop_qsm_dentate_dentate"]
)
CROP_SETS = {
    "crops: NM SN": CROP_NM,
    "crops: QSM nuclei": CROP_QSM,
    "crops: NM + QSM": CROP_NM + CROP_QSM,
    "crops: NM + QSM + NM mask size": CROP_NM + CROP_QSM + ["crop_nm_mask_vox"],
}


def quarters(lateral: np.ndarray, posterior: np.ndarray) -> dict[str, np.ndarray]:
    """:data:`QUADRANTS` name -> boolean selection, from the lateral and posterior halves."""
    return {
        "lat_post": lateral & posterior,
        "lat_ant": lateral & ~posterior,
        "med_post": ~lateral & posterior,
        "med_ant": ~lateral & ~posterior,
    }


def case_features(case, cfg: RoiConfig) -> dict[str, float]:
    """The nucleus features of one loaded case with its masks."""
    qmask = case.qsm_mask.array
    nmask = case.nm_mask.array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MRNWarning)
        nm_map = modality_mapping("NM", case.nm, cfg, nmask, qmask)
        qsm_map = modality_mapping("QSM", case.qsm, cfg, None)
    nm_info, qsm_info = dict(nm_map.info), dict(qsm_map.info)
    ref, sd = nm_info["ref_median"], nm_info["ref_sd"]
    cnr = (case.nm.array.astype(np.float64) - ref) / sd
    ppm = case.qsm.array.astype(np.float64) * (1e-3 if qsm_info.get("unit") == "ppb" else 1.0)
    row: dict[str, float] = {}
    for name, labs in NUCLEI.items():
        row[f"qsm_{name}"] = float(ppm[np.isin(qmask, labs)].mean())
    sn = np.isin(qmask, NUCLEI["SN"])
    row["nm_sn"] = float(cnr[sn].mean())
    xs = np.nonzero(sn)[0]
    midline = float(xs.mean())
    quads: dict[str, list[np.ndarray]] = {q: [] for q in QUADRANTS}
    for lab in NUCLEI["SN"]:
        x, y, z = np.nonzero(qmask == lab)
        if x.size == 0:
            continue
        dist = np.abs(x - midline)
        lateral = dist > np.median(dist)
        posterior = y < np.median(y)  # LAS grid: y grows anterior
        vals = cnr[x, y, z]
        for q, sel in quarters(lateral, posterior).items():
            quads[q].append(vals[sel])
    for q, parts in quads.items():
        row[f"nm_{q}"] = float(np.concatenate(parts).mean())
    row["nm_mask_mm3"] = float((nmask > 0).sum() * np.prod(case.nm.spacing))
    return row


def crop_features(crops: dict) -> dict[str, float]:
    """Features of the ROI crops the model sees (0..255 stacks, resized masks).

    Per ROI class: mean crop value inside its (resized) mask; for the NM SN also its four
    quadrants (as in :func:`case_features`, in crop coordinates), the mean over the whole
    box (depigmented voxels leave the NM mask, not the box) and the mask's size in source
    voxels.
    """
    row: dict[str, float] = {}
    for name, crop in crops.items():
        img, mask = crop.image, crop.mask
        for k, cls in enumerate(crop.spec.classes, start=1):
            row[f"crop_{name}_{cls}"] = float(img[mask == k].mean()) if (mask == k).any() else 0.0
        if name != "nm_sn":
            continue
        valid = crop.slice_index >= 0
        (px, py), (hx, hy) = crop.pad, crop.resized_hw
        row["crop_nm_box"] = float(img[valid, px : px + hx, py : py + hy].mean())
        n_src_z = crop.box.shape[2] / max(int(valid.sum()), 1)
        row["crop_nm_mask_vox"] = float((mask > 0).sum()) / crop.scale**2 * n_src_z
        s_idx, h, w = np.nonzero(mask > 0)
        x_src = crop.box.x0 + (h - px + 0.5) / crop.scale
        dist = np.abs(x_src - crop.midline_x)
        lateral = dist > np.median(dist)
        posterior = w < np.median(w)
        vals = img[s_idx, h, w]
        for q, sel in quarters(lateral, posterior).items():
            row[f"crop_nm_{q}"] = float(vals[sel].mean()) if sel.any() else 0.0
    return row


def root_features(root: str, cache: Path, crop_cfg=None, roi_cache=None) -> list[dict]:
    """Feature rows (with ``case_id``, ``label``) of every labelled case of ``root``, cached.

    With ``crop_cfg`` (a ``RunConfig``) the rows also hold :func:`crop_features` of the
    crops ``roi_cache`` (a ``RoiCache``) gives under that config.
    """
    suffix = "_crops" if crop_cfg is not None else ""
    path = cache / f"{Path(root).name}{suffix}.csv"
    if path.is_file():
        return [
            {k: (v if k == "case_id" else float(v)) for k, v in r.items()} for r in read_csv(path)
        ]
    cfg = RoiConfig()
    labels = find_labels(root)
    rows = []
    for f in discover_cases(root):
        if f.case_id in labels:
            case = load_case(f)
            row = {"case_id": f.case_id, "label": labels[f.case_id], **case_features(case, cfg)}
            if crop_cfg is not None:
                row.update(crop_features(roi_cache.get_or_compute(f, crop_cfg)))
            rows.append(row)
    cache.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()  # full precision: the engine's write_csv rounds to 6 decimals
    w = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, text.getvalue())
    return rows


def oracle_accuracy(root: str, ids: list[str]) -> float:
    """The oracle's accuracy on the given cases (``phantom_latents.csv``)."""
    rows = read_csv(Path(root) / "phantom_latents.csv", ("case_id", "label", "oracle_p_pd"))
    lat = {r["case_id"]: r for r in rows}
    hits = [(float(lat[i]["oracle_p_pd"]) >= 0.5) == (int(lat[i]["label"]) == 1) for i in ids]
    return float(np.mean(hits))


def bootstrap(y: np.ndarray, p: np.ndarray, n: int, seed: int = 0) -> tuple[list, list]:
    """95 % intervals of accuracy and AUC over resampled cases."""
    rng = np.random.default_rng(seed)
    accs, aucs = [], []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        accs.append(np.mean((p[i] >= 0.5) == (y[i] == 1)))
        if 0 < y[i].sum() < len(i):
            aucs.append(roc_auc_score(y[i], p[i]))
    return list(np.percentile(accs, [2.5, 97.5])), list(np.percentile(aucs, [2.5, 97.5]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="+", help="TRAIN_ROOT [TRAIN_ROOT2 ...] TEST_ROOT")
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument(
        "--crops", metavar="PRESET", help="also features of the ROI crops of this preset"
    )
    ap.add_argument("--roi-cache", type=Path, help="ROI cache folder for --crops")
    ap.add_argument(
        "--subsets",
        type=int,
        default=0,
        help="also fit on K disjoint stratified subsets of each training root: mean +- sd",
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn's coming defaults
    *train_roots, test_root = args.roots
    crop_cfg = get_preset(args.crops) if args.crops else None
    roi_cache = RoiCache(args.roi_cache) if args.crops else None
    sets = {**FEATURE_SETS, **(CROP_SETS if args.crops else {})}
    test = root_features(test_root, args.cache, crop_cfg, roi_cache)
    y_test = np.array([r["label"] for r in test], int)
    print(
        f"test: {test_root} ({len(test)} cases); oracle accuracy "
        f"{oracle_accuracy(test_root, [r['case_id'] for r in test]):.3f}"
    )
    print("| training cases | features | accuracy [95 %] | AUC [95 %] | C |")
    print("|---|---|---|---|---|")
    for root in train_roots:
        train = root_features(root, args.cache, crop_cfg, roi_cache)
        y = np.array([r["label"] for r in train], int)
        for name, cols in sets.items():
            x = np.array([[r[c] for c in cols] for r in train])
            xt = np.array([[r[c] for c in cols] for r in test])
            model = fit(x, y)
            p = model.predict_proba(xt)[:, 1]
            acc = float(np.mean((p >= 0.5) == (y_test == 1)))
            auc = float(roc_auc_score(y_test, p))
            (alo, ahi), (ulo, uhi) = bootstrap(y_test, p, args.bootstrap)
            c = float(model[-1].C_[0])
            print(
                f"| {Path(root).name} ({len(train)}) | {name} | {100 * acc:.1f} % "
                f"[{100 * alo:.1f}, {100 * ahi:.1f}] | {auc:.3f} [{ulo:.3f}, {uhi:.3f}] | {c:.3g} |"
            )
        if args.subsets > 1:
            splits = StratifiedKFold(args.subsets, shuffle=True, random_state=0).split(x, y)
            parts = [part for _, part in splits]
            for name, cols in sets.items():
                x = np.array([[r[c] for c in cols] for r in train])
                xt = np.array([[r[c] for c in cols] for r in test])
                accs, aucs = [], []
                for part in parts:
                    p = fit(x[part], y[part]).predict_proba(xt)[:, 1]
                    accs.append(100 * np.mean((p >= 0.5) == (y_test == 1)))
                    aucs.append(roc_auc_score(y_test, p))
                print(
                    f"| {Path(root).name}, {len(parts)} disjoint subsets of {len(parts[0])} "
                    f"| {name} | {np.mean(accs):.1f} ± {np.std(accs, ddof=1):.1f} % "
                    f"| {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f} | |"
                )


def fit(x: np.ndarray, y: np.ndarray):
    """Standardised features -> L2 logistic regression, C by (up to) 5-fold CV on ``x`` only."""
    cv = min(5, int(np.bincount(y).min()))
    return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=cv, max_iter=5000)).fit(
        x, y
    )


if __name__ == "__main__":
    main()
