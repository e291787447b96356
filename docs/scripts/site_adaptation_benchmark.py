"""Site harmonisation from local controls (``mrn site-adapt``) on the transfer cohorts.

    python docs/scripts/site_adaptation_benchmark.py BUNDLE OUT_DIR NAME=DIR [NAME=DIR ...] \
        [--train-root DIR] [--controls 5,10] [--repeats 20] [--threads 1]

For each labelled test cohort ``NAME=DIR`` (one scanner each): every case's patient vectors
are computed once (one diagnosis-only prediction per case, all folds). Then, ``--repeats``
times, the cohort is split in two stratified halves; the site shift is fitted on ``n``
controls (HC) drawn from one half (``--controls``) and the other half is scored, and vice
versa, so no case is ever scored by a shift it helped fit. The training anchor is every fold's
own training controls (``--train-root``, default the bundle's ``cohort_root``).

Scored per cohort: accuracy, ROC AUC and the predicted PD share of (a) the bundle as trained
and (b) with the site shift; and (c) the shift's accuracy on **imbalanced** target halves
(every PD case, a third of the HC cases: PD share 0.75), since a shift anchored on controls
must not depend on the site's PD prevalence. The fitted shift equals ``mrn site-adapt``'s
(the same ``fit_site_adaptation``); P(PD) = the head on the shifted patient vector, then the
bundle's calibration, as ``MRNPredictor`` does (tested in tests/test_site_adaptation.py).

Writes ``OUT_DIR/site_adaptation.json``, ``.md`` and ``site_adaptation.png`` (P(PD) per cohort
before/after).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def _score(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan")
    return {
        "accuracy": float(np.mean((p >= 0.5) == y)),
        "auc": auc,
        "pd_share": float(np.mean(p >= 0.5)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("cohorts", nargs="+", help="NAME=DIR labelled test cohorts")
    ap.add_argument("--train-root", type=Path, default=None)
    ap.add_argument("--controls", default="5,10", help="reference controls per fit")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anchor", choices=("val", "train"), default="val")
    ap.add_argument(
        "--anchor-extra",
        type=Path,
        action="append",
        default=[],
        help="labelled training-site cohort no fold trained on: its controls join every anchor",
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from mrn_engine.data import discover_cases, find_labels, load_case
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.inference.site_adaptation import (
        anchors_from_vectors,
        fit_site_adaptation,
        head_p_pd,
        patient_vectors,
    )
    from mrn_engine.workflows.site_adaptation import resolve_train_root, training_controls

    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "vectors.pt"
    vectors: dict[str, dict] = torch.load(cache) if cache.is_file() else {}
    predictor = MRNPredictor.from_bundle(args.bundle, device="cpu")
    root = resolve_train_root(predictor, args.train_root)
    per_fold = training_controls(predictor, root, args.anchor)

    def vecs(tag: str, folder: Path, ids: list[str]) -> dict:
        if tag not in vectors:
            files = {c.case_id: c for c in discover_cases(folder)}
            vectors[tag] = patient_vectors(predictor, (load_case(files[c]) for c in ids), len(ids))
            torch.save(vectors, cache)
            print(f"{tag}: {len(ids)} cases, {time.time() - t0:.0f} s", flush=True)
        return vectors[tag]

    train_ids = sorted({c for ids in per_fold.values() for c in ids})
    train_vec = dict(vecs(f"train-controls-{args.anchor}", root, train_ids))
    for extra in args.anchor_extra:
        labels = find_labels(extra)
        hc = sorted(c for c, y in labels.items() if y == 0)
        ev = vecs(f"anchor-extra-{extra.resolve()}", extra, hc)
        train_vec |= {f"{extra}/{c}": ev[c] for c in hc}
        per_fold = {k: [*ids, *(f"{extra}/{c}" for c in hc)] for k, ids in per_fold.items()}
    anchors = anchors_from_vectors(train_vec, per_fold)
    rng = np.random.default_rng(args.seed)
    n_controls = [int(v) for v in args.controls.split(",")]
    results: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    for spec in args.cohorts:
        name, folder = spec.split("=", 1)
        folder = Path(folder)
        labels = find_labels(folder)
        ids = sorted(labels)
        y = np.array([labels[c] for c in ids])
        v = vecs(name, folder, ids)
        p_plain = np.asarray(head_p_pd(predictor, v, ids))
        res = {"n": len(ids), "n_pd": int(y.sum()), "trained": _score(y, p_plain)}
        curves[name] = {"y": y.tolist(), "plain": p_plain.tolist()}
        for n_c in n_controls:
            runs, imbalanced, p_last = [], [], None
            for _ in range(args.repeats):
                hc = rng.permutation(np.flatnonzero(y == 0))
                pd = rng.permutation(np.flatnonzero(y == 1))
                halves = [
                    np.r_[hc[: len(hc) // 2], pd[: len(pd) // 2]],
                    np.r_[hc[len(hc) // 2 :], pd[len(pd) // 2 :]],
                ]
                p = np.full(len(ids), np.nan)
                imb_y, imb_p = [], []
                for h in (0, 1):
                    ref, tgt = halves[h], halves[1 - h]
                    ref_hc = [ids[i] for i in ref if y[i] == 0][:n_c]
                    fitted = fit_site_adaptation(anchors, v, ref_hc)
                    tgt_ids = [ids[i] for i in tgt]
                    p[tgt] = head_p_pd(predictor, v, tgt_ids, fitted)
                    keep_hc = [i for i in tgt if y[i] == 0][: max(1, (y[tgt] == 0).sum() // 3)]
                    keep = [i for i in tgt if y[i] == 1] + keep_hc
                    imb_y += y[keep].tolist()
                    imb_p += p[keep].tolist()
                runs.append(_score(y, p))
                imbalanced.append(_score(np.array(imb_y), np.array(imb_p)))
                p_last = p
            res[f"site shift, {n_c} controls"] = {
                k: float(np.mean([r[k] for r in runs])) for k in runs[0]
            } | {f"{k}_sd": float(np.std([r[k] for r in runs])) for k in runs[0]}
            res[f"site shift, {n_c} controls, target 3:1 PD"] = {
                k: float(np.mean([r[k] for r in imbalanced])) for k in ("accuracy", "pd_share")
            } | {"true_pd_share": float(np.mean(imb_y))}
            curves[name][f"{n_c} controls"] = p_last.tolist()
        results[name] = res
        print(name, json.dumps(res, indent=1), flush=True)

    meta = {
        "bundle": str(args.bundle),
        "train_root": str(root),
        "repeats": args.repeats,
        "anchor": args.anchor,
        "anchor_extra": [str(p) for p in args.anchor_extra],
        "controls": n_controls,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
    }
    (args.out / "site_adaptation.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1)
    )
    lines = [
        "| cohort | n | scoring | accuracy | AUC | predicted PD share |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for key, r in res.items():
            if not isinstance(r, dict):
                continue
            sd = f" ± {r['accuracy_sd']:.3f}" if "accuracy_sd" in r else ""
            auc = f"{r['auc']:.3f}" if "auc" in r else "-"
            share = f"{r['pd_share']:.2f}" + (
                f" (true {r['true_pd_share']:.2f})" if "true_pd_share" in r else ""
            )
            lines.append(
                f"| {name} | {res['n']} | {key} | {r['accuracy']:.3f}{sd} | {auc} | {share} |"
            )
    (args.out / "site_adaptation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _figure(curves, args.out / "site_adaptation.png")


def _figure(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.4), squeeze=False)
    for ax, (name, c) in zip(axes[0], curves.items(), strict=True):
        y = np.array(c["y"])
        cols = [k for k in c if k not in ("y",)]
        for x, key in enumerate(cols):
            p = np.array(c[key])
            jitter = np.random.default_rng(x).uniform(-0.15, 0.15, len(p))
            for label, colour in ((0, "tab:blue"), (1, "tab:red")):
                sel = y == label
                ax.scatter(
                    x + jitter[sel],
                    p[sel],
                    s=10,
                    c=colour,
                    alpha=0.7,
                    label=("HC" if label == 0 else "PD") if x == 0 else None,
                )
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_xticks(
            range(len(cols)), ["as trained" if k == "plain" else f"shift\n{k}" for k in cols]
        )
        ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.set_ylabel("P(PD)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Site shift from local controls: P(PD) per case (dashed: threshold)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
