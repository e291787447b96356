"""Site harmonisation from local controls (``mrn site-adapt``) on the transfer cohorts.

    python docs/scripts/site_adaptation_benchmark.py BUNDLE OUT_DIR NAME=DIR [NAME=DIR ...] \
        [--train-root DIR] [--controls 5,10] [--repeats 20] [--threads 1] [--same-site NAME]

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

With ``--same-site NAME`` (the cohort of the training site), each shifted row also gets 95 %
intervals from resampling the cases: for the predicted PD share, and for the accuracy gap to
``NAME``. The gap is paired (case by case) when the two cohorts hold the same subjects
(``mrn phantom`` with the same ``--seed``/``--n`` and another ``--site``: travelling
subjects), and independent otherwise.

Writes ``OUT_DIR/site_adaptation.json``, ``.md``, ``site_adaptation.png`` (P(PD) per cohort
before/after) and ``per_case.csv`` (per case: P(PD) as trained, and per number of controls its
share of PD calls and its mean P(PD) over the repeated splits; ``site_difficulty.py`` pairs two
bundles with it).
"""

from __future__ import annotations

import argparse
import csv
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


def _same_subjects(a: Path, b: Path) -> bool:
    """True when two phantom cohorts hold the same subjects (same seed and size, any site).

    Their latents (severity, age, nucleus susceptibilities, ...) are then identical; with
    ``--nuclei`` or ``--geometry`` differing, so is everything but the nuclei's shape.
    """
    try:
        sa, sb = (json.loads((f / "phantom.json").read_text()) for f in (a, b))
    except (OSError, ValueError):
        return False
    keys = ("seed", "n", "effect", "val_fraction")
    return all(sa.get(k) == sb.get(k) for k in keys)


def _case_intervals(
    y: np.ndarray,
    pd_rate: np.ndarray,
    same_site: tuple[np.ndarray, np.ndarray] | None,
    paired: bool,
    rng: np.random.Generator,
    draws: int = 4000,
) -> dict:
    """95 % intervals from resampling the cases (stratified by label), on top of the splits.

    ``pd_rate`` is each case's share of PD calls over the repeated splits, so an interval says
    how far another cohort of the same size could move the figure. With ``same_site`` also
    the accuracy gap to that cohort: resampled with the same subjects when ``paired``,
    independently otherwise.
    """
    groups = [np.flatnonzero(y == c) for c in (0, 1)]
    picks = [np.concatenate([rng.choice(g, g.size) for g in groups]) for _ in range(draws)]
    correct = np.where(y == 1, pd_rate, 1.0 - pd_rate)
    share = np.array([pd_rate[i].mean() for i in picks])
    out = {"pd_share_ci": [float(v) for v in np.percentile(share, [2.5, 97.5])]}
    if same_site is None:
        return out
    y_ref, rate_ref = same_site
    correct_ref = np.where(y_ref == 1, rate_ref, 1.0 - rate_ref)
    if paired:
        gap = np.array([correct[i].mean() - correct_ref[i].mean() for i in picks])
    else:
        ref_groups = [np.flatnonzero(y_ref == c) for c in (0, 1)]
        gap = np.array(
            [
                correct[i].mean()
                - correct_ref[np.concatenate([rng.choice(g, g.size) for g in ref_groups])].mean()
                for i in picks
            ]
        )
    return out | {
        "gap": float(correct.mean() - correct_ref.mean()),
        "gap_ci": [float(v) for v in np.percentile(gap, [2.5, 97.5])],
        "gap_paired": paired,
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
        "--same-site",
        default=None,
        help="NAME of the training-site cohort: gaps to it get 95 %% case-bootstrap intervals",
    )
    ap.add_argument(
        "--anchor-extra",
        type=Path,
        action="append",
        default=[],
        help="labelled training-site cohort no fold trained on: its controls join every anchor",
    )
    args = ap.parse_args()
    names = [spec.split("=", 1)[0] for spec in args.cohorts]
    if args.same_site is not None and args.same_site not in names:
        ap.error(f"--same-site {args.same_site}: not one of the cohorts ({', '.join(names)})")

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
    per_case: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    mean_p: dict[tuple[str, int], np.ndarray] = {}
    case_rows: list[dict] = []
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
            runs, imbalanced, p_last, calls, ps = [], [], None, [], []
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
                calls.append(p >= 0.5)
                ps.append(p)
                imbalanced.append(_score(np.array(imb_y), np.array(imb_p)))
                p_last = p
            res[f"site shift, {n_c} controls"] = {
                k: float(np.mean([r[k] for r in runs])) for k in runs[0]
            } | {f"{k}_sd": float(np.std([r[k] for r in runs])) for k in runs[0]}
            res[f"site shift, {n_c} controls, target 3:1 PD"] = {
                k: float(np.mean([r[k] for r in imbalanced])) for k in ("accuracy", "pd_share")
            } | {"true_pd_share": float(np.mean(imb_y))}
            curves[name][f"{n_c} controls"] = p_last.tolist()
            per_case[(name, n_c)] = (y, np.mean(calls, axis=0))
            mean_p[(name, n_c)] = np.mean(ps, axis=0)
        results[name] = res
        case_rows += [
            {"cohort": name, "case_id": c, "label": int(y[i]), "p_trained": float(p_plain[i])}
            | {f"pd_rate_{n_c}": float(per_case[(name, n_c)][1][i]) for n_c in n_controls}
            | {f"p_shift_{n_c}": float(mean_p[(name, n_c)][i]) for n_c in n_controls}
            for i, c in enumerate(ids)
        ]
        print(name, json.dumps(res, indent=1), flush=True)

    if args.same_site:
        folders = {spec.split("=", 1)[0]: Path(spec.split("=", 1)[1]) for spec in args.cohorts}
        for (name, n_c), (y, pd_rate) in per_case.items():
            ref = None if name == args.same_site else per_case[(args.same_site, n_c)]
            paired = (
                ref is not None
                and np.array_equal(y, ref[0])
                and _same_subjects(folders[name], folders[args.same_site])
            )
            results[name][f"site shift, {n_c} controls"] |= _case_intervals(
                y, pd_rate, ref, paired, rng
            )
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
            if "gap_ci" in r:
                lo, hi = r["gap_ci"]
                kind = "paired" if r["gap_paired"] else "independent"
                sd += f"; gap {100 * r['gap']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] ({kind})"
            auc = f"{r['auc']:.3f}" if "auc" in r else "-"
            share = f"{r['pd_share']:.2f}" + (
                f" (true {r['true_pd_share']:.2f})" if "true_pd_share" in r else ""
            )
            if "pd_share_ci" in r:
                share += " [{:.2f}, {:.2f}]".format(*r["pd_share_ci"])
            lines.append(
                f"| {name} | {res['n']} | {key} | {r['accuracy']:.3f}{sd} | {auc} | {share} |"
            )
    (args.out / "site_adaptation.md").write_text("\n".join(lines) + "\n")
    with (args.out / "per_case.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(case_rows[0]))
        writer.writeheader()
        writer.writerows(case_rows)
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
