"""A whole phantom cohort in the challenge layout, written in parallel and atomically.

``ROOT/RJPD_xxx/{NM,QSM,T1,NM_mask,QSM_mask}.nii.gz``, ``ROOT/train_cases.csv`` and
``ROOT/val_cases.csv`` (headerless ``case_id,label``), plus ``phantom_latents.csv`` (latents per
case), ``oracle.json`` (the accuracy ceiling) and ``phantom.json`` (generator settings). Per-case
latents are kept in ``ROOT/.phantom_cases/<id>.json``, written after the case folder: a case
counts as finished (and is skipped on a re-run) only when its folder holds all five files and
that record exists.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from mrn_engine.config import atomic_write_text
from mrn_engine.errors import InputDataError
from mrn_engine.phantom.atlas import load_atlas
from mrn_engine.phantom.case import (
    CASE_FILES,
    _atlas_tensors,
    make_phantom_case,
    write_phantom_case,
)
from mrn_engine.phantom.model import (
    oracle_accuracy,
    oracle_log_odds,
    oracle_monte_carlo,
    separation,
)
from mrn_engine.phantom.nuclei_size import NUCLEI_CHOICES
from mrn_engine.phantom.real_geometry import load_real_geometry
from mrn_engine.phantom.site import SITES, parse_sites

GENERATOR_VERSION = 1
RECORD_DIR = ".phantom_cases"


def case_ids(n: int) -> list[str]:
    """``RJPD_000`` ... (three digits, more when ``n > 1000``)."""
    width = max(3, len(str(n - 1)))
    return [f"RJPD_{i:0{width}d}" for i in range(n)]


def plan_cohort(
    n: int,
    seed: int,
    val_fraction: float,
    sites: list[str] | None = None,
    subjects: list[str] | None = None,
) -> list[dict]:
    """Case id, label, split and per-case seed of every subject (balanced classes per split).

    With several ``sites`` (or real-geometry ``subjects``) each case gets one, in equal shares
    and independently of its label (a seeded stream of its own: the labels, splits and seeds
    are those of the plan without sites).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    n_val = int(round(n * val_fraction))
    order = rng.permutation(n)
    split = np.empty(n, dtype=object)
    labels = np.zeros(n, int)
    # val: HC first when odd; train: PD first when val was odd -> balanced overall and per split
    for name, members, start in (("val", order[:n_val], 0), ("train", order[n_val:], n_val % 2)):
        lab = (np.arange(len(members)) + start) % 2
        rng.shuffle(lab)
        split[members] = name
        labels[members] = lab
    ids = case_ids(n)
    plan = []
    for i in range(n):
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        plan.append(
            {"case_id": ids[i], "label": int(labels[i]), "split": split[i], "seed": case_seed}
        )
    for key, values, tag in (("site", sites, 0x517E), ("geometry", subjects, 0x6E0)):
        if values:
            r = np.random.default_rng(np.random.SeedSequence([seed, tag]))
            share = np.resize(np.arange(len(values)), n)
            r.shuffle(share)
            for p, k in zip(plan, share, strict=True):
                p[key] = values[int(k)]
    return plan


def _is_complete(root: Path, case_id: str) -> bool:
    folder = root / case_id
    if not all((folder / name).is_file() for name in CASE_FILES):
        return False
    return (root / RECORD_DIR / f"{case_id}.json").is_file()


def _generate_one(
    root: str, item: dict, effect: float, geometry: str | None = None, nuclei: str = "atlas"
) -> dict:
    """Worker: make, write and record one case; returns its record."""
    subject = None
    if item.get("geometry"):
        subject = {s.name: s for s in load_real_geometry(geometry)}[item["geometry"]]
    site = SITES[item.get("site", "A")]
    case = make_phantom_case(
        item["label"],
        item["seed"],
        item["case_id"],
        effect,
        site=site,
        geometry=subject,
        nuclei=nuclei,
    )
    write_phantom_case(case, Path(root))
    record = {**item, "latents": case.latents}
    atomic_write_text(
        Path(root) / RECORD_DIR / f"{item['case_id']}.json", json.dumps(record, indent=1)
    )
    return record


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    _atlas_tensors()


def _check_settings(root: Path, settings: dict) -> None:
    path = root / "phantom.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != settings:
            raise InputDataError(
                f"{root}: holds a phantom cohort made with other settings ({old}); "
                f"use an empty folder or the same --n/--seed/--effect/val fraction"
            )
    elif any(root.glob("RJPD_*")):
        raise InputDataError(
            f"{root}: already holds case folders that this generator did not write"
        )
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True))


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def generate_cohort(
    out: str | Path,
    n: int = 300,
    seed: int = 0,
    *,
    workers: int = 2,
    val_fraction: float = 1 / 3,
    progress: bool = True,
    effect: float = 1.0,
    site: str | list[str] = "A",
    geometry: str | Path | None = None,
    nuclei: str = "atlas",
) -> dict:
    """Generate ``n`` phantom subjects in the challenge layout under ``out``.

    Deterministic for ``seed`` (identical arrays whatever ``workers``); finished cases of an
    interrupted run with the same settings are kept. Returns a summary (counts, oracle, time).
    ``site``: one site name or several (``"A,B,C"``: cases spread evenly over them), see
    :mod:`mrn_engine.phantom.site`. ``geometry``: a folder of real nuclei masks
    (:mod:`mrn_engine.phantom.real_geometry`); cases use its subjects in equal shares.
    ``nuclei``: ``"atlas"`` (whole atlas nuclei) or ``"challenge"`` (atlas nuclei eroded to
    the challenge masks' sizes); ignored with ``geometry`` (:mod:`mrn_engine.phantom.nuclei_size`).
    """
    sites = [s.name for s in parse_sites(site)]
    subjects = None
    if geometry is not None:
        geometry = str(Path(geometry).resolve())
        subjects = [s.name for s in load_real_geometry(geometry)]
    if n < 2:
        raise InputDataError(f"{out}: a cohort needs at least 2 cases, got n={n}")
    if not 0.0 < val_fraction < 1.0:
        raise InputDataError(f"{out}: val_fraction must be between 0 and 1, got {val_fraction}")
    if not effect >= 0.0:
        raise InputDataError(f"{out}: effect must be >= 0, got {effect}")
    if nuclei not in NUCLEI_CHOICES:
        raise InputDataError(
            f"{out}: nuclei must be one of {', '.join(NUCLEI_CHOICES)}, got {nuclei!r}"
        )
    workers = max(1, int(workers))
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputDataError(f"{root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "generator_version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "effect": effect,
        "val_fraction": round(val_fraction, 6),
    }
    if sites != ["A"]:  # absent for the original single-site cohorts (their files stay valid)
        settings["sites"] = {s: SITES[s].to_dict() for s in sites}
    if subjects is not None:
        settings["geometry"] = {"folder": geometry, "subjects": subjects}
    elif nuclei != "atlas":  # absent for atlas-sized cohorts (those made before the option too)
        settings["nuclei"] = nuclei
    _check_settings(root, settings)
    for stale in root.glob(".tmp-RJPD_*"):  # leftovers of a killed run
        shutil.rmtree(stale, ignore_errors=True)

    t0 = time.perf_counter()
    plan = plan_cohort(n, seed, val_fraction, None if sites == ["A"] else sites, subjects)
    todo = [p for p in plan if not _is_complete(root, p["case_id"])]
    records: dict[str, dict] = {}
    for p in plan:
        if p not in todo:
            records[p["case_id"]] = json.loads(
                (root / RECORD_DIR / f"{p['case_id']}.json").read_text()
            )

    load_atlas()  # build the on-disk atlas cache once, before the workers start
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=n - len(todo), desc="phantom cases", unit="case")
    try:
        if workers == 1 or len(todo) <= 1:
            for p in todo:
                records[p["case_id"]] = _generate_one(str(root), p, effect, geometry, nuclei)
                if bar is not None:
                    bar.update(1)
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(
                min(workers, len(todo)), mp_context=ctx, initializer=_init_worker
            ) as pool:
                futures = [
                    pool.submit(_generate_one, str(root), p, effect, geometry, nuclei) for p in todo
                ]
                for fut in as_completed(futures):
                    rec = fut.result()
                    records[rec["case_id"]] = rec
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0

    ordered = [records[p["case_id"]] for p in plan]
    for name in ("train", "val"):
        rows = [[r["case_id"], r["label"]] for r in ordered if r["split"] == name]
        atomic_write_text(root / f"{name}_cases.csv", _csv_text(rows))

    latent_keys = sorted({k for r in ordered for k in r["latents"]})
    severity = np.array([r["latents"]["severity"] for r in ordered])
    age = np.array([r["latents"]["age"] for r in ordered])
    labels = np.array([r["label"] for r in ordered])
    log_odds = oracle_log_odds(severity, age, effect)
    rows = [["case_id", "label", "split", "seed", "site", "geometry", "oracle_p_pd", *latent_keys]]
    for r, lo in zip(ordered, log_odds, strict=True):
        p_pd = 1.0 / (1.0 + np.exp(-lo))
        rows.append(
            [
                r["case_id"],
                r["label"],
                r["split"],
                r["seed"],
                r.get("site", "A"),
                r.get("geometry", "atlas"),
                f"{p_pd:.6f}",
                *[f"{r['latents'].get(k, float('nan')):.6g}" for k in latent_keys],
            ]
        )
    atomic_write_text(root / "phantom_latents.csv", _csv_text(rows))

    oracle = {
        "accuracy_analytic": oracle_accuracy(effect),
        "accuracy_monte_carlo": oracle_monte_carlo(effect),
        "accuracy_empirical": float(np.mean((log_odds > 0) == labels)),
        "n_cases": n,
        "effect": effect,
        "separation_mahalanobis": separation(effect),
        "note": "Bayes-optimal classifier that knows each case's latent severity and age "
        "(equal class priors): the ceiling any image-based model can reach.",
    }
    atomic_write_text(root / "oracle.json", json.dumps(oracle, indent=2))
    n_pd = int(labels.sum())
    splits = {s: sum(r["split"] == s for r in ordered) for s in ("train", "val")}
    return {
        "root": str(root),
        "n_cases": n,
        "generated": len(todo),
        "skipped": n - len(todo),
        "n_pd": n_pd,
        "n_hc": n - n_pd,
        "n_train": splits["train"],
        "n_val": splits["val"],
        "sites": {s: sum(r.get("site", "A") == s for r in ordered) for s in sites},
        "geometry": subjects,
        "nuclei": None if subjects is not None else nuclei,
        "oracle": oracle,
        "seconds": elapsed,
        "workers": workers,
    }
