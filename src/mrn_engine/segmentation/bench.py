"""``mrn bench seg``: seconds per case and Dice of nnU-Net mask settings (the mask-free path).

Each setting (``mirror-0.5-whole`` = mirroring, tile step 0.5, whole volume: nnU-Net's own
defaults) predicts the NM and QSM masks of the same cases; the figures are seconds per case,
tiles evaluated and the mean Dice of every setting's masks against the first setting's (the
reference). With an MRN bundle (``model``) the mask-free diagnosis itself is timed too:
masks from nnU-Net with the last setting, then the MRN ensemble, per case.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrn_engine.data import discover_cases, load_case
from mrn_engine.errors import ConfigError, InputDataError, MRNError, MRNWarning
from mrn_engine.segmentation.predict import NNUNetSegmenter
from mrn_engine.segmentation.settings import BENCH_SETTINGS, SegInferenceSettings

DEFAULT_SETTINGS = BENCH_SETTINGS


def parse_setting(name: str) -> SegInferenceSettings:
    """``{mirror|nomirror}-{step}-{whole|local|oracle}`` -> settings (ConfigError otherwise).

    ``oracle`` = ``local`` whose window comes from the case's true masks (timing of
    random-weight models; the coarse pass still runs).
    """
    parts = name.strip().split("-")
    ok = len(parts) == 3 and parts[0] in ("mirror", "nomirror")
    if not ok or parts[2] not in ("whole", "local", "oracle"):
        raise ConfigError(
            f"segmentation setting {name!r}: expected {{mirror|nomirror}}-STEP-{{whole|local}}, "
            "e.g. nomirror-0.75-local"
        )
    try:
        step = float(parts[1])
    except ValueError:
        raise ConfigError(
            f"segmentation setting {name!r}: step {parts[1]!r} is not a number"
        ) from None
    return SegInferenceSettings(
        use_mirroring=parts[0] == "mirror", tile_step_size=step, localize=parts[2] != "whole"
    )


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground labels present in either mask (1.0 when both are empty)."""
    labels = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    if not labels:
        return 1.0
    scores = []
    for v in labels:
        x, y = a == v, b == v
        scores.append(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


def _load_avg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def bench_segmentation(
    nnunet_dir: str | os.PathLike,
    cases_dir: str | os.PathLike,
    *,
    settings: Sequence[str] = DEFAULT_SETTINGS,
    n_cases: int = 2,
    device: str = "cpu",
    diagnose: Callable[[NNUNetSegmenter], Callable[[Any], Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every setting on the first ``n_cases`` cases; Dice against the first setting.

    ``diagnose``: segmenter -> ``predict_case`` of an MRN predictor using it (the CLI builds
    it from an MRN bundle); then the mask-free diagnosis is timed with the last setting.
    """
    log = log or (lambda _m: None)
    parsed = {name: parse_setting(name) for name in settings}
    found = discover_cases(cases_dir)[:n_cases]
    if not found:
        raise InputDataError(f"{cases_dir}: no case folders (with NM.nii.gz / QSM.nii.gz) found")
    cases = [load_case(cf) for cf in found]
    result: dict[str, Any] = {
        "nnunet": str(nnunet_dir),
        "cases": [c.case_id for c in cases],
        "shape": list(cases[0].nm.shape),
        "device": device,
        "load_avg_start": _load_avg(),
        "rows": [],
    }
    masks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, st in parsed.items():
        seg = NNUNetSegmenter.from_bundle(nnunet_dir, device=device, settings=st).load()
        times, tiles, calls, windows = [], [], [], []
        masks[name] = []
        for case in cases:
            log(f"{name}: {case.case_id} ...")
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MRNWarning)
                if name.endswith("-oracle"):
                    if case.nm_mask is None or case.qsm_mask is None:
                        raise InputDataError(f"{case.case_id}: -oracle settings need mask files")
                    nm = seg.predict_volume(case.nm, "NM", oracle=case.nm_mask)
                    qsm = seg.predict_volume(case.qsm, "QSM", oracle=case.qsm_mask)
                else:
                    nm, qsm = seg.predict(case, strict=False)
            times.append(time.perf_counter() - t0)
            figs = seg.last_figures.values()
            tiles.append(sum(f["tiles_evaluated"] for f in figs))
            calls.append(
                sum(f["tiles_coarse"] + f["tiles_fine"] * f["calls_per_tile"] for f in figs)
            )
            windows.append([round(f["window_fraction"], 3) for f in figs])
            masks[name].append((nm.array, qsm.array))
        ref = masks[next(iter(parsed))]
        dices = [
            mean_dice(m, r)
            for mine, theirs in zip(masks[name], ref, strict=True)
            for m, r in zip(mine, theirs, strict=True)
        ]
        row = {
            "setting": name,
            "s_per_case": statistics.mean(times),
            "s_per_case_max": max(times),
            "tiles_per_case": statistics.mean(tiles),
            "network_calls_per_case": statistics.mean(calls),
            "window_fraction_nm_qsm": windows[0],
            "dice_vs_reference": float(np.mean(dices)),
            "dice_vs_reference_min": float(np.min(dices)),
        }
        result["rows"].append(row)
        log(
            f"{name}: {row['s_per_case']:.1f} s/case, Dice vs reference {row['dice_vs_reference']:.3f}"
        )
    if diagnose is not None:
        try:
            result["diagnosis"] = _bench_diagnosis(diagnose, nnunet_dir, cases, parsed, device)
        except MRNError as e:  # e.g. random-weight masks that MRN's preprocessing refuses
            result["diagnosis_error"] = str(e)
            log(f"mask-free diagnosis failed: {e}")
    result["load_avg_end"] = _load_avg()
    return result


def _bench_diagnosis(diagnose, nnunet_dir, cases, parsed, device) -> dict[str, Any]:
    """Mask-free diagnosis per case (nnU-Net masks with the last setting + MRN ensemble)."""
    name, st = list(parsed.items())[-1]
    seg = NNUNetSegmenter.from_bundle(nnunet_dir, device=device, settings=st).load()
    predict_case = diagnose(seg)
    predict_case(cases[0])  # warm-up (network build, first-call costs)
    times = []
    for case in cases:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MRNWarning)
            predict_case(case)
        times.append(time.perf_counter() - t0)
    return {"setting": name, "s_per_case": statistics.mean(times), "s_per_case_max": max(times)}


def format_result(result: dict[str, Any]) -> str:
    """The rows as a markdown table (+ the diagnosis line)."""
    lines = [
        f"cases {', '.join(result['cases'])} (grid {result['shape']}), device {result['device']}, "
        f"load average {result['load_avg_start']} -> {result['load_avg_end']}",
        "",
        "| setting | s/case (NM+QSM) | tiles/case | network calls/case | window NM, QSM "
        "| Dice vs reference (mean, min) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['setting']} | {r['s_per_case']:.1f} | {r['tiles_per_case']:.0f} | "
            f"{r['network_calls_per_case']:.0f} | {r['window_fraction_nm_qsm']} | "
            f"{r['dice_vs_reference']:.3f}, {r['dice_vs_reference_min']:.3f} |"
        )
    if "diagnosis_error" in result:
        lines += ["", f"mask-free diagnosis failed: {result['diagnosis_error']}"]
    if "diagnosis" in result:
        d = result["diagnosis"]
        lines += [
            "",
            f"mask-free diagnosis ({d['setting']} masks + MRN): {d['s_per_case']:.1f} s/case "
            f"(max {d['s_per_case_max']:.1f})",
        ]
    return "\n".join(lines)


def random_nnunet(folder: str | os.PathLike, preset: str = "tiny", folds: Sequence[int] = (0,)):
    """A random-weight ``nnunet`` folder for timing (``synthetic.write_random_bundle``)."""
    from mrn_engine.segmentation.synthetic import write_random_bundle

    return write_random_bundle(Path(folder), preset=preset, folds=folds)
