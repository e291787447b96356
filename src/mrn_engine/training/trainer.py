"""The epoch loop of one fold: pretraining stage, full-loss stage, checkpoints, resume, OOF.

The loop is written against a *training objective*: an ``nn.Module`` holding the student
network (``.student``) and whatever else training needs (teacher, memory banks), with

* ``forward(batch, stage) -> dict`` of scalar losses (``"loss"`` is optimised; the other
  entries are logged) and optionally ``"logits"`` ``(B, 2)``;
* ``predict_logits(batch) -> (B, 2)`` in eval mode;
* ``after_step()`` after each optimiser step (momentum teacher update);
* ``stage`` is ``"pretrain"`` (segmentation + contrastive only) or ``"train"`` (full loss).

Its ``state_dict()`` (student, teacher, banks) is the checkpoint; ``student.state_dict()`` is
the fold's ``model.safetensors``.

Under torchrun (an initialised process group, ``training/distributed.py``) the objective runs
in ``DistributedDataParallel``: ``train.batch_size`` is the global batch split over the ranks,
BatchNorm uses global-batch statistics, the epoch's losses are summed over the ranks, and only
rank 0 validates, writes files and shows progress.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mrn_engine.bundle import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DONE_FILE,
    METRICS_FILE,
    OOF_COLUMNS,
    OOF_FILE,
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
)
from mrn_engine.config import ModelConfig, RunConfig, atomic_write_text
from mrn_engine.errors import ConfigError, WeightsError
from mrn_engine.models import save_model
from mrn_engine.models.ensemble import autocast, inference_step, p_pd_of
from mrn_engine.models.losses import loss_terms
from mrn_engine.results import THRESHOLD
from mrn_engine.runtime import seed_everything
from mrn_engine.training import distributed
from mrn_engine.training.anchor import write_anchor
from mrn_engine.training.calibration import calibrate_fold_dir
from mrn_engine.training.checkpoint import (
    load_latest_usable,
    refuse_stale_checkpoints,
    save_checkpoint,
    save_state_dict,
    save_torch,
    set_rng_states,
)
from mrn_engine.training.dataset import RoiStackDataset, make_loader
from mrn_engine.training.head_norm import recalibrate_head_norm
from mrn_engine.training.optim import build_optimizer
from mrn_engine.training.reference_slices import fit_reference_slices, write_reference_slices

METRIC_FIELDS = (
    "epoch",
    "stage",
    "loss",
    "loss_cls",
    "loss_seg",
    "loss_con",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_auc",
    "lr_backbone",
    "lr_head",
    "key_cos_within",
    "key_cos_between",
    "seconds",
)


@dataclass
class FoldResult:
    """What training one fold produced."""

    fold: int
    out_dir: Path
    epochs_done: int
    finished: bool
    metrics: list[dict[str, Any]] = field(default_factory=list)
    oof: list[dict[str, Any]] = field(default_factory=list)


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """The RNG seed of one epoch: depends only on (seed, fold, epoch), so resume is exact."""
    return (int(seed) * 1_000_003 + int(fold) * 10_007 + int(epoch)) % 2**31


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def predict_dataset(
    objective: nn.Module,
    dataset: RoiStackDataset,
    *,
    batch_size: int = 8,
    device: torch.device | None = None,
    amp: bool = False,
    patients: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """P(PD) of every case of ``dataset`` (eval mode): rows ``{case_id, label, p_pd}``.

    Each batch goes through the predictor's inference step (``models.ensemble``): the same
    ``inference_mode``, bf16 autocast rule and P(PD) read-out as ``MRNPredictor``.
    ``patients``: filled with case id -> patient vector (the head's input), for models that
    have a ``head``.
    """
    device = device or next(objective.parameters()).device
    was_training = objective.training
    objective.eval()
    rows: list[dict[str, Any]] = []
    caught: list[torch.Tensor] = []
    head = getattr(getattr(objective, "student", None), "head", None)
    hook = (
        head.register_forward_pre_hook(lambda _m, args: caught.append(args[0].detach().float()))
        if patients is not None and isinstance(head, nn.Module)
        else None
    )
    try:
        for batch in make_loader(dataset, batch_size, shuffle=False):
            batch = to_device(batch, device)
            logits = inference_step(objective.predict_logits, batch, device=device, amp=amp)
            p = p_pd_of(logits).cpu().tolist()
            for cid, lab, pp in zip(
                batch["case_id"], batch["label"].cpu().tolist(), p, strict=True
            ):
                rows.append({"case_id": cid, "label": int(lab), "p_pd": float(pp)})
            if hook is not None and patients is not None and caught:
                for cid, v in zip(batch["case_id"], caught.pop().cpu(), strict=True):
                    patients[cid] = v
                caught.clear()
    finally:
        objective.train(was_training)
        if hook is not None:
            hook.remove()
    return rows


def _val_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    if not rows:
        return {"val_loss": math.nan, "val_acc": math.nan, "val_auc": math.nan}
    from sklearn.metrics import roc_auc_score

    y = np.array([r["label"] for r in rows])
    p = np.clip(np.array([r["p_pd"] for r in rows]), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    acc = float(np.mean((p >= THRESHOLD) == (y == 1)))
    auc = float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else math.nan
    return {"val_loss": loss, "val_acc": acc, "val_auc": auc}


def write_rows_csv(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    """Write rows as CSV atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ROI and model sections, JSON-normalised (tuples as lists)."""
    return json.loads(json.dumps({k: cfg.get(k) for k in ("roi", "model")}))


def check_stages(cfg: RunConfig, model_cfg: ModelConfig | None = None) -> None:
    """``ConfigError`` if a scheduled training stage has no loss term (nothing to learn).

    The pretraining stage optimises segmentation + contrastive losses only; a model with no
    segmentation head and no mSupMoCo (SERes10, DINOv2-only) has an identically zero
    pretraining loss, and ``train.pretrain_epochs`` of it would only apply weight decay.
    ``model_cfg`` defaults to ``cfg.model``.
    """
    model_cfg = model_cfg or cfg.model
    if cfg.train.pretrain_epochs > 0 and not loss_terms(model_cfg, "pretrain"):
        raise ConfigError(
            f"train.pretrain_epochs={cfg.train.pretrain_epochs} but this model has no pretraining "
            "objective (no segmentation head and no mSupMoCo: its pretraining loss is 0); set "
            "train.pretrain_epochs=0 (CLI: --pretrain-epochs 0), as mrn compare does for it"
        )


def train_fold(
    objective: nn.Module,
    train_ds: RoiStackDataset,
    val_ds: RoiStackDataset | None,
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    fold: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> FoldResult:
    """Train one fold to ``cfg.train.pretrain_epochs + cfg.train.epochs`` epochs.

    Parameters
    ----------
    objective : the training objective (see module docstring), freshly built with the seed.
    train_ds, val_ds : training cases (augmented) and the fold's out-of-fold cases.
    cfg : the run configuration (saved as ``config.json``).
    out_dir : the fold folder (``BUNDLE/fold_k``).
    resume : continue from ``out_dir/checkpoints`` if there is a checkpoint.
    stop_after : stop after this epoch as if killed (tests, time-boxed runs).
    """
    out_dir = Path(out_dir)
    tc = cfg.train
    model_cfg = getattr(getattr(objective, "cfg", None), "model", None)
    if isinstance(model_cfg, ModelConfig):  # the objective's own model (stand-ins have none)
        check_stages(cfg, model_cfg)
    world, main = distributed.world_size(), distributed.is_main()
    check_world(objective, train_ds, tc.batch_size, world)
    progress = progress and main
    ckpt_dir = out_dir / CHECKPOINTS_DIR
    device = distributed.local_device(tc.device)
    objective.to(device)
    optimizer = build_optimizer(objective, tc)
    total = int(tc.pretrain_epochs) + int(tc.epochs)
    rows: list[dict[str, Any]] = []
    start = 1

    if not resume and (out_dir / DONE_FILE).exists():
        raise ConfigError(
            f"{out_dir}: fold already trained; pass --resume to reuse it, --overwrite to train "
            "it again, or choose another --out"
        )
    if not resume:
        refuse_stale_checkpoints(ckpt_dir)
    found = load_latest_usable(ckpt_dir) if resume else None
    if found is not None:
        target, (state, opt_state, info) = found
        if _comparable(info.get("config", {})) != _comparable(cfg.to_dict()):
            raise WeightsError(
                f"{target}: checkpoint was made with another ROI/model configuration"
            )
        try:
            objective.load_state_dict(state)
            optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise WeightsError(f"{target}: checkpoint does not fit this model ({e})") from e
        set_rng_states(info["rng"])
        rows = list(info.get("metrics", []))
        start = int(info["epoch"]) + 1
    distributed.barrier()  # every rank has checked and read out_dir before rank 0 writes to it
    if main:
        if found is not None:  # metrics.csv may run ahead of the checkpoint (killed in between)
            write_rows_csv(out_dir / METRICS_FILE, rows, METRIC_FIELDS)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / CONFIG_FILE)
    writer = _tensorboard(out_dir) if main else None
    # which backbone weights file (and its sha256) the student started from, in every checkpoint
    provenance = getattr(
        objective.student if hasattr(objective, "student") else objective,
        "weights_provenance",
        None,
    )

    if hasattr(objective, "plan_steps"):  # mSupMoCo's EMA momentum from the run's length
        objective.plan_steps(total * (len(train_ds) // max(int(tc.batch_size), 1)))
    model = distributed.wrap(objective, device)
    last = start - 1
    with distributed.synced_batch_norms(objective):
        for epoch in range(start, total + 1):
            if stop_after is not None and epoch > stop_after:
                break
            row = _train_epoch(
                model, objective, optimizer, train_ds, cfg, fold, epoch, device, progress
            )
            recalibrate_head_norm(
                objective.student if hasattr(objective, "student") else objective,
                train_ds,
                batch_size=tc.batch_size,
                device=device,
            )
            # every rank computed the same statistics; rank 0's are the ones it saves
            distributed.broadcast_buffers(objective)
            last = epoch
            if not main:
                distributed.barrier()  # rank 0 validates and writes the checkpoint
                continue
            oof = (
                predict_dataset(
                    objective, val_ds, batch_size=tc.batch_size, device=device, amp=tc.amp
                )
                if val_ds is not None and len(val_ds)
                else []
            )
            row.update(_val_metrics(oof))
            lrs = {g.get("name", ""): g["lr"] for g in optimizer.param_groups}
            row["lr_backbone"] = lrs.get("backbone", lrs.get("backbone_no_decay", math.nan))
            row["lr_head"] = lrs.get("head", lrs.get("head_no_decay", math.nan))
            row["seconds"] = time.perf_counter() - row.pop("_t0")
            rows.append(row)
            if writer is not None:
                for k, v in row.items():
                    if isinstance(v, float) and math.isfinite(v):
                        writer.add_scalar(k, v, epoch)
            write_rows_csv(out_dir / METRICS_FILE, rows, METRIC_FIELDS)
            save_checkpoint(
                ckpt_dir,
                epoch,
                objective.state_dict(),
                optimizer.state_dict(),
                {
                    "config": cfg.to_dict(),
                    "fold": fold,
                    "metrics": rows,
                    "weights_provenance": provenance,
                },
            )
            distributed.barrier()
            if progress:
                tqdm.write(
                    f"fold {fold} epoch {epoch}/{total} [{stage_of(epoch, tc.pretrain_epochs)}] "
                    f"loss {row.get('loss', math.nan):.4f} "
                    f"val_acc {row['val_acc']:.3f} val_auc {row['val_auc']:.3f}"
                )
    if writer is not None:
        writer.close()
    finished = last >= total
    result = FoldResult(
        fold=fold, out_dir=out_dir, epochs_done=last, finished=finished, metrics=rows
    )
    if finished and main:
        patients: dict[str, torch.Tensor] = {}
        oof = (
            predict_dataset(
                objective,
                val_ds,
                batch_size=tc.batch_size,
                device=device,
                amp=tc.amp,
                patients=patients,
            )
            if val_ds is not None and len(val_ds)
            else []
        )
        # the out-of-fold controls' mean patient vector: the anchor of mrn site-adapt
        write_anchor(out_dir, patients, [r["case_id"] for r in oof if r["label"] == 0])
        write_rows_csv(
            out_dir / OOF_FILE,
            [{**r, "fold": fold} for r in oof],
            OOF_COLUMNS,
        )
        if oof:  # per-fold temperature on its own out-of-fold cases (training/calibration.py)
            calibrate_fold_dir(out_dir, oof, fold)
        student = objective.student
        # the training controls' mean slice tokens: the baseline of per-slice evidence
        reference = fit_reference_slices(student, train_ds, device=device)
        if reference is not None:
            write_reference_slices(out_dir, *reference)
        if hasattr(student, "weights_provenance") and hasattr(student, "arch"):
            # provenance (backbone weights file, sha256) in the safetensors metadata
            save_model(student, out_dir / WEIGHTS_FILE, cfg)
        else:
            save_state_dict(student.state_dict(), out_dir / WEIGHTS_FILE)
        save_torch(optimizer.state_dict(), out_dir / OPTIMIZER_FILE)
        atomic_write_text(out_dir / DONE_FILE, json.dumps({"fold": fold, "epochs": last}))
        result.oof = oof
    distributed.barrier()  # the fold's files exist before any rank moves on
    return result


def stage_of(epoch: int, pretrain_epochs: int) -> str:
    """``"pretrain"`` for the first ``pretrain_epochs`` epochs, then ``"train"``."""
    return "pretrain" if epoch <= pretrain_epochs else "train"


def check_global_batch(batch_size: int, world: int) -> int:
    """Cases per rank; ``ConfigError`` unless the global ``batch_size`` divides by ``world``."""
    per_rank, rest = divmod(int(batch_size), world)
    if rest or per_rank < 1:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch and must divide by the {world} "
            "ranks (--batch-size)"
        )
    return per_rank


def check_world(objective: nn.Module, train_ds: RoiStackDataset, batch_size: int, world: int):
    """``ConfigError`` unless ``world`` ranks can split the global batch ``batch_size``.

    Each rank needs ``batch_size / world`` cases per step (an integer), at least 2 when the
    model has BatchNorm (the head falls back to running statistics for a single case, which
    would differ from the single-process step), and the fold at least one global batch.
    """
    if world == 1:
        return
    per_rank = check_global_batch(batch_size, world)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in objective.modules())
    if has_bn and per_rank < 2:
        raise ConfigError(
            f"train.batch_size={batch_size} over {world} ranks gives 1 case per rank; this "
            f"model has BatchNorm and needs at least 2 (--batch-size {2 * world})"
        )
    if len(train_ds) < batch_size:
        raise ConfigError(
            f"{len(train_ds)} training cases are fewer than one global batch of {batch_size}"
        )


def _train_epoch(
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_ds: RoiStackDataset,
    cfg: RunConfig,
    fold: int,
    epoch: int,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """One epoch of optimiser steps; the metrics row (losses over all ranks' cases)."""
    tc = cfg.train
    total = int(tc.pretrain_epochs) + int(tc.epochs)
    stage = stage_of(epoch, tc.pretrain_epochs)
    seed_everything(epoch_seed(tc.seed, fold, epoch))
    t0 = time.perf_counter()
    objective.train()
    loader = make_loader(
        train_ds,
        tc.batch_size,
        shuffle=True,
        seed=tc.seed * 31 + fold,
        epoch=epoch,
        num_workers=tc.num_workers,
        drop_last=True,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    sums: dict[str, float] = {}
    n_seen, n_correct = 0, 0
    bar = tqdm(
        loader,
        desc=f"fold {fold} epoch {epoch}/{total} [{stage}]",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    )
    for batch in bar:
        batch = to_device(batch, device)
        with autocast(device, tc.amp):
            out = model(batch, stage=stage)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise ConfigError(
                f"fold {fold} epoch {epoch}: loss is {loss.item()} (lower the learning rates)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step()
        b = int(batch["label"].shape[0])
        n_seen += b
        for k, v in out.items():
            if k.startswith("loss") and torch.is_tensor(v):
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * b
        if "logits" in out:
            n_correct += int((out["logits"].detach().argmax(1) == batch["label"]).sum())
        bar.set_postfix({k: f"{v / n_seen:.3f}" for k, v in sums.items()})
    bar.close()
    names = sorted(sums)
    on = device if device.type == "cuda" else torch.device("cpu")  # NCCL reduces CUDA tensors
    local = torch.tensor([*(sums[k] for k in names), n_seen, n_correct], dtype=torch.float64)
    totals = distributed.all_reduce_sum(local.to(on)).tolist()
    sums = dict(zip(names, totals[: len(names)], strict=True))
    n_seen, n_correct = int(totals[-2]), int(totals[-1])
    row: dict[str, Any] = {"epoch": epoch, "stage": stage, "_t0": t0}
    row.update({k: v / max(n_seen, 1) for k, v in sums.items()})
    row["train_acc"] = n_correct / n_seen if n_seen and stage == "train" else math.nan
    if hasattr(objective, "epoch_metrics"):
        row.update(objective.epoch_metrics())
    return row
