"""Short AnatCL runs of the cpu-tiny ViT under several settings: does the loss leave the
collapsed value? (docs/pretraining.md, "Why the ViT's loss sat at the collapsed value")

    python docs/scripts/pretrain_collapse.py COHORT CACHE STEPS base aug=0 aug=geom tau=0.5 ...

Each setting: ``aug`` = 1 (the training augmentation without the mirror, ``--augment full``),
0 (no augmentation) or ``geom`` (``--augment geometric``); ``tau`` (temperature), ``lr``,
``sigma``; ``desc`` = ``all`` (default), ``novol`` (no volume or volume asymmetry), ``vol``
(volumes only) or ``nm`` (the NM SN's mean contrast and its asymmetry); ``inst`` = weight
``w`` of an instance term: the loss is ``(1 - w) * AnatCL + w * NT-Xent`` (the same
InfoNCE with only the two views of a case as positives), and ``anatcl_last10`` reports the
AnatCL part alone; ``only`` = ROI names joined by ``+``: the other ROIs' images are replaced
by zeros (which ROI's crops does the network learn from?); ``perroi=1``: one projection head
per ROI, each with the kernel of the nuclei inside that ROI only, losses averaged
(``mrn pretrain --variant roi``; the ``desc`` setting is then ignored).: which descriptors the kernel reads. Same seed, batch 16, global kernel, STEPS optimiser steps. Prints per setting the
mean loss of the first and last 10 steps, the collapsed value log(2B - 1), and the spread of
the pooled backbone features over 32 un-augmented cases relative to their mean (a collapsed
backbone gives every case nearly the same features).
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from mrn_engine.config import get_preset
from mrn_engine.models.yaware import anatcl_loss, yaware_loss
from mrn_engine.pretraining.cohort import load_pretrain_cohort
from mrn_engine.pretraining.data import TwoViewDataset
from mrn_engine.pretraining.descriptors import (
    descriptor_names,
    roi_groups,
    standardise,
)
from mrn_engine.pretraining.encoder import build_embedder
from mrn_engine.rois.cache import RoiCache, config_hash
from mrn_engine.runtime import seed_everything
from mrn_engine.training.cv import roi_loader
from mrn_engine.training.objective import reset_layerscale

BATCH = 16


def main() -> None:
    root, cache_dir, steps, settings = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    torch.set_num_threads(1)
    cfg = get_preset("cpu-tiny")
    cache = RoiCache(cache_dir)
    memo = cache.root / f"descriptors_{config_hash(cfg.roi)}.json"
    cohort = load_pretrain_cohort(root, cfg.roi, None, memo_file=memo, progress=False)
    names = descriptor_names(with_age=False)
    std = standardise(cohort.descriptors, names)
    columns = {
        "all": list(range(len(names))),
        "novol": [i for i, n in enumerate(names) if "volume" not in n],
        "vol": [i for i, n in enumerate(names) if n.endswith(".volume")],
        "nm": [i for i, n in enumerate(names) if n.startswith("NM_SN.") and "volume" not in n],
    }
    desc_all = torch.from_numpy(std.matrix)
    for spec in settings:
        o = dict(kv.split("=") for kv in spec.split(",")) if spec != "base" else {}
        seed_everything(1)
        per_roi = o.get("perroi") == "1"
        model = build_embedder(cfg, "vit", per_roi=per_roi)
        reset_layerscale(model, 1.0)
        opt = torch.optim.AdamW(model.parameters(), lr=float(o.get("lr", 3e-4)), weight_decay=0.05)
        aug = o.get("aug", "1")
        desc = torch.from_numpy(std.matrix[:, columns[o.get("desc", "all")]])
        ds = TwoViewDataset(
            std.case_ids, roi_loader(cohort.files, cfg, cache), seed=1, intensity=aug != "geom"
        )
        if aug == "0":
            ds.augmenter = lambda rois, key: rois
        losses: list[float] = []
        anatcl: list[float] = []
        inst = float(o.get("inst", 0.0))
        t0, epoch = time.time(), 0
        while len(losses) < steps:
            ds.set_epoch(epoch)
            epoch += 1
            gen = torch.Generator().manual_seed(epoch)
            for b in DataLoader(ds, BATCH, shuffle=True, collate_fn=default_collate,
                                drop_last=True, generator=gen):  # fmt: skip
                views = {n: torch.cat([b["v0"][n], b["v1"][n]]) for n in b["v0"]}
                if "only" in o:
                    keep = o["only"].split("+")
                    views = {n: x if n in keep else torch.zeros_like(x) for n, x in views.items()}
                z = model(views)
                tau = float(o.get("tau", 0.1))
                loss = anatcl_loss(
                    z,
                    desc_all[b["index"]] if per_roi else desc[b["index"]],
                    sigma=float(o.get("sigma", 0.5)),
                    temperature=tau,
                    variant="roi" if per_roi else "global",
                    groups=list(roi_groups(names).values()) if per_roi else None,
                )
                anatcl.append(loss.item())
                if inst:
                    same = torch.eye(len(b["index"])).repeat(2, 2)
                    loss = (1 - inst) * loss + inst * yaware_loss(z, same, tau)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if len(losses) >= steps:
                    break
        model.eval()
        ds.augmenter = lambda rois, key: rois
        with torch.no_grad():
            f = model.features(default_collate([ds[i] for i in range(32)])["v0"])
        spread = float(f.std(0).norm() / f.mean(0).norm())
        print(json.dumps({
            "setting": spec,
            "loss_first10": round(float(np.mean(losses[:10])), 3),
            "loss_last10": round(float(np.mean(losses[-10:])), 3),
            "anatcl_last10": round(float(np.mean(anatcl[-10:])), 3),
            "collapsed": round(math.log(2 * BATCH - 1), 3),
            "feature_spread": round(spread, 4),
            "seconds": round(time.time() - t0),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
