"""Train one cpu-tiny arm (a setting, or a `mrn compare` variant) and score it per fold.

    python docs/scripts/training_arm.py --cohort C --cache C_CACHE --out DIR --seed 1 \
        [--lr-backbone 3e-5] [--folds 3] [--variant seres10-moco] [--model use_sfa=false] \
        [--roi image_size=112] [--train augment_intensity=false] \
        --heldout demo=H1 --heldout new=H2

Used for docs/results.md "Backbone learning rate 3e-4 -> 3e-5": the preset's folds (5 for
cpu-tiny) on the labelled cases of ``--cohort``, then the fold ensemble (and every fold model
alone) on each labelled ``--heldout`` folder. Writes ``DIR/arm.json``: out-of-fold accuracy /
ROC AUC, and per held-out set the ensemble's accuracy, AUC and predicted PD share and each fold
model's AUC (a fold at or below 0.5 has not learned). ``--score-only`` re-scores an existing
``DIR`` bundle with the settings it was trained with (``DIR/config.json``), keeping what the
training run recorded in ``arm.json`` (variant, overrides, ``train_seconds``). The labels of
the held-out folders are used only to score.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mrn_engine.config import RunConfig, get_preset
from mrn_engine.inference.predictor import MRNPredictor
from mrn_engine.training.cv import train_bundle
from mrn_engine.workflows.compare import variant_config
from mrn_engine.workflows.evaluate import oof_metrics, score_folder

#: arm.json fields of the training run that ``--score-only`` keeps
RECORDED_BY_TRAINING = ("variant", "model", "roi", "train", "train_seconds")


def _overrides(pairs: list[str]) -> dict[str, object]:
    """``["KEY=JSON", ...]`` -> ``{KEY: value}`` (a config section override)."""
    return {k: json.loads(v) for k, v in (p.split("=", 1) for p in pairs)}


def _arm_config(args: argparse.Namespace, model: dict, roi: dict, train_set: dict) -> RunConfig:
    """``cpu-tiny`` with the command line's training settings, variant and overrides."""
    train = {"seed": args.seed, "device": "cpu"}
    if args.lr_backbone is not None:
        train["lr_backbone"] = args.lr_backbone
    if args.folds is not None:
        train["folds"] = args.folds
    train.update(train_set)
    cfg = get_preset("cpu-tiny").replace(train=train)
    if args.variant:
        cfg = variant_config(cfg, args.variant)
    if model:
        cfg = cfg.replace(model=model)
    if roi:
        cfg = cfg.replace(roi=roi)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lr-backbone", type=float)
    ap.add_argument("--folds", type=int, help="number of folds (default: the preset's)")
    ap.add_argument("--variant", help="a mrn compare variant (default: the preset's MRN)")
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        help="KEY=VALUE override of the model section, e.g. use_moco=false (repeatable)",
    )
    ap.add_argument(
        "--roi",
        action="append",
        default=[],
        help="KEY=VALUE override of the roi section, e.g. image_size=112 (repeatable)",
    )
    ap.add_argument(
        "--train",
        action="append",
        default=[],
        help="KEY=VALUE override of the train section, e.g. augment_intensity=false (repeatable)",
    )
    ap.add_argument("--heldout", action="append", default=[], help="NAME=DIR (repeatable)")
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, roi, train_set = _overrides(args.model), _overrides(args.roi), _overrides(args.train)
    arm_json = args.out / "arm.json"
    train_seconds = None
    if args.score_only:  # the bundle's own settings
        cfg = RunConfig.load(args.out / "config.json")
    else:
        cfg = _arm_config(args, model, roi, train_set)
        t0 = time.time()
        train_bundle(args.cohort, args.out, cfg, cache_dir=args.cache, progress=False)
        train_seconds = round(time.time() - t0, 1)
    t1 = time.time()
    oof = oof_metrics(args.out)
    predictor = MRNPredictor.from_bundle(args.out, device="cpu")
    result = {
        "seed": cfg.train.seed,
        "lr_backbone": cfg.train.lr_backbone,
        "folds": cfg.train.folds,
        "variant": args.variant or "mrn",
        "model": model,
        "roi": roi,
        "train": train_set,
        "oof": {"accuracy": oof["accuracy"], "auc": oof["auc"], "n": oof["n"]},
        "heldout": {
            name: {k: v for k, v in score_folder(predictor, root).items() if k != "rows"}
            for name, root in (h.split("=", 1) for h in args.heldout)
        },
        "train_seconds": train_seconds,
        "score_seconds": round(time.time() - t1, 1),
    }
    if args.score_only and arm_json.exists():  # what the training run recorded stays
        before = json.loads(arm_json.read_text())
        result.update({k: before[k] for k in RECORDED_BY_TRAINING if k in before})
    text = json.dumps(result, indent=1)
    print(text)
    arm_json.write_text(text)


if __name__ == "__main__":
    main()
