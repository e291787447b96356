"""Would a scale term help the site shift? (docs/results.md, issue 13, "Tried: a larger anchor
and a scale term")

    python docs/scripts/site_scale_check.py BUNDLE SA_DIR HELDOUT NAME=DIR [NAME=DIR ...]

``SA_DIR`` is an output folder of ``site_adaptation_benchmark.py ... --anchor-extra HELDOUT``
(its ``vectors.pt`` holds every case's patient vectors; nothing is predicted again). Per
cohort, 20 stratified split halves as in that benchmark, 10 reference controls: the location
shift alone (``mrn site-adapt``), and the location shift followed by a scale of the calibrated
ensemble logit about the site controls' mean,
``s = sd(logit | HELDOUT's controls) / sd(logit | the site's reference controls)``: the
held-out controls are the only training-site controls no fold trained on. Prints accuracy,
predicted PD share and the spread of ``s``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mrn_engine.data import find_labels
from mrn_engine.inference import MRNPredictor
from mrn_engine.inference.site_adaptation import (
    anchors_from_vectors,
    fit_site_adaptation,
    head_p_pd,
)
from mrn_engine.workflows.site_adaptation import resolve_train_root, training_controls


def _logit(p: list[float]) -> np.ndarray:
    q = np.clip(np.asarray(p), 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


def main() -> None:
    bundle, sa_dir, heldout, cohorts = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    torch.set_num_threads(1)
    pred = MRNPredictor.from_bundle(bundle, device="cpu")
    vectors = torch.load(sa_dir / "vectors.pt", weights_only=True)
    per_fold = training_controls(pred, resolve_train_root(pred, None), "val")
    anchors = anchors_from_vectors(vectors["train-controls-val"], per_fold)
    held = vectors[f"anchor-extra-{Path(heldout).resolve()}"]
    sd_anchor = _logit(head_p_pd(pred, held, sorted(held))).std(ddof=1)
    rng = np.random.default_rng(0)
    for spec in cohorts:
        name, folder = spec.split("=", 1)
        labels = find_labels(folder)
        ids = sorted(labels)
        y = np.array([labels[c] for c in ids])
        v = vectors[name]
        acc: dict[str, list[float]] = {"shift": [], "shift+scale": []}
        share: dict[str, list[float]] = {"shift": [], "shift+scale": []}
        scales = []
        for _ in range(20):
            hc, pd = (
                rng.permutation(np.flatnonzero(y == 0)),
                rng.permutation(np.flatnonzero(y == 1)),
            )
            halves = [
                np.r_[hc[: len(hc) // 2], pd[: len(pd) // 2]],
                np.r_[hc[len(hc) // 2 :], pd[len(pd) // 2 :]],
            ]
            p = {m: np.full(len(ids), np.nan) for m in acc}
            for h in (0, 1):
                ref, tgt = halves[h], halves[1 - h]
                ref_hc = [ids[i] for i in ref if y[i] == 0][:10]
                tgt_ids = [ids[i] for i in tgt]
                fitted = fit_site_adaptation(anchors, v, ref_hc)
                lr = _logit(head_p_pd(pred, v, ref_hc, fitted))
                lt = _logit(head_p_pd(pred, v, tgt_ids, fitted))
                s = sd_anchor / lr.std(ddof=1)
                scales.append(s)
                p["shift"][tgt] = 1 / (1 + np.exp(-lt))
                p["shift+scale"][tgt] = 1 / (1 + np.exp(-(lr.mean() + s * (lt - lr.mean()))))
            for m in acc:
                acc[m].append(float(np.mean((p[m] >= 0.5) == y)))
                share[m].append(float(np.mean(p[m] >= 0.5)))
        cells = "  ".join(
            f"{m}: acc {np.mean(acc[m]):.3f} ± {np.std(acc[m]):.3f}, share {np.mean(share[m]):.2f}"
            for m in acc
        )
        q = np.percentile(scales, [10, 50, 90])
        print(f"{name:8s} {cells}  s: median {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}]", flush=True)


if __name__ == "__main__":
    main()
