"""``mrn bench model``: parameters, latency and peak memory of a preset's network.

Measured, each as the median of ``repeats`` runs after one warm-up:

- ``forward``: one patient (4 ROIs, batch 1), eval mode, no grad -- the inference cost;
- ``dinov2``: the bare DINOv2 forward over the same slices (all ROIs' slices in one batch),
  and the ratio forward / dinov2 = what FFA + DPT + SFA + head add;
- ``masking16``: the 16-subset ROI masking analysis = one forward + the four empty-ROI
  tokens (cache cleared each time, i.e. the worst case) + 16 head passes, and its ratio to
  one forward;
- ``train_step``: one optimiser step at batch ``batch`` (train mode, mSupMoCo wrapper when
  ``use_moco``, full loss, backward, AdamW).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each measurement);
on CPU the peak increase of the process's resident set size during the call, sampled every
2 ms from ``/proc/self/statm`` (allocator caching can hide re-used memory, so it is a lower
bound of what the call needs on top of what the process already holds). CUDA runs use bf16
autocast; attention uses SDPA everywhere.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from mrn_engine.config import RunConfig
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import ConfigError

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the (monotonic) max RSS
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssPeak:
    """Context manager sampling RSS in a thread; ``peak`` = max increase in bytes."""

    def __enter__(self) -> _RssPeak:
        gc.collect()
        self.base = self.peak_rss = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_rss = max(self.peak_rss, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, _rss_bytes())

    @property
    def peak(self) -> int:
        return self.peak_rss - self.base


def _measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory MiB) of ``fn`` after one warm-up call."""
    cuda = device.type == "cuda"
    fn()
    times, peaks = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start_mem = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated(device) - start_mem)
        else:
            with _RssPeak() as mem:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            peaks.append(mem.peak)
    return statistics.median(times), max(peaks) / 2**20


def _batch(cfg: RunConfig, batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    s = cfg.roi.image_size
    images = {n: (torch.rand(batch, cfg.roi.slices[n], s, s, generator=g) * 255).to(device) for n in ROI_NAMES}
    masks = {n: torch.randint(0, ROI_BY_NAME[n].num_classes, (batch, cfg.roi.slices[n], s, s), generator=g).to(device)
             for n in ROI_NAMES}
    return {"images": images, "masks": masks, "label": (torch.arange(batch) % 2).to(device)}


def bench_model(
    cfg: RunConfig,
    device: str = "cpu",
    *,
    repeats: int = 3,
    batch: int = 4,
    train: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure the network of ``cfg`` (random weights). Returns a flat dict of figures."""
    from mrn_engine.models.factory import build_model, build_training_wrapper, param_groups
    from mrn_engine.models.losses import compute_losses

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    log = log or (lambda _msg: None)
    cfg = cfg.replace(model={"allow_random_init": True, "backbone_weights": None})
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    model = build_model(cfg).to(dev).eval()
    n_params = sum(p.numel() for p in model.parameters())
    result: dict = {
        "preset": cfg.preset, "arch": cfg.model.arch, "device": str(dev),
        "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "image_size": cfg.roi.image_size, "slices": sum(cfg.roi.slices.values()),
        "params_M": n_params / 1e6, "batch": batch, "repeats": repeats,
    }
    if cfg.model.arch == "mrn":
        result["backbone_params_M"] = sum(p.numel() for p in model.res.patchnizer.parameters()) / 1e6
    one = _batch(cfg, 1, dev)
    masks = one["masks"] if model.needs_masks else None

    def forward() -> None:
        with torch.no_grad(), amp:
            model(one["images"], masks)

    log("forward, one patient ...")
    result["forward_s"], result["forward_peak_MiB"] = _measure(forward, dev, repeats)

    if cfg.model.arch == "mrn":
        slices = torch.cat([one["images"][n][0] for n in ROI_NAMES])
        patchnizer = model.res.patchnizer

        def dinov2() -> None:
            with torch.no_grad(), amp:
                patchnizer.vit.forward_features(patchnizer.normalise(slices))

        log("bare DINOv2 forward ...")
        result["dinov2_s"], result["dinov2_peak_MiB"] = _measure(dinov2, dev, repeats)
        result["forward_over_dinov2"] = result["forward_s"] / result["dinov2_s"]

    from itertools import combinations

    subsets = [set(c) for k in range(5) for c in combinations(ROI_NAMES, k)]

    def masking() -> None:
        model._empty_cache.clear()
        with torch.no_grad(), amp:
            out = model(one["images"], masks)
            for masked in subsets:
                model.classify_tokens(out.roi_tokens, masked)

    log("16-subset masking analysis ...")
    result["masking16_s"], _ = _measure(masking, dev, repeats)
    result["masking16_over_forward"] = result["masking16_s"] / result["forward_s"]

    if train:
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
    return result


def format_result(result: dict) -> str:
    """The figures as a two-column markdown table."""
    rows = ["| quantity | value |", "|---|---|"]
    for key, value in result.items():
        rows.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(rows)
