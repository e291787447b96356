"""``mrn demo``: the whole job on the built-in synthetic cohort.

1. generate a labelled phantom cohort (``DIR/cohort``) and a separate held-out one
   (``DIR/heldout``, other seed; its labels are used only for scoring);
2. pretrain the ViT slice backbone with AnatCL on the images of ``DIR/cohort`` and
   ``DIR/unlabeled`` (no diagnosis labels read; ``DIR/anatcl/anatcl_<variant>.safetensors`` + card), as
   ``mrn pretrain`` does; ``anatcl_epochs=0`` keeps the random init, and so does a pretraining
   that did not learn (:func:`~mrn_engine.pretraining.collapse.is_collapsed`; the summary says
   so under ``anatcl_pretraining``);
3. train the ``cpu-tiny`` k-fold ensemble from it into ``DIR/bundle`` (a bundle napari-mrn opens),
   measure the fold models' agreement on ``DIR/unlabeled`` (seed + 50 000, label files removed)
   for the ensemble calibration (``mrn calibrate --unlabeled``; with the AnatCL pretraining on
   ``DIR/calibration`` instead, as many cases again, seed + 60 000, which the pretraining never
   saw: the folds share that backbone and agree more on its pool), and record the bundle's path
   in ``$MRN_CACHE_DIR/last_demo_bundle.json`` (default ``~/.cache/mrn``), so the napari panel
   offers it wherever ``DIR`` is;
4. score the fold ensemble on the held-out cases with ``MRNPredictor`` and run the ROI-masking
   analysis (``DIR/bundle/ablation``);
5. write the HTML report (``DIR/report.html``) and ``DIR/demo_summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mrn_engine.analysis import write_report
from mrn_engine.bundle import record_demo_bundle
from mrn_engine.config import RunConfig, atomic_write_text, get_preset
from mrn_engine.errors import ConfigError, InputDataError
from mrn_engine.phantom import generate_cohort
from mrn_engine.pretraining.collapse import collapse_note, is_collapsed
from mrn_engine.pretraining.loop import PretrainOptions, card_path, pretrained_weights
from mrn_engine.threads import available_cores, busy_cores
from mrn_engine.training.cv import train_bundle
from mrn_engine.training.ensemble_calibration import MIN_CASES
from mrn_engine.workflows.ensemble_calibration import calibrate_ensemble
from mrn_engine.workflows.evaluate import heldout_metrics, oof_metrics

#: label files a phantom cohort writes; removed from the demo's unlabelled folder
LABEL_FILES = ("train_cases.csv", "val_cases.csv", "phantom_latents.csv")


@dataclass(frozen=True)
class DemoSize:
    """Sizes of a demo run."""

    cases: int
    heldout: int
    folds: int
    pretrain_epochs: int
    epochs: int
    #: unlabelled cases for the ensemble calibration (0: none; fewer than 10 cannot be used);
    #: with the AnatCL pretraining they join its pool and as many new ones calibrate
    unlabeled: int = 0
    #: AnatCL pretraining epochs of the ViT before training (0: random init)
    anatcl_epochs: int = 0


#: the default demo (measured in docs/results.md) and the ``--quick`` smoke run
DEFAULT = DemoSize(
    cases=72, heldout=60, folds=3, pretrain_epochs=1, epochs=12, unlabeled=40, anatcl_epochs=30
)
QUICK = DemoSize(
    cases=8, heldout=4, folds=2, pretrain_epochs=1, epochs=1, unlabeled=10, anatcl_epochs=1
)


def demo_anatcl(cfg: RunConfig, size: DemoSize, seed: int) -> PretrainOptions:
    """The demo's AnatCL pretraining: ``mrn pretrain``'s defaults, the demo's epochs and seed."""
    return PretrainOptions(
        arch="vit", epochs=size.anatcl_epochs, seed=seed, device=cfg.train.device
    )


def demo_config(size: DemoSize, seed: int = 1, preset: str = "cpu-tiny") -> RunConfig:
    """The preset with the demo's folds, epochs and seed."""
    return get_preset(preset).replace(
        train={
            "folds": size.folds,
            "pretrain_epochs": size.pretrain_epochs,
            "epochs": size.epochs,
            "seed": seed,
            "device": "cpu",
        }
    )


def _record_bundle(bundle: Path, log) -> Path | None:
    """Record the demo bundle for napari-mrn; a cache folder that cannot be written is a note."""
    try:
        return record_demo_bundle(bundle)
    except OSError as e:
        log(f"note: could not record the demo bundle for napari-mrn ({e})")
        return None


def _pretrain(
    out: Path, size: DemoSize, cfg: RunConfig, seed: int, *, progress: bool, log
) -> tuple[RunConfig, dict[str, Any]]:
    """AnatCL-pretrain the ViT on the labelled (labels unread) and unlabelled images; returns
    ``cfg`` starting from those weights and a summary of the run."""
    roots = [out / "cohort"] + ([out / "unlabeled"] if size.unlabeled else [])
    log(
        f"[2/5] AnatCL pretraining of the ViT: {size.cases + size.unlabeled} cases, labels unread,"
        f" {size.anatcl_epochs} epochs"
    )
    opts = demo_anatcl(cfg, size, seed)
    # named by the kernel: a folder made with other demo settings gets a new run (and, through
    # the new weights path, a bundle that refuses to resume), never a stale reuse
    weights = pretrained_weights(
        roots,
        out / "anatcl" / f"anatcl_{opts.variant}.safetensors",
        cfg,
        opts,
        cache_dir=out / "roi_cache",
        resume=True,
        progress=progress,
    )
    card = json.loads(card_path(weights).read_text())
    curve = card["loss_curve"]
    collapsed = is_collapsed(curve)
    info = {
        "weights": str(weights),
        "n_cases": card["data"]["n_cases"],
        "epochs": card["epochs"],
        "loss_first": curve[0]["loss"],
        "loss_last": curve[-1]["loss"],
        "loss_collapsed": curve[-1]["uniform"],
        "collapsed": collapsed,
        "used": not collapsed,
    }
    log(
        f"      loss {info['loss_first']:.3f} -> {info['loss_last']:.3f}"
        f" (collapsed {info['loss_collapsed']:.3f})"
    )
    if collapsed:  # measured: ensembles from collapsed weights were at chance
        log(f"      note: {collapse_note(curve)}; training from random initialisation instead")
        return cfg, info
    return cfg.replace(model={"backbone_weights": str(weights)}), info


def run_demo(
    out: str | os.PathLike,
    *,
    size: DemoSize = DEFAULT,
    seed: int = 1,
    workers: int = 2,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns (and writes) the summary.

    Re-running with the same arguments resumes: finished phantom cases and folds are kept.
    """
    if size.cases < 2 * size.folds or size.heldout < 2:
        raise ConfigError(
            f"demo: {size.cases} cases cannot make {size.folds} folds (need >= {2 * size.folds})"
            f" and held-out needs >= 2 cases"
        )
    if 0 < size.unlabeled < MIN_CASES:
        raise ConfigError(f"demo: the ensemble calibration needs >= {MIN_CASES} unlabelled cases")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    compute = {
        "torch_threads": torch.get_num_threads(),
        "cores": available_cores(),
        "load_1min": round(busy_cores(), 2),
        "phantom_workers": workers,
    }
    log(
        f"compute: {compute['torch_threads']} torch thread(s) on {compute['cores']} core(s) "
        f"(1-minute load {compute['load_1min']:.1f}), {workers} phantom worker(s); "
        "mrn demo --threads N sets the threads"
    )
    log(
        f"[1/5] phantom cohort: {size.cases} labelled + {size.heldout} held-out"
        f" + {size.unlabeled * (2 if size.anatcl_epochs else 1)} unlabelled cases -> {out}"
    )
    labelled = generate_cohort(
        out / "cohort", n=size.cases, seed=seed, workers=workers, progress=progress
    )
    held = generate_cohort(
        out / "heldout", n=size.heldout, seed=seed + 10_000, workers=workers, progress=progress
    )
    if size.unlabeled:
        generate_cohort(
            out / "unlabeled",
            n=size.unlabeled,
            seed=seed + 50_000,
            workers=workers,
            progress=progress,
        )
        for name in LABEL_FILES:
            (out / "unlabeled" / name).unlink(missing_ok=True)
    calibration_root = out / ("calibration" if size.anatcl_epochs else "unlabeled")
    if size.unlabeled and size.anatcl_epochs:  # cases the pretrained backbone never saw
        generate_cohort(
            calibration_root,
            n=size.unlabeled,
            seed=seed + 60_000,
            workers=workers,
            progress=progress,
        )
        for name in LABEL_FILES:
            (calibration_root / name).unlink(missing_ok=True)
    times["phantom"] = time.perf_counter() - t0

    cfg = demo_config(size, seed)
    pretraining = None
    if size.anatcl_epochs:
        t1 = time.perf_counter()
        cfg, pretraining = _pretrain(out, size, cfg, seed, progress=progress, log=log)
        times["pretraining"] = time.perf_counter() - t1
    log(
        f"[3/5] training {cfg.preset}: {size.folds} folds x {size.pretrain_epochs}+{size.epochs} epochs"
    )
    t1 = time.perf_counter()
    bundle = out / "bundle"
    train_bundle(
        out / "cohort", bundle, cfg, cache_dir=out / "roi_cache", resume=True, progress=progress
    )
    ensemble = None
    if size.unlabeled:
        try:
            ensemble = calibrate_ensemble(bundle, calibration_root, device="cpu")
        except InputDataError as e:  # e.g. a fold model that did not learn: plain mean
            log(f"note: no ensemble calibration ({e})")
    if ensemble is not None:
        log(
            f"      ensemble calibration: fold logits correlate at {ensemble.rho_measured:.2f} on "
            f"{ensemble.n_cases} unlabelled cases -> ensemble logit x "
            f"{ensemble.factor(len(ensemble.folds)):.2f}"
        )
    times["training"] = time.perf_counter() - t1
    record = _record_bundle(bundle, log)

    log("[4/5] held-out evaluation (fold ensemble) and ROI-masking analysis")
    t2 = time.perf_counter()
    oof = oof_metrics(bundle)
    heldout = heldout_metrics(
        bundle, out / "heldout", bundle / "ablation", device="cpu", progress=progress
    )
    times["evaluation"] = time.perf_counter() - t2

    log("[5/5] report")
    report = write_report(bundle, out / "report.html", png_dir=out / "figures")
    times["total"] = time.perf_counter() - t0
    summary = {
        "out": str(out),
        "bundle": str(bundle),
        "bundle_record": str(record) if record is not None else None,
        "report": str(report),
        "cohort": str(out / "cohort"),
        "heldout_cases": str(out / "heldout"),
        "ensemble_calibration": {
            "rho": ensemble.rho_measured,
            "factor": ensemble.factor(len(ensemble.folds)),
            "n_cases": ensemble.n_cases,
            "cases": str(calibration_root),
        }
        if ensemble is not None
        else None,
        "anatcl_pretraining": pretraining,
        "sizes": size.__dict__,
        "seed": seed,
        "oof": {k: oof[k] for k in ("n", "accuracy", "auc", "f1")},
        "heldout": {k: heldout[k] for k in ("n", "accuracy", "auc", "f1")},
        "oracle": {
            "heldout_empirical": held["oracle"]["accuracy_empirical"],
            "population": held["oracle"]["accuracy_analytic"],
            "labelled_empirical": labelled["oracle"]["accuracy_empirical"],
        },
        "chance": 0.5,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "compute": compute,
    }
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2))
    log(
        f"held-out accuracy {heldout['accuracy']:.3f} (AUC {heldout['auc']:.3f}, n={heldout['n']}); "
        f"oracle ceiling {summary['oracle']['heldout_empirical']:.3f} on these cases "
        f"({summary['oracle']['population']:.3f} population); chance 0.5\n"
        f"out-of-fold accuracy {oof['accuracy']:.3f} (AUC {oof['auc']:.3f}, n={oof['n']})\n"
        f"bundle:  {bundle}{' (offered first by napari-mrn)' if record else ''}\n"
        f"report:  {report}\nmasking: {bundle / 'ablation'}\n"
        f"summary: {out / 'demo_summary.json'}\ntime:    {times['total']:.0f} s"
    )
    return summary
