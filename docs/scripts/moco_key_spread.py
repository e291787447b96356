"""mSupMoCo key spread on a small phantom cohort: fixed EMA momentum vs the run-length half-life.

Trains fold 0 of a 2-fold cpu-tiny run (image 28, 2 pretraining + N full epochs) once with
``moco_half_life`` (momentum from the planned steps) and once with the fixed 0.999, and prints
each epoch's within-class and between-class mean cosine of the memory-bank keys
(``key_cos_within`` / ``key_cos_between`` in metrics.csv).

    python docs/scripts/moco_key_spread.py --cases 32 --epochs 12 --out /tmp/moco_keys
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from mrn_engine.config import get_preset
from mrn_engine.phantom import generate_cohort
from mrn_engine.training import cv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("moco_keys"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.out / "cohort"
    if not (root / "train_cases.csv").exists():
        generate_cohort(root, n=args.cases, seed=args.seed, workers=1, progress=False)
    for name, half_life, momentum in (("half-life 0.05", 0.05, 0.99), ("fixed 0.999", None, 0.999)):
        cfg = get_preset("cpu-tiny").replace(
            roi={"image_size": 28},
            model={"moco_half_life": half_life, "moco_momentum": momentum},
            train={"pretrain_epochs": 2, "epochs": args.epochs, "folds": 2},
        )
        run = args.out / name.replace(" ", "_")
        cv.train_bundle(root, run, cfg, folds=[0], cache_dir=args.out / "cache", progress=False)
        rows = list(csv.DictReader((run / "fold_0" / "metrics.csv").open()))
        print(f"\n{name}: epoch, stage, loss_con, key_cos_within, key_cos_between, val_auc")
        for r in rows:
            print(
                f"{r['epoch']:>3} {r['stage']:<8} {float(r['loss_con']):.3f} "
                f"{float(r['key_cos_within']):.3f} {float(r['key_cos_between']):.3f} "
                f"{float(r['val_auc']):.3f}"
            )


if __name__ == "__main__":
    main()
