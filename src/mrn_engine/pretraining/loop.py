"""``mrn pretrain``: anatomy-aware (AnatCL) pretraining of a preset's slice backbone.

Per epoch, every case gives two augmented views of its four ROI stacks (``augment``:
rotation and mild noise by default, or the full training augmentation; never the left/right
mirror, since asymmetry is a weak label, and by default no intensity transforms, since the
mean contrasts are weak labels too); the embedder
(:mod:`mrn_engine.pretraining.encoder`) maps them to L2-normalised projections and the
kernelised contrastive loss (:func:`~mrn_engine.models.yaware.anatcl_loss`) pulls together
cases with similar standardised descriptors. AdamW, cosine learning rate per epoch.

Outputs: ``WEIGHTS`` (safetensors: the backbone only, timm key layout for the ViT) and the
card ``WEIGHTS`` with suffix ``.card.json``; per-epoch checkpoints in ``<stem>_checkpoints/``
beside it (:func:`~mrn_engine.training.checkpoint.save_checkpoint`, resumable).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from mrn_engine.config import RunConfig, atomic_write_text
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import ConfigError, MRNWarning, WeightsError
from mrn_engine.models.weights import load_backbone_weights
from mrn_engine.models.yaware import VARIANTS, anatcl_floor, anatcl_loss
from mrn_engine.pretraining.cohort import PretrainCohort, load_pretrain_cohort
from mrn_engine.pretraining.collapse import COLLAPSE_MARGIN, collapse_note, is_collapsed
from mrn_engine.pretraining.data import TwoViewDataset
from mrn_engine.pretraining.descriptors import (
    Standardised,
    descriptor_names,
    region_groups,
    roi_groups,
    standardise,
)
from mrn_engine.pretraining.distill import SelfDistillation, card_entry
from mrn_engine.pretraining.encoder import build_embedder
from mrn_engine.rois.cache import RoiCache, config_hash
from mrn_engine.runtime import file_sha256, resolve_device, seed_everything
from mrn_engine.training.checkpoint import (
    load_latest_usable,
    refuse_stale_checkpoints,
    save_checkpoint,
    save_state_dict,
    set_rng_states,
)
from mrn_engine.training.cv import code_version, roi_loader
from mrn_engine.training.objective import reset_layerscale

CARD_FORMAT = 1
#: the view augmentations of ``PretrainOptions.augment``
AUGMENTS = ("geometric", "full")
#: AnatCL kernel when none is given, per architecture (the settings measured in
#: docs/results.md: the ViT's ``roi`` 75.8 % vs ``global`` 72.8 % on 400 held-out phantoms,
#: and ``global`` collapses on nuclei of the challenge's size; anatcl3d measured with ``global``)
DEFAULT_VARIANT = {"vit": "roi", "anatcl3d": "global"}


@dataclass
class PretrainOptions:
    """Settings of one pretraining run (all recorded in the card)."""

    arch: str = "vit"  #: "vit" (the preset's DINOv2 backbone) or "anatcl3d"
    #: AnatCL kernel: "global", "local" or "roi" (one per ROI embedding); "" = the arch's
    #: default (:data:`DEFAULT_VARIANT`)
    variant: str = ""
    #: RBF bandwidth, in cohort SDs of the descriptors (docs/pretraining.md: at 1.0 the kernel
    #: on the 36 phantom descriptors is nearly uniform, loss floor 3.37 vs 3.43 collapsed)
    sigma: float = 0.5
    temperature: float = 0.1
    #: views: "geometric" (rotation + mild noise: keeps the intensity descriptors) or "full"
    #: (the training augmentation without the mirror; docs/pretraining.md: the ViT collapsed)
    augment: str = "geometric"
    epochs: int = 30
    #: weight of a DINO self-distillation term (:mod:`mrn_engine.pretraining.distill`); 0 = off
    distill: float = 0.0
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    seed: int = 1
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.variant:
            self.variant = DEFAULT_VARIANT.get(self.arch, "global")

    def check(self) -> PretrainOptions:
        if self.variant not in VARIANTS:
            raise ConfigError(f"--variant {self.variant!r}: choose one of {VARIANTS}")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"--augment {self.augment!r}: choose one of {AUGMENTS}")
        if self.distill < 0:
            raise ConfigError("--distill must be >= 0")
        if not self.sigma > 0 or not self.temperature > 0:
            raise ConfigError("--sigma and --temperature must be > 0")
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("--epochs must be >= 1 and --batch-size >= 2")
        return self


def card_path(weights: str | os.PathLike) -> Path:
    """The card beside a weights file: ``x.safetensors`` -> ``x.card.json``."""
    return Path(weights).with_suffix(".card.json")


def checkpoint_dir(weights: str | os.PathLike) -> Path:
    """Per-epoch checkpoints of a run writing ``weights``."""
    w = Path(weights)
    return w.parent / f"{w.stem}_checkpoints"


def _lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine schedule by epoch (0-based), depends only on the epoch (resume-safe)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def _views(batch: dict) -> dict[str, torch.Tensor]:
    return {n: torch.cat([batch["v0"][n], batch["v1"][n]]) for n in batch["v0"]}


def pretrain(
    cases_roots: str | os.PathLike | Sequence[str | os.PathLike],
    weights_out: str | os.PathLike,
    cfg: RunConfig,
    opts: PretrainOptions,
    *,
    cache_dir: str | os.PathLike | None = None,
    ages: dict[str, float] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    cohort: PretrainCohort | None = None,
) -> dict[str, Any]:
    """Pretrain and write ``weights_out`` + its card; returns the card (``finished`` False if stopped).

    Raises
    ------
    ConfigError: bad options, or old checkpoints without ``resume``.
    InputDataError: fewer than 2 usable cases.
    """
    opts.check()
    weights_out = Path(weights_out)
    ckpt = checkpoint_dir(weights_out)
    if not resume:
        refuse_stale_checkpoints(ckpt)
    device = resolve_device(opts.device)
    cache = RoiCache(cache_dir or weights_out.parent / "roi_cache")
    memo = cache.root / f"descriptors_{config_hash(cfg.roi)}.json"
    cohort = cohort or load_pretrain_cohort(
        cases_roots, cfg.roi, ages, memo_file=memo, progress=progress, roi_cache=cache
    )
    names = descriptor_names(with_age=ages is not None)
    std = standardise(cohort.descriptors, names)
    per_roi = opts.variant == "roi"
    groups = list((roi_groups(names) if per_roi else region_groups(names)).values())
    desc = torch.from_numpy(std.matrix)

    seed_everything(opts.seed)
    model = build_embedder(cfg, opts.arch, per_roi=per_roi)
    init: dict[str, Any] = {"format": "random-init"}
    if opts.arch == "vit" and cfg.model.backbone_weights:  # continue from e.g. DINOv2 weights
        init = load_backbone_weights(
            model.patchnizer.vit, cfg.model.backbone_weights, cfg.model.backbone
        )
    elif opts.arch == "vit" and cfg.train.random_init_layerscale > 0:
        reset_layerscale(model, cfg.train.random_init_layerscale)  # as mrn train from scratch
    distill = (
        SelfDistillation(model, model.feature_dim, len(ROI_NAMES) if per_roi else 1)
        if opts.distill > 0
        else None
    )
    model.to(device)
    params = list(model.parameters())
    if distill is not None:
        distill.to(device)
        params += list(distill.student_heads.parameters())
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    dataset = TwoViewDataset(
        std.case_ids,
        roi_loader(cohort.files, cfg, cache),
        seed=opts.seed,
        intensity=opts.augment == "full",
    )
    curve: list[dict[str, float]] = []
    start = 0
    loaded = load_latest_usable(ckpt) if resume else None
    if loaded is not None:
        _, (state, opt_state, info) = loaded
        if (
            info.get("options") != _comparable(opts)
            or info.get("data_sha256") != cohort.data_sha256
        ):
            raise ConfigError(
                f"{ckpt}: checkpoints of a run with other options or data; remove the folder "
                "or rerun with the same settings"
            )
        _load_state(model, distill, state)
        optim.load_state_dict(opt_state)
        set_rng_states(info["rng"])
        curve = list(info.get("curve", []))
        start = int(info["epoch"])
    t0 = time.time()
    last = opts.epochs if stop_after is None else min(opts.epochs, int(stop_after))
    for epoch in range(start, last):
        for g in optim.param_groups:
            g["lr"] = _lr(opts.lr, epoch, opts.epochs)
        dataset.set_epoch(epoch)
        gen = torch.Generator().manual_seed(opts.seed * 100_003 + epoch)
        loader = DataLoader(
            dataset,
            batch_size=opts.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=default_collate,
            drop_last=len(dataset) > opts.batch_size,
        )
        model.train()
        losses, floors, dinos = [], [], []
        bar = tqdm(
            loader,
            desc=f"pretrain {epoch + 1}/{opts.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            views = {n: x.to(device) for n, x in _views(batch).items()}
            f = model.features(views)
            d = desc[batch["index"]].to(device)
            loss = anatcl_loss(
                model.project(f),
                d,
                sigma=opts.sigma,
                temperature=opts.temperature,
                variant=opts.variant,
                groups=groups,
            )
            total = loss
            if distill is not None:
                dino = distill.loss(f, views)
                total = total + opts.distill * dino
                dinos.append(float(dino.detach()))
            if not torch.isfinite(total):
                raise WeightsError(
                    f"{weights_out}: pretraining loss is {total.item()} at epoch {epoch + 1} "
                    "(diverged; lower --lr)"
                )
            optim.zero_grad(set_to_none=True)
            total.backward()
            optim.step()
            if distill is not None:
                distill.update_teacher(model)
            losses.append(float(loss.detach()))
            floors.append(
                float(
                    anatcl_floor(
                        desc[batch["index"]],
                        sigma=opts.sigma,
                        variant=opts.variant,
                        groups=groups,
                    )
                )
            )
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        curve.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "floor": float(np.mean(floors)),  # the loss's lower bound for these kernels
                "uniform": math.log(2 * opts.batch_size - 1),  # every projection the same
                "lr": _lr(opts.lr, epoch, opts.epochs),
            }
        )
        if dinos:
            curve[-1]["distill_loss"] = float(np.mean(dinos))
        if progress:
            c = curve[-1]
            dino = f", DINO {c['distill_loss']:.4f}" if "distill_loss" in c else ""
            tqdm.write(
                f"epoch {epoch + 1}: loss {c['loss']:.4f} (floor {c['floor']:.4f}, "
                f"collapsed {c['uniform']:.4f}){dino}"
            )
        save_checkpoint(
            ckpt,
            epoch + 1,
            _state(model, distill),
            optim.state_dict(),
            {"options": _comparable(opts), "data_sha256": cohort.data_sha256, "curve": curve},
        )
    finished = len(curve) >= opts.epochs
    card = _card(cfg, opts, cohort, std, curve, finished, time.time() - t0, cache)
    card["init"] = init
    if finished:
        if card["collapsed"]:
            warnings.warn(f"{weights_out}: {collapse_note(curve)}", MRNWarning, stacklevel=2)
        save_state_dict(model.backbone_state(), weights_out)
        card["weights_sha256"] = file_sha256(weights_out)
        atomic_write_text(card_path(weights_out), json.dumps(card, indent=2))
    return card


def pretrained_weights(
    cases_roots: str | os.PathLike | Sequence[str | os.PathLike],
    weights_out: str | os.PathLike,
    cfg: RunConfig,
    opts: PretrainOptions,
    *,
    cache_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """``weights_out`` after pretraining into it; with ``resume``, a finished run is reused.

    A finished run is reused when its card says so and records the same options (device
    aside); an unfinished one continues from its last checkpoint.
    """
    weights_out = Path(weights_out)
    card = card_path(weights_out)
    if resume and weights_out.is_file() and card.is_file():
        try:
            done = json.loads(card.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            done = {}  # an unreadable card: pretrain (again) from the checkpoints
        if done.get("finished") and done.get("options") == _comparable(opts):
            return weights_out
    pretrain(
        cases_roots,
        weights_out,
        cfg,
        opts,
        cache_dir=cache_dir,
        resume=resume,
        progress=progress,
    )
    return weights_out


#: key prefix of the self-distillation's tensors in a pretraining checkpoint
_DISTILL = "distill."


def _state(model: torch.nn.Module, distill: SelfDistillation | None) -> dict[str, torch.Tensor]:
    """The checkpointed tensors: the embedder's, and the self-distillation's under ``distill.``."""
    state = dict(model.state_dict())
    if distill is not None:
        state.update({f"{_DISTILL}{k}": v for k, v in distill.state_dict().items()})
    return state


def _load_state(
    model: torch.nn.Module, distill: SelfDistillation | None, state: dict[str, torch.Tensor]
) -> None:
    own = {k: v for k, v in state.items() if not k.startswith(_DISTILL)}
    model.load_state_dict(own)
    if distill is not None:
        n = len(_DISTILL)
        distill.load_state_dict({k[n:]: v for k, v in state.items() if k.startswith(_DISTILL)})


def _comparable(opts: PretrainOptions) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("device", None)  # a run may resume on another device
    if not d.get("distill"):  # runs from before the option compare equal to the default
        d.pop("distill", None)
    return d


def _card(
    cfg: RunConfig,
    opts: PretrainOptions,
    cohort: PretrainCohort,
    std: Standardised,
    curve: list[dict[str, float]],
    finished: bool,
    seconds: float,
    cache: RoiCache,
) -> dict[str, Any]:
    return {
        "format": CARD_FORMAT,
        "kind": "mrn-anatcl-pretrained-backbone",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "preset": cfg.preset,
        "arch": opts.arch,
        "backbone": cfg.model.backbone if opts.arch == "vit" else "resnet18-3d",
        "key_layout": "timm" if opts.arch == "vit" else "mrn-anatcl3d-trunk",
        "image_size": cfg.roi.image_size,
        "roi_slices": dict(cfg.roi.slices),
        "loss": {
            "name": "AnatCL y-aware InfoNCE",
            "variant": opts.variant,
            "sigma": opts.sigma,
            "temperature": opts.temperature,
            "kernel": "rbf on standardised descriptors, squared distance averaged over dims",
            "self_distillation": card_entry(opts.distill) if opts.distill > 0 else None,
        },
        "augmentation": (
            "training augmentation without the left/right mirror, 2 views"
            if opts.augment == "full"
            else "geometric (rotation) + mild noise, no mirror, 2 views"
        ),
        "descriptors": std.to_card(),
        "data": {
            "roots": [str(Path(r).resolve()) for r in cohort.roots],
            "n_cases": len(cohort.files),
            "sha256": cohort.data_sha256,
            "skipped": cohort.skipped,
            "labels_read": False,
        },
        "epochs": opts.epochs,
        "epochs_done": len(curve),
        "finished": finished,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "weight_decay": opts.weight_decay,
        "seed": opts.seed,
        "options": _comparable(opts),
        "loss_curve": curve,
        "collapsed": is_collapsed(curve),
        "collapse_rule": f"last epoch's loss > log(2B - 1) - {COLLAPSE_MARGIN}",
        "seconds_this_run": round(seconds, 1),
        "roi_cache": {"hits": cache.hits, "misses": cache.misses},
    }
