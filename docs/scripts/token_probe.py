"""Does a model's representation hold what hand-made nucleus features hold? Linear probes of
frozen representations, fitted on one labelled cohort and scored on another.

    python docs/scripts/token_probe.py TRAIN_ROOT TEST_ROOT --cache DIR --roi-cache DIR \
        NAME=bundle:BUNDLE NAME=weights:W.safetensors ...

``bundle:``: each fold model of a trained bundle gives the patient representation its
classification head reads (the four ROI tokens concatenated, ``MRNPredictor.predict_case``,
no TTA); the bundle's own calibrated ensemble is scored beside the probes.
``weights:``: the ``cpu-tiny`` ViT with these weights (e.g. ``mrn pretrain``'s), per-ROI mean
[CLS] pooled (``mrn_engine.pretraining.probe``, as ``docs/pretraining.md``'s probe).

Probe: ``StandardScaler`` + ``LogisticRegressionCV`` (C by 5-fold CV on the training cases),
fitted on TRAIN_ROOT's labelled cases, scored on TEST_ROOT (labels read only to score).
TRAIN_ROOT must be cases the models never trained on, or the probe reads overfitted
representations. Representations are kept in ``--cache/<name>_<root name>.npz``.
Compare with ``feature_ceiling.py`` on the same two folders (docs/results.md, issue 14).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from mrn_engine.config import get_preset
from mrn_engine.data.cases import discover_cases, find_labels, load_case
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.inference.predictor import MRNPredictor
from mrn_engine.pretraining.probe import embed_cases, vit_embedder
from mrn_engine.rois.cache import RoiCache


def labelled(root: str):
    labels = find_labels(root)
    files = [f for f in discover_cases(root) if f.case_id in labels]
    return files, np.array([labels[f.case_id] for f in files], int)


def bundle_representations(bundle: str, files) -> tuple[np.ndarray, np.ndarray]:
    """(folds, N, 4D) patient vectors per fold model and (N,) ensemble P(PD)."""
    pred = MRNPredictor.from_bundle(bundle, device="cpu", tta=False)
    reps, p = [], []
    for f in tqdm(files, desc=f"{Path(bundle).name}", leave=False):
        c = pred.predict_case(load_case(f), nuclei=False)
        reps.append([torch.cat([t[n][0] for n in ROI_NAMES]).numpy() for t in c.roi_tokens])
        p.append(c.p_pd)
    return np.transpose(np.array(reps), (1, 0, 2)), np.array(p)


def representations(spec: str, root: str, cache: Path, roi_cache: RoiCache) -> dict:
    """The cached representations of one arm (``bundle:B`` or ``weights:W``) on ``root``."""
    name, _, target = spec.partition("=")
    kind, _, path = target.partition(":")
    out = cache / f"{name}_{Path(root).name}.npz"
    if out.is_file():
        with np.load(out) as d:
            return dict(d)
    files, y = labelled(root)
    if kind == "bundle":
        reps, p = bundle_representations(path, files)
        data = {"reps": reps, "p": p, "y": y}
    elif kind == "weights":
        cfg = get_preset("cpu-tiny")
        x = embed_cases(vit_embedder(cfg, path), files, cfg, roi_cache)
        data = {"reps": x[None], "y": y}
    else:
        raise SystemExit(f"{spec}: expected NAME=bundle:DIR or NAME=weights:FILE")
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, **data)
    return data


def scores(y: np.ndarray, p: np.ndarray) -> str:
    return f"{100 * np.mean((p >= 0.5) == (y == 1)):.1f} % | {roc_auc_score(y, p):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train_root")
    ap.add_argument("test_root")
    ap.add_argument("arms", nargs="+", help="NAME=bundle:DIR or NAME=weights:FILE")
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--roi-cache", required=True, type=Path)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn's coming defaults
    torch.set_num_threads(1)
    roi_cache = RoiCache(args.roi_cache)
    print(f"probe fitted on {args.train_root}, scored on {args.test_root}")
    print("| arm | representation | accuracy | AUC |")
    print("|---|---|---|---|")
    for spec in args.arms:
        name = spec.partition("=")[0]
        tr = representations(spec, args.train_root, args.cache, roi_cache)
        te = representations(spec, args.test_root, args.cache, roi_cache)
        if "p" in te:
            print(f"| {name} | the bundle's own ensemble (no probe) | {scores(te['y'], te['p'])} |")
        for k in range(len(tr["reps"])):
            model = make_pipeline(
                StandardScaler(),
                LogisticRegressionCV(
                    Cs=10, cv=min(5, int(np.bincount(tr["y"]).min())), max_iter=5000
                ),
            ).fit(tr["reps"][k], tr["y"])
            p = model.predict_proba(te["reps"][k])[:, 1]
            what = f"fold {k} patient vector" if "p" in te else "pooled ViT embedding"
            print(f"| {name} | probe on {what} | {scores(te['y'], p)} |")


if __name__ == "__main__":
    main()
