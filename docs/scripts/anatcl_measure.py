"""Measure AnatCL pretraining (docs/pretraining.md): linear probe and downstream ensembles.

    PYTHONPATH=src python docs/scripts/anatcl_measure.py probe --cohort C --heldout H \
        --weights W.safetensors --out DIR
    PYTHONPATH=src python docs/scripts/anatcl_measure.py train --cohort C --heldout H \
        [--weights W.safetensors] --out DIR/arm --folds 2 --epochs 8 --seed 1

``probe``: linear-probe ROC AUC (PD vs HC; labels used only to score) of the cpu-tiny ViT's
pooled embedding, from random initialisation and from ``--weights``: 5-fold out-of-fold AUC on
the cohort and the AUC on the held-out cases of a probe fitted on the whole cohort.
``compare3d``: ``mrn compare --variants anatcl3d`` (AnatCL pretraining of the 3D ResNet-18 for
``--pretrain-epochs`` epochs, then the same folds / epochs / seed as ``train``).
``train``: a cpu-tiny ensemble (same folds and seeds whatever the weights) and its out-of-fold
and held-out scores. Results are JSON files under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mrn_engine.config import get_preset
from mrn_engine.data.cases import discover_cases, find_labels
from mrn_engine.pretraining.probe import embed_cases, probe_auc, vit_embedder
from mrn_engine.rois.cache import RoiCache
from mrn_engine.training.cv import train_bundle
from mrn_engine.workflows.evaluate import heldout_metrics, oof_metrics


def labelled(root: str):
    labels = find_labels(root)
    files = [f for f in discover_cases(root) if f.case_id in labels]
    return files, [labels[f.case_id] for f in files]


def probe(args) -> dict:
    cfg = get_preset(args.preset)
    cache = RoiCache(args.cache)
    fx, y = labelled(args.cohort)
    hx, hy = labelled(args.heldout)
    out = {}
    runs = [("random_init", None)] + [(w, w) for w in args.weights.split(",")]
    for name, weights in runs:
        model = vit_embedder(cfg, weights, seed=args.seed)
        xa, xh = embed_cases(model, fx, cfg, cache), embed_cases(model, hx, cfg, cache)
        out[name] = probe_auc(xa, y, xh, hy, seed=args.seed)
        print(name, out[name], flush=True)
    return out


def train(args) -> dict:
    model = {"backbone_weights": args.weights}
    train = {"folds": args.folds, "epochs": args.epochs, "seed": args.seed, "device": "cpu"}
    if args.arch == "anatcl3d":  # as mrn compare's variant: no MRN pretraining stage
        model.update(arch="anatcl3d", use_moco=False)
        train["pretrain_epochs"] = 0
    cfg = get_preset(args.preset).replace(train=train, model=model)
    t0 = time.time()
    train_bundle(args.cohort, args.out, cfg, cache_dir=args.cache, progress=not args.quiet)
    oof = oof_metrics(args.out)
    held = heldout_metrics(args.out, args.heldout, device="cpu", progress=not args.quiet)
    keep = ("accuracy", "auc", "f1", "n")
    return {
        "weights": args.weights,
        "arch": args.arch,
        "folds": args.folds,
        "epochs": f"{cfg.train.pretrain_epochs}+{args.epochs}",
        "seed": args.seed,
        "oof": {k: oof[k] for k in keep},
        "heldout": {k: held[k] for k in keep},
        "seconds": round(time.time() - t0, 1),
    }


def compare3d(args) -> dict:
    from mrn_engine.pretraining.loop import PretrainOptions
    from mrn_engine.workflows.compare import compare_variants

    cfg = get_preset(args.preset).replace(
        train={"folds": args.folds, "epochs": args.epochs, "seed": args.seed, "device": "cpu"}
    )
    t0 = time.time()
    opts = PretrainOptions(arch="anatcl3d", epochs=args.pretrain_epochs)
    rows = compare_variants(
        args.cohort,
        args.out,
        cfg,
        ["anatcl3d"],
        heldout_root=args.heldout,
        progress=not args.quiet,
        anatcl=opts,
    )
    return {"rows": rows, "pretrain_epochs": args.pretrain_epochs, "seconds": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["probe", "train", "compare3d"])
    p.add_argument("--cohort", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--weights", help="probe: comma-separated weights files")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", required=True, help="ROI cache folder")
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--arch", default="mrn", choices=["mrn", "anatcl3d"], help="train: network")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pretrain-epochs", type=int, default=12, help="compare3d: AnatCL epochs")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {"probe": probe, "train": train, "compare3d": compare3d}[args.what](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.what}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
