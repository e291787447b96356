"""``mrn bench model``: parameters, latency and peak memory of a preset's network.

Measured, each as the median of ``repeats`` runs after one warm-up:

- ``forward``: one patient (4 ROIs, batch 1), eval mode, no grad -- the inference cost;
- ``dinov2``: the bare DINOv2 forward over the same slices (all ROIs' slices in one batch),
  and the ratio forward / dinov2 = what FFA + DPT + SFA + head add;
- ``masking16``: the 16-subset ROI masking analysis = one forward + the four empty-ROI
  tokens (cache cleared each time: the first case) + 16 head passes, and its ratio to one
  forward; ``masking16_cached``: the same with the empty tokens cached (every later case);
- ``flops``: GFLOP of ``forward``, ``dinov2`` and the diagnosis-only forward (no DPT head)
  counted by ``torch.utils.flop_counter``
  (load-independent ratio);
- ``train_step``: one optimiser step at batch ``batch`` (train mode, mSupMoCo wrapper when
  ``use_moco``, full loss, backward, AdamW).

Peak memory = the most bytes the call holds allocated at once on top of what existed before
it (parameters, inputs): on CUDA ``torch.cuda.max_memory_allocated`` (reset before each run);
on CPU replayed from ``torch.profiler`` memory events of the (untimed) warm-up run
(operator granularity). CUDA runs use bf16 autocast; attention uses SDPA everywhere.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from mrn_engine.config import RunConfig
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import ConfigError
from mrn_engine.models.evidence import capture_slice_tokens, slice_evidence
from mrn_engine.models.factory import build_model, build_training_wrapper, param_groups
from mrn_engine.models.losses import compute_losses
from mrn_engine.runtime import resolve_device


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes torch holds allocated during ``fn``, from ``torch.profiler`` memory events.

    Every operator's net allocation (``self_cpu_memory_usage``) and every free event is
    replayed in time order; the maximum running sum is the peak (at operator granularity).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak


def _measure(
    fn: Callable[[], object], device: torch.device, repeats: int, memory: bool = True
) -> tuple[float, float]:
    """(median seconds, peak memory MiB) of ``fn`` over ``repeats`` timed runs.

    A first, untimed warm-up run comes before; on CPU it is the profiled memory run.
    """
    cuda = device.type == "cuda"
    peak = 0
    if cuda or not memory:
        fn()
    else:
        gc.collect()
        peak = _cpu_peak_bytes(fn)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start_mem = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - start_mem)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak / 2**20


PARTS = ("forward", "dinov2", "masking", "explain", "train", "flops")


def _gflop(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call (``torch.utils.flop_counter``: matmuls, convs,
    attention), in GFLOP -- independent of the machine's load."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def _batch(cfg: RunConfig, batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    s = cfg.roi.image_size
    images = {
        n: (torch.rand(batch, cfg.roi.slices[n], s, s, generator=g) * 255).to(device)
        for n in ROI_NAMES
    }
    masks = {
        n: torch.randint(
            0, ROI_BY_NAME[n].num_classes, (batch, cfg.roi.slices[n], s, s), generator=g
        ).to(device)
        for n in ROI_NAMES
    }
    return {"images": images, "masks": masks, "label": (torch.arange(batch) % 2).to(device)}


def bench_model(
    cfg: RunConfig,
    device: str = "cpu",
    *,
    repeats: int = 3,
    batch: int = 4,
    train: bool = True,
    parts: tuple[str, ...] = PARTS,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure the network of ``cfg`` (random weights). Returns a flat dict of figures.

    ``parts``: which of ``PARTS`` to measure (ratios need ``forward`` too).
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ConfigError(f"unknown bench part(s) {sorted(unknown)}; choose from {PARTS}")
    dev = resolve_device(device)
    log = log or (lambda _msg: None)
    cfg = cfg.replace(model={"allow_random_init": True, "backbone_weights": None})
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    model = build_model(cfg).to(dev).eval()
    n_params = sum(p.numel() for p in model.parameters())
    result: dict = {
        "preset": cfg.preset,
        "arch": cfg.model.arch,
        "device": str(dev),
        "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "image_size": cfg.roi.image_size,
        "slices": sum(cfg.roi.slices.values()),
        "params_M": n_params / 1e6,
        "batch": batch,
        "repeats": repeats,
        "load_avg_start": _load_average(),
    }
    if cfg.model.arch == "mrn":
        result["backbone_params_M"] = (
            sum(p.numel() for p in model.res.patchnizer.parameters()) / 1e6
        )
    one = _batch(cfg, 1, dev)
    masks = one["masks"] if model.needs_masks else None

    def forward() -> None:
        with torch.no_grad(), amp:
            model(one["images"], masks)

    if "forward" in parts:
        log("forward, one patient ...")
        result["forward_s"], result["forward_peak_MiB"] = _measure(forward, dev, repeats)

    slices = torch.cat([one["images"][n][0] for n in ROI_NAMES])

    def dinov2() -> None:
        patchnizer = model.res.patchnizer
        with torch.no_grad(), amp:
            patchnizer.vit.forward_features(patchnizer.normalise(slices))

    if cfg.model.arch == "mrn" and "dinov2" in parts:
        log("bare DINOv2 forward ...")
        result["dinov2_s"], result["dinov2_peak_MiB"] = _measure(dinov2, dev, repeats)
        if "forward_s" in result:
            result["forward_over_dinov2"] = result["forward_s"] / result["dinov2_s"]

    from itertools import combinations

    subsets = [set(c) for k in range(5) for c in combinations(ROI_NAMES, k)]

    def masking() -> None:
        model._empty_cache.clear()
        with torch.no_grad(), amp:
            out = model(one["images"], masks)
            for masked in subsets:
                model.classify_tokens(out.roi_tokens, masked)

    def masking_cached() -> None:
        with torch.no_grad(), amp:
            out = model(one["images"], masks)
            for masked in subsets:
                model.classify_tokens(out.roi_tokens, masked)

    def diagnosis() -> None:  # diagnosis only: the DPT segmentation head skipped
        with torch.no_grad(), amp:
            model(one["images"], masks, with_seg=False)

    if "flops" in parts:
        log("FLOP count ...")
        result["forward_GFLOP"] = _gflop(forward)
        if cfg.model.arch == "mrn":
            result["dinov2_GFLOP"] = _gflop(dinov2)
            result["forward_over_dinov2_flops"] = result["forward_GFLOP"] / result["dinov2_GFLOP"]
            result["diagnosis_GFLOP"] = _gflop(diagnosis)
            result["diagnosis_over_dinov2_flops"] = (
                result["diagnosis_GFLOP"] / result["dinov2_GFLOP"]
            )

    if "masking" in parts:
        log("16-subset masking analysis ...")
        result["masking16_s"], _ = _measure(masking, dev, repeats, memory=False)
        result["masking16_cached_s"], _ = _measure(masking_cached, dev, repeats, memory=False)
        if "forward_s" in result:
            result["masking16_over_forward"] = result["masking16_s"] / result["forward_s"]
            result["masking16_cached_over_forward"] = (
                result["masking16_cached_s"] / result["forward_s"]
            )

    if "explain" in parts and cfg.model.arch == "mrn" and not cfg.model.dinov2_only:
        with torch.no_grad(), amp, capture_slice_tokens(model) as first:
            model(one["images"], masks)
        # a healthy reference of the right shape (S, D) per ROI: the cost does not depend on it
        reference = {n: t[0].float() for n, t in first.items()}

        def explain(reference: dict | None = reference) -> None:
            # the prediction forward + per-slice evidence, no 2nd backbone pass
            with torch.no_grad(), amp, capture_slice_tokens(model) as store:
                model(one["images"], masks)
            slice_evidence(model, store, reference=reference)

        log("forward + per-slice evidence (healthy reference, and leave-out) ...")
        result["explain_s"], _ = _measure(explain, dev, repeats, memory=False)
        result["explain_leave_out_s"], _ = _measure(
            lambda: explain(None), dev, repeats, memory=False
        )
        if "forward_s" in result:
            result["explain_over_forward"] = result["explain_s"] / result["forward_s"]
            result["explain_leave_out_over_forward"] = (
                result["explain_leave_out_s"] / result["forward_s"]
            )
        if "forward_GFLOP" in result:
            result["explain_GFLOP"] = _gflop(explain)
            result["explain_over_forward_flops"] = result["explain_GFLOP"] / result["forward_GFLOP"]

    if train and "train" in parts:
        wrapper = build_training_wrapper(model, cfg).to(dev).train()
        opt = torch.optim.AdamW(param_groups(wrapper, cfg.train), betas=cfg.train.betas)
        data = _batch(cfg, batch, dev)

        def step() -> None:
            with amp:
                out = wrapper.step(data)
                loss = compute_losses(out, data, "train", cfg.model)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        log(f"training step, batch {batch} ...")
        result["train_step_s"], result["train_step_peak_MiB"] = _measure(step, dev, repeats)
    result["load_avg_end"] = _load_average()
    return result


def _load_average() -> float | None:
    """1-minute load average (other processes competing for the CPU), None where unknown."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def format_result(result: dict) -> str:
    """The figures as a two-column markdown table."""
    rows = ["| quantity | value |", "|---|---|"]
    for key, value in result.items():
        rows.append(
            f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |"
        )
    return "\n".join(rows)
