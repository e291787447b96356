"""Train tiny nnU-Net NM and QSM models on cropped phantoms on CPU and score them on held-out ones.

The figures of docs/segmentation.md ("Measured 2026-11-26") come from::

    mrn demo --out /tmp/demo --threads 1                     # makes the two phantom cohorts
    python docs/scripts/seg_phantoms_cpu.py --cohort /tmp/demo/cohort --heldout /tmp/demo/heldout \
        --out /tmp/seg_cpu --train-cases 24 --test-cases 8 --epochs 150 --iters 20

Each phantom is cropped to the box of its nuclei (+ 4 voxels) and halved in-plane (the
``crop_case`` helper of tests/test_segmentation_nnunet.py), so a tiny nnU-Net (``--tiny``) trains
in about half an hour per modality on one CPU core. Then ``mrn seg predict`` and
``mrn seg evaluate`` on the held-out crops.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from mrn_engine.data import discover_cases  # noqa: E402
from mrn_engine.segmentation import SegTrainConfig, train_segmentation  # noqa: E402
from test_segmentation_nnunet import crop_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=Path, required=True, help="labelled phantoms (training)")
    ap.add_argument("--heldout", type=Path, required=True, help="held-out phantoms (scoring)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-cases", type=int, default=24)
    ap.add_argument("--test-cases", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--iters", type=int, default=20, help="iterations per epoch")
    args = ap.parse_args()
    out: Path = args.out
    if not (out / "train").exists():
        for cf in discover_cases(args.cohort)[: args.train_cases]:
            crop_case(cf.folder, out / "train" / cf.case_id)
        for cf in discover_cases(args.heldout)[: args.test_cases]:
            crop_case(cf.folder, out / "heldout" / cf.case_id)
            crop_case(cf.folder, out / "heldout_images" / cf.case_id, masks=False)
    cfg = SegTrainConfig(
        tiny=True, epochs=args.epochs, iters_per_epoch=args.iters, val_iters_per_epoch=1,
        device="cpu", threads=1,
    )  # fmt: skip
    for modality in ("nm", "qsm"):
        t0 = time.time()
        train_segmentation(
            out / "train", out / "ws", modality=modality, cfg=cfg, bundle=out / "bundle",
            progress=False,
        )  # fmt: skip
        print(f"{modality}: trained in {time.time() - t0:.0f} s", flush=True)
    pred = out / "pred"
    subprocess.run(
        ["mrn", "seg", "predict", str(out / "heldout_images"), "--model", str(out / "bundle"),
         "--out", str(pred), "--no-mirroring", "--device", "cpu", "--quiet"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["mrn", "seg", "evaluate", str(pred), str(out / "heldout"), "--out",
         str(out / "scores_heldout.csv"), "--quiet"],
        check=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
