"""One-shot GPU check of the MRN engine against the challenge limits (driven by gpu_check.sh).

Measures, on random weights (speed and memory only; no figure here says anything about
accuracy):

1. ``paper-vitb`` forward for one patient (``mrn bench model`` part ``forward``; bf16 autocast
   on CUDA): seconds and peak GPU memory;
2. the ``paper-vitb`` training step at batch 4 (part ``train``): seconds and peak memory;
3. mask-free diagnosis per case: nnU-Net NM + QSM masks (5 folds, mirroring, random-weight
   full-width 3d_fullres networks written by ``segmentation.synthetic``), then the 5-fold MRN
   ensemble with TTA, on phantom cases of the challenge grid (300 x 300 x 70), both with
   nnU-Net's own whole-volume sliding window and with the localised one;

and writes a markdown report that compares each figure with the challenge limits (30 s per
case, under 12 GB of GPU memory) and the issue's targets (mask-free 5-fold + TTA <= 5 s per
case and <= 12 GB; paper-vitb training step at batch 4 <= 24 GB).

``--cpu-smoke`` runs the same steps with ``cpu-tiny``, tiny random nnU-Net models and 2 folds
on the CPU, to check the script end to end; its report says so in its title.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

GB = 2**30
CHALLENGE_S, CHALLENGE_GB = 30.0, 12.0
TARGET_MASK_FREE_S, TARGET_MASK_FREE_GB, TARGET_TRAIN_GB = 5.0, 12.0, 24.0


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def model_parts(preset: str, device: torch.device, out: dict) -> None:
    """paper-vitb forward (1 patient) and training step at batch 4."""
    from mrn_engine.config import get_preset
    from mrn_engine.models.bench import bench_model

    cfg = get_preset(preset)
    _reset(device)
    r = bench_model(cfg, str(device), repeats=3, parts=("forward",), train=False)
    out["forward"] = {"s": r["forward_s"], "peak_gb": _peak_gb(device), "params_M": r["params_M"]}
    _reset(device)
    r = bench_model(cfg, str(device), repeats=2, batch=4, parts=("train",))
    out["train_b4"] = {"s": r["train_step_s"], "peak_gb": _peak_gb(device)}


def random_mrn_bundle(root: Path, preset: str, folds: int) -> Path:
    """A model bundle with random weights (layout of ``mrn train``)."""
    from mrn_engine.config import get_preset
    from mrn_engine.models import build_model, save_model

    # percentile intensity mapping: random nnU-Net masks have no usable NM reference region
    cfg = get_preset(preset).replace(
        model={"allow_random_init": True, "backbone_weights": None},
        roi={"intensity": "percentile"},
    )
    root.mkdir(parents=True, exist_ok=True)
    cfg.save(root / "config.json")
    info = {
        "folds": [{"fold": k, "train": ["RJPD_001"], "val": ["RJPD_002"]} for k in range(folds)]
    }
    (root / "bundle.json").write_text(json.dumps(info))
    for k in range(folds):
        torch.manual_seed(k)
        save_model(
            build_model(cfg, pretrained=False), root / f"fold_{k}" / "model.safetensors", cfg
        )
    return root


def mask_free(work: Path, preset: str, nn_preset: str, folds: int, n_cases: int,
              device: torch.device, out: dict) -> None:  # fmt: skip
    """Mask-free diagnosis per case: nnU-Net masks (folds, mirroring) + MRN folds with TTA."""
    from mrn_engine.data import discover_cases, load_case
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.phantom import generate_cohort
    from mrn_engine.segmentation import NNUNetSegmenter
    from mrn_engine.segmentation.settings import SegInferenceSettings
    from mrn_engine.segmentation.synthetic import write_random_bundle

    t0 = time.perf_counter()
    generate_cohort(work / "cases", n=max(2, n_cases + 1), seed=0, workers=2, progress=False)
    cases = [load_case(cf) for cf in discover_cases(work / "cases")][: n_cases + 1]
    out["phantoms_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle = random_mrn_bundle(work / "bundle", preset, folds)
    # smoke: the tiny networks at a 4 mm grid (few tiles) so the CPU run takes minutes
    coarse = {"spacing": (4.0, 4.0, 4.0)} if nn_preset == "tiny" else {}
    nnunet = write_random_bundle(
        work / "bundle", preset=nn_preset, folds=tuple(range(folds)), **coarse
    )
    out["random_models_s"] = time.perf_counter() - t0
    runs = {
        "nnU-Net default (mirroring, step 0.5, whole volume)": SegInferenceSettings(
            use_mirroring=True, tile_step_size=0.5, localize=False
        ),
        "localised (mirroring, step 0.5)": SegInferenceSettings(
            use_mirroring=True, tile_step_size=0.5, localize=True
        ),
    }
    out["mask_free"] = {}
    for name, settings in runs.items():
        seg = NNUNetSegmenter.from_bundle(nnunet, device=device, settings=settings).load()
        mrn = MRNPredictor.from_bundle(
            bundle, device=device, tta=True, segmenter=seg, ignore_masks=True
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrn.predict_case(cases[0])  # warm-up: first-call costs (cuDNN plans, caches)
            _reset(device)
            times, seg_times = [], []
            for case in cases[1:]:
                t = time.perf_counter()
                mrn.predict_case(case)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t)
                seg_times.append(sum(f["total_s"] for f in seg.last_figures.values()))
        out["mask_free"][name] = {
            "s": statistics.mean(times),
            "s_max": max(times),
            "nnunet_s": statistics.mean(seg_times),
            "peak_gb": _peak_gb(device),
            "tiles": {m: f["tiles_evaluated"] for m, f in seg.last_figures.items()},
            "window_fraction": {m: f["window_fraction"] for m, f in seg.last_figures.items()},
        }
        del seg, mrn


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    return "PASS" if value <= limit else "FAIL"


def report(res: dict, smoke: bool) -> str:
    """The markdown report."""
    title = (
        "# GPU check: CPU SMOKE RUN (cpu-tiny, tiny random nnU-Net) -- NOT GPU FIGURES"
        if smoke
        else "# GPU check (`docs/scripts/gpu_check.sh`)"
    )
    gb = lambda v: "n/a (CPU)" if v is None else f"{v:.2f} GB"  # noqa: E731
    lines = [
        title,
        "",
        f"Date {res['date']}; device: {res['device_name']}; torch {res['torch']}; "
        f"python {res['python']}; preset `{res['preset']}`, nnU-Net random `{res['nn_preset']}`, "
        f"{res['folds']} folds; {res['n_cases']} timed phantom case(s) on the challenge grid "
        f"after one warm-up case. Weights are random: speed and memory only.",
        "",
        "| measurement | time | peak memory | limit / target | verdict |",
        "|---|---|---|---|---|",
    ]
    f = res.get("forward")
    if f:
        lines.append(
            f"| {res['preset']} forward, 1 patient (bf16 on CUDA) | {f['s']:.3f} s | "
            f"{gb(f['peak_gb'])} | challenge: 30 s, 12 GB | "
            f"{_verdict(f['s'], CHALLENGE_S)} / {_verdict(f['peak_gb'], CHALLENGE_GB)} |"
        )
    for name, m in (res.get("mask_free") or {}).items():
        lines.append(
            f"| mask-free diagnosis per case, {res['folds']}-fold nnU-Net + MRN with TTA, "
            f"{name} (nnU-Net part {m['nnunet_s']:.2f} s) | {m['s']:.2f} s (max {m['s_max']:.2f}) "
            f"| {gb(m['peak_gb'])} | challenge: 30 s, 12 GB; issue: 5 s, 12 GB | "
            f"{_verdict(m['s'], CHALLENGE_S)}, {_verdict(m['s'], TARGET_MASK_FREE_S)} / "
            f"{_verdict(m['peak_gb'], TARGET_MASK_FREE_GB)} |"
        )
    t = res.get("train_b4")
    if t:
        lines.append(
            f"| {res['preset']} training step, batch 4 | {t['s']:.3f} s | {gb(t['peak_gb'])} | "
            f"issue: 24 GB | {_verdict(t['peak_gb'], TARGET_TRAIN_GB)} |"
        )
    lines += ["", "Peak memory = `torch.cuda.max_memory_allocated` of the timed runs "
              "(model, inputs and activations)."]  # fmt: skip
    for name, m in (res.get("mask_free") or {}).items():
        lines.append(
            f"- {name}: nnU-Net tiles per modality {m['tiles']}, window fraction "
            f"{m['window_fraction']} (random networks mark foreground nearly everywhere, so the "
            "localised window is about the whole volume here; trained models give small windows)."
        )
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--out", type=Path, required=True, help="markdown report to write")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder")
    ap.add_argument("--cases", type=int, default=2, help="timed mask-free cases")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device_name": "CPU" if smoke else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "preset": "cpu-tiny" if smoke else "paper-vitb",
        "nn_preset": "tiny" if smoke else "full",
        "folds": 2 if smoke else 5,
        "n_cases": args.cases,
        "errors": [],
    }
    steps = (
        ("model", lambda: model_parts(res["preset"], device, res)),
        ("mask-free", lambda: mask_free(args.work, res["preset"], res["nn_preset"], res["folds"],
                                        args.cases, device, res)),
    )  # fmt: skip
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            step()
        except KeyboardInterrupt:  # gpu_check.sh's 8-minute budget (SIGINT)
            res["errors"].append(f"{name}: stopped by the time budget")
            break
        except Exception as e:  # noqa: BLE001 - every failure goes into the report
            traceback.print_exc()
            res["errors"].append(f"{name}: {type(e).__name__}: {e}")
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    text = report(res, smoke)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    print(text)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
