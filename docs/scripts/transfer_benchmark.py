"""Transfer benchmark (issue 13): train on site-A phantoms, test on other scanners.

Trains one ``cpu-tiny`` k-fold ensemble on site-A phantoms and scores the fold ensemble on
held-out balanced cohorts of

* ``A``: site A (same scanner, new subjects),
* ``B``: site B (NM 0.6 x gain + 2000 offset, stronger bias field, 1.5 x NM noise, 0.8 x NM
  contrast, 1.4 x QSM noise),
* ``C-real``: site C (NM 2.5 x gain, 0.7 x noise, 1.2 x contrast, QSM written in ppm) with the
  nuclei of real challenge patients (``--geometry``, skipped if the folder is absent),

with the masks given. Reports accuracy, ROC AUC and the predicted PD share against the
oracle (Bayes-optimal accuracy on the same cases). Results: ``OUT/transfer_results.json`` and
``OUT/transfer_results.md`` (docs/results.md quotes them).

    nice python docs/scripts/transfer_benchmark.py --out /tmp/transfer --threads 1

Resumable: finished phantom cases and folds are kept. ``--train-root`` / ``--test-root
NAME=DIR`` use site-A cohorts that already exist (any ``mrn phantom`` output without
``--site``, i.e. site A) instead of generating them. ``--intensity percentile`` trains and
tests with the legacy whole-volume mapping instead (the comparison in docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

DEFAULT_GEOMETRY = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real-geometry"


def _score(predictor, root: Path) -> dict:
    """The ensemble's accuracy, AUC and PD share on a labelled cohort, beside its oracle."""
    from mrn_engine.workflows import score_folder

    s = score_folder(predictor, root)
    oracle = json.loads((root / "oracle.json").read_text())
    keep = ("n", "accuracy", "auc", "pd_share", "p_pd_range")
    return {**{k: s[k] for k in keep}, "oracle_accuracy": float(oracle["accuracy_empirical"])}


def _split_geometry(geometry: Path, holdout: list[str], out: Path) -> tuple[Path, Path]:
    """Two folders of links to the real subjects: the training ones and the held-out ones."""
    subjects = sorted(p.name for p in geometry.iterdir() if p.is_dir())
    missing = sorted(set(holdout) - set(subjects))
    if missing or not holdout or len(holdout) >= len(subjects):
        raise SystemExit(f"{geometry}: hold out some, not all, of {subjects} (asked {holdout})")
    folders = (out / "geometry_train", out / "geometry_heldout")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for name in subjects:
        link = folders[name in holdout] / name
        if not link.exists():
            link.symlink_to((geometry / name).resolve(), target_is_directory=True)
    return folders


def _merge_cohorts(sources: list[Path], dest: Path) -> Path:
    """One labelled cohort of hard links to the cases of ``sources``, renumbered RJPD_000...

    ``provenance.csv`` says where each case came from; inputs are never modified.
    """
    from mrn_engine.config import atomic_write_text
    from mrn_engine.data import discover_cases, find_labels

    if (dest / "train_cases.csv").is_file():
        return dest
    rows, prov = [], ["case_id,label,source"]
    for src in sources:
        labels = find_labels(src)
        for files in discover_cases(src):
            new = f"RJPD_{len(rows):03d}"
            (dest / new).mkdir(parents=True, exist_ok=True)
            for f in files.folder.iterdir():
                target = dest / new / f.name
                if not target.exists():
                    target.hardlink_to(f)
            rows.append(f"{new},{labels[files.case_id]}")
            prov.append(f"{new},{labels[files.case_id]},{files.folder}")
    atomic_write_text(dest / "provenance.csv", "\n".join(prov) + "\n")
    atomic_write_text(dest / "train_cases.csv", "\n".join(rows) + "\n")  # written last
    return dest


def _wait_for(root: Path, hours: float = 2.0) -> None:
    """Wait until a cohort another process is writing is finished (its oracle.json exists)."""
    t0 = time.time()
    while not (root / "oracle.json").is_file():
        if time.time() - t0 > hours * 3600:
            raise SystemExit(f"{root}: no oracle.json after {hours} h")
        time.sleep(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-cases", type=int, default=72)
    ap.add_argument("--test-cases", type=int, default=40)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="phantom generation processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--geometry", type=Path, default=DEFAULT_GEOMETRY)
    ap.add_argument("--intensity", choices=("reference", "percentile"), default="reference")
    ap.add_argument(
        "--train-geometry-cases",
        type=int,
        default=0,
        help="also train on this many site-A phantoms on the real nuclei of the subjects not "
        "held out (0: atlas nuclei only, the first benchmark)",
    )
    ap.add_argument(
        "--train-geometry-root",
        type=Path,
        default=None,
        help="an existing site-A cohort on the training subjects' real nuclei instead",
    )
    ap.add_argument(
        "--holdout-subjects",
        default="RJPD_006",
        help="real subjects (comma-separated) kept for the C-real test only, never trained on",
    )
    ap.add_argument("--train-root", type=Path, default=None, help="existing site-A cohort")
    ap.add_argument(
        "--score-only",
        action="store_true",
        help="no generation or training: score the folds the bundle has finished so far",
    )
    ap.add_argument(
        "--test-root", action="append", default=[], help="NAME=DIR: an existing test cohort"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from mrn_engine.config import atomic_write_text, get_preset
    from mrn_engine.errors import MRNWarning
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.phantom import generate_cohort
    from mrn_engine.training.cv import train_bundle

    warnings.filterwarnings("ignore", message=".*QSM unit unclear.*", category=MRNWarning)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tests = {"A": ("A", None, 10_001), "B": ("B", None, 10_002)}
    train_geo = None
    if args.geometry.is_dir() and args.train_geometry_cases:
        train_geo, test_geo = _split_geometry(args.geometry, args.holdout_subjects.split(","), out)
        tests["C-real"] = ("C", test_geo, 10_003)
    elif args.geometry.is_dir():
        tests["C-real"] = ("C", args.geometry, 10_003)
    else:
        print(f"note: {args.geometry} absent: no real-geometry test cohort")
    gen = dict(workers=args.workers, progress=False)
    given = dict(item.split("=", 1) for item in args.test_root)
    roots = {name: Path(given[name]) if name in given else out / f"test_{name}" for name in tests}
    for name, (site, geo, seed) in tests.items():
        if name not in given and not args.score_only:
            generate_cohort(
                roots[name], n=args.test_cases, seed=seed, site=site, geometry=geo, **gen
            )
    train_root = args.train_root
    if train_root is None and args.score_only:
        train_root = out / "train_A"
    elif train_root is None:
        train_root = out / "train_A"
        generate_cohort(train_root, n=args.train_cases, seed=args.seed, site="A", **gen)
    if train_geo is not None and not args.score_only:
        geo_root = args.train_geometry_root or out / "train_A_real_nuclei"
        if args.train_geometry_root is None:
            generate_cohort(
                geo_root,
                n=args.train_geometry_cases,
                seed=args.seed + 100,
                site="A",
                geometry=train_geo,
                **gen,
            )
        train_root = _merge_cohorts([train_root, geo_root], out / "train_A_mixed")
    elif train_geo is not None:
        train_root = out / "train_A_mixed"
    t_gen = time.perf_counter() - t0
    print(f"phantoms: {t_gen:.0f} s", flush=True)

    cfg = get_preset("cpu-tiny").replace(
        roi={"intensity": args.intensity},
        train={
            "folds": args.folds,
            "pretrain_epochs": 1,
            "epochs": args.epochs,
            "seed": args.seed,
            "device": "cpu",
        },
    )
    bundle = out / f"bundle_{args.intensity}"
    if not args.score_only:
        train_bundle(
            train_root,
            bundle,
            cfg,
            cache_dir=out / f"roi_cache_{args.intensity}",
            resume=True,
            progress=False,
        )
    t_train = time.perf_counter() - t0 - t_gen
    print(f"training: {t_train:.0f} s", flush=True)
    predictor = MRNPredictor.from_bundle(bundle, device="cpu")
    folds = list(predictor.folds)
    tag = args.intensity if len(folds) == args.folds else f"{args.intensity}_folds{len(folds)}"
    for root in roots.values():
        _wait_for(root)
    results = {name: _score(predictor, roots[name]) for name in tests}
    summary = {
        "intensity": args.intensity,
        "train": {
            "site": "A",
            "root": str(train_root),
            "folds": args.folds,
            "real_nuclei_cases": args.train_geometry_cases,
            "heldout_subjects": args.holdout_subjects if train_geo is not None else None,
        },
        "folds_scored": folds,
        "test_roots": {k: str(v) for k, v in roots.items()},
        "epochs": args.epochs,
        "tests": results,
        "seconds": {
            "phantoms": round(t_gen),
            "training": round(t_train),
            "total": round(time.perf_counter() - t0),
        },
        "threads": args.threads,
    }
    lines = [
        f"intensity mapping: {args.intensity}; trained on the site-A phantoms of {train_root} "
        f"({args.folds} folds x 1+{args.epochs} epochs, cpu-tiny; scored: folds {folds})",
        "",
        "| test cohort | n | accuracy | AUC | predicted PD share | P(PD) range | oracle |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lo, hi = r["p_pd_range"]
        lines.append(
            f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['auc']:.3f} | "
            f"{r['pd_share']:.2f} | {lo:.2f}-{hi:.2f} | {r['oracle_accuracy']:.3f} |"
        )
    atomic_write_text(out / f"transfer_results_{tag}.json", json.dumps(summary, indent=2))
    atomic_write_text(out / f"transfer_results_{tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
