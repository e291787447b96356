"""Do the top-evidence slices fall where the phantom's PD effect sits? (+ captum comparison)

    python docs/scripts/evidence_localisation.py BUNDLE HELDOUT OUT.json [--ig-steps 16]
        [--controls] [--hc] [--method auto|reference|leave-out]

For every held-out PD phantom that the bundle calls PD, per-slice evidence
(``inference/evidence.py``: each slice replaced by the fold's healthy reference when the bundle
has one, else left out of SFA; ``--method`` forces one) of the ROI that holds each PD effect of
the generator (``phantom/case.py``):

- ``nm_sn``: NM depigmentation of the **lateral/posterior SNc**. The generator removes pigment
  ``loss * w`` with ``w`` growing laterally and posteriorly inside the SN (0.55 lateral + 0.45
  posterior, per side); ``w`` is recomputed here with the generator's own formula
  (``phantom.real_geometry.depigmentation_weight``) on the case's SN labels (QSM_mask 11/12,
  which is what the atlas generator uses as the SN sides). "Holds the nucleus": the slice has
  SN voxels with ``w >= 0.5`` (the lateral/posterior half) inside the ROI box.
- ``qsm_midbrain``: extra SN iron (``sev_slope`` on every SN voxel, QSM_mask 11/12). "Holds the
  nucleus": the slice has SN voxels inside the ROI box.

A stack slice stands for the source slices that paste-back maps to it. Measures (can fail):

1. ``hit``: the top (most PD-ward) slice holds the nucleus; ``chance``: the share of the ROI's
   slices that hold it (a random slice's hit rate), and ``p_random``: the probability that
   random slices (one per case) hit at least as often (10 000 draws).
2. ``upper_half``: the top slice's effect amount (NM: sum of ``w``; QSM: SN voxels) is at least
   the median over the ROI's slices; chance: the share of slices at or above the median.
3. ``spearman``: rank correlation of evidence and effect amount over the ROI's slices.
4. position-only baselines: the hit share of "always take stack slice i" for each i (the ROI
   boxes are centred on their nuclei, so a fixed middle slice may hit every time), and
   ``centred_spearman``: the rank correlation of each case's deviation from the cohort's mean
   evidence profile with its deviation from the mean effect profile (the case-specific part).

``--controls``: two checks of what leave-one-out measures (issue 15's "why the last NM slice"):

5. ``control``: the same leave-one-out evidence with the ROI's image replaced by a content-free
   volume (every voxel the crop's ``pad_value``, neutral tissue; the other ROIs as in the case).
   Its slices differ only by the slice position embedding, so whatever it shows is position
   and removal (one slice fewer in SFA's softmax), not content. Reported: its hit share, the
   share of cases where its top slice is the case's top slice, Spearman(evidence, control), and
   the level (mean over slices) against the slice-to-slice spread. (Always reported: the SFA
   ROI token's attention on the slices, min / max over slices and cases, and its mean weight
   on itself.)
6. ``occlusion``: exact, a full forward per slice: ``P(PD) - P(PD with that slice's image set
   to pad_value)``; its hit share, Spearman with the effect amount and with the evidence.

``--hc``: the held-out controls that the bundle calls HC too (no controls / IG for them):
per ROI their top slice's hit share and the mean of their largest and of their summed
evidence, beside the same for the PD cases. A measure that reads disease should give controls
little PD-ward evidence; a measure that only tracks where cases vary would hit as often.

``--ig-steps N`` (N > 0, needs captum): integrated gradients (captum, all-zero baseline = an
empty ROI, N steps, on the PD-HC logit, mean over folds) summed per slice, and its Spearman
correlation with the leave-one-slice-out evidence, plus the same hit measure for IG.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

SN = (11, 12)
EFFECT_ROIS = ("nm_sn", "qsm_midbrain")


def effect_per_slice(case, crop, roi: str) -> tuple[np.ndarray, np.ndarray]:
    """(holds, amount) per stack slice of ``crop`` for the PD effect of ``roi``."""
    from mrn_engine.phantom.real_geometry import depigmentation_weight
    from mrn_engine.rois.extract import _stack_to_source

    labels = np.asarray(case.qsm_mask.array)
    side = np.where(labels == SN[0], 1, np.where(labels == SN[1], 2, 0)).astype(np.uint8)
    b = crop.box
    if roi == "nm_sn":
        w = depigmentation_weight(side)[b.x0 : b.x1, b.y0 : b.y1]
        holds_z = (w >= 0.5).any(axis=(0, 1))
        amount_z = w.sum(axis=(0, 1))
    else:
        sn = side[b.x0 : b.x1, b.y0 : b.y1] > 0
        holds_z = sn.any(axis=(0, 1))
        amount_z = sn.sum(axis=(0, 1)).astype(np.float64)
    n = len(crop.slice_index)
    holds, amount, count = np.zeros(n, bool), np.zeros(n), np.zeros(n)
    for s, z in zip(*_stack_to_source(crop), strict=True):
        holds[s] |= bool(holds_z[z])
        amount[s] += amount_z[z]
        count[s] += 1
    real = count > 0
    amount[real] /= count[real]
    return holds, np.where(real, amount, np.nan)


def integrated_gradients(predictor, pred_inputs, roi: str, steps: int) -> np.ndarray:
    """(S,) IG of the PD-HC logit w.r.t. ``roi``'s crop, summed per slice, mean over folds."""
    import torch
    from captum.attr import IntegratedGradients

    model = predictor.model
    out = []
    for k in predictor.folds:
        predictor.ensemble.load(k)
        fixed = {n: t for n, t in pred_inputs.items() if n != roi}

        def forward(x: torch.Tensor, fixed=fixed) -> torch.Tensor:
            rois = {n: t.expand(x.shape[0], *t.shape[1:]) for n, t in fixed.items()}
            rois[roi] = x
            logits = model(rois, with_seg=False).logits.float()
            return logits[:, 1] - logits[:, 0]

        x = pred_inputs[roi].clone().requires_grad_(True)
        with torch.enable_grad():
            attr = IntegratedGradients(forward).attribute(
                x, baselines=torch.zeros_like(x), n_steps=steps, internal_batch_size=steps
            )
        out.append(attr[0].sum(dim=(1, 2)).detach().numpy())
    return np.mean(out, axis=0)


def control_evidence(predictor, pred_inputs, crops, roi: str, cache: dict) -> dict[str, np.ndarray]:
    """(S,) ``control`` and ``occlusion`` of ``roi`` (module docstring, 5-6): mean over folds,
    each fold's P(PD) calibrated like ``case_evidence``. ``cache``: (fold, ROI, pad) -> the
    content-free volume's slice tokens (one RES pass per fold and ROI, reused across cases)."""
    import torch

    from mrn_engine.inference.evidence import _calibrated
    from mrn_engine.models.ensemble import p_pd_of
    from mrn_engine.models.evidence import capture_slice_tokens, slice_evidence

    model = predictor.model
    x, pad = pred_inputs[roi], float(crops[roi].pad_value)
    n = x.shape[1]
    control, occlusion = [], []
    for k in predictor.folds:
        predictor.ensemble.load(k)
        with torch.inference_mode(), capture_slice_tokens(model) as store:
            p_full = float(p_pd_of(model(pred_inputs, with_seg=False).logits)[0])
        tokens = dict(store)
        key = (k, roi, round(pad, 4))
        if key not in cache:
            empty = {**pred_inputs, roi: torch.full_like(x, pad)}
            with torch.inference_mode(), capture_slice_tokens(model) as st:
                model(empty, with_seg=False)
            cache[key] = st[roi].clone()
        ev = slice_evidence(model, {**tokens, roi: cache[key]})
        p0 = _calibrated(predictor, k, ev.p_full.numpy())
        control.append(p0 - _calibrated(predictor, k, ev.p_without[roi][0].numpy()))
        occluded = x.repeat(n, 1, 1, 1)
        occluded[torch.arange(n), torch.arange(n)] = pad
        batch = {
            m: (occluded if m == roi else t.expand(n, *t.shape[1:])) for m, t in pred_inputs.items()
        }
        with torch.inference_mode():
            p_occ = p_pd_of(model(batch, with_seg=False).logits).float().numpy()
        occlusion.append(
            _calibrated(predictor, k, np.array([p_full])) - _calibrated(predictor, k, p_occ)
        )
    return {"control": np.mean(control, axis=0), "occlusion": np.mean(occlusion, axis=0)}


def hc_row(case, pred, ev) -> dict:
    """A control's top slice per effect ROI: does it hold the nucleus; its largest and summed
    evidence (real slices only)."""
    row = {"case_id": case.case_id, "rois": {}}
    for roi in EFFECT_ROIS:
        holds, amount = effect_per_slice(case, pred.crops[roi], roi)
        real = ~np.isnan(amount)
        e = ev.evidence[roi][real]
        row["rois"][roi] = {
            "hit": bool(holds[real][int(np.argmax(e))]),
            "top": float(e.max()),
            "total": float(e.sum()),
        }
    return row


def hc_summary(controls: list[dict], cases: list[dict]) -> dict[str, dict]:
    """Per effect ROI: controls' hit share and mean top / summed evidence, beside the PD cases'."""
    out = {}
    for roi in EFFECT_ROIS:
        pd_ev = [np.asarray(c["rois"][roi]["evidence"]) for c in cases]
        hc = [c["rois"][roi] for c in controls]
        out[roi] = {
            "hc_n": len(hc),
            "hc_hit_share": float(np.mean([r["hit"] for r in hc])) if hc else float("nan"),
            "hc_top_evidence_mean": float(np.mean([r["top"] for r in hc])) if hc else float("nan"),
            "hc_total_evidence_mean": float(np.mean([r["total"] for r in hc]))
            if hc
            else float("nan"),
            "pd_top_evidence_mean": float(np.mean([e.max() for e in pd_ev])),
            "pd_total_evidence_mean": float(np.mean([e.sum() for e in pd_ev])),
        }
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def summarise(cases: list[dict], ig: bool) -> dict[str, dict]:
    """The measures of the module docstring over the cases, per ROI."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    summary = {}
    for roi in EFFECT_ROIS:
        rs = [c["rois"][roi] for c in cases]
        hits = np.array([r["hit"] for r in rs])
        chance = np.array([r["chance"] for r in rs])
        random_hits = (rng.random((10000, len(rs))) < chance).mean(axis=1)
        rho = np.array([r["spearman"] for r in rs])
        s = {
            "n": len(rs),
            "hit_share": float(hits.mean()),
            "chance_share": float(chance.mean()),
            "p_random": float((random_hits >= hits.mean()).mean()),
            "cases_every_slice_holds": int((chance == 1.0).sum()),
            "upper_half_share": float(np.mean([r["upper_half"] for r in rs])),
            "upper_half_chance": float(np.mean([r["upper_half_chance"] for r in rs])),
            "spearman_mean": float(np.nanmean(rho)),
            "spearman_positive": int(np.sum(rho > 0)),
            "spearman_defined": int(np.sum(~np.isnan(rho))),
        }
        att = [np.asarray(r["attention"]) for r in rs if "attention" in r]
        if att:  # SFA ROI-token attention per slice (last block): a sink would show here
            s["attention_min"] = float(min(a.min() for a in att))
            s["attention_max"] = float(max(a.max() for a in att))
            s["attention_on_roi_token_mean"] = float(np.mean([1.0 - a.sum() for a in att]))
        same = len({len(r["evidence"]) for r in rs}) == 1
        if same and rs:  # position-only baselines (every case's stack has the same slices)
            holds = np.array([r["holds"] for r in rs], dtype=float)
            ev = np.array([r["evidence"] for r in rs])
            amount = np.array([r["amount"] for r in rs])
            # "always take stack slice i": the best i needs no evidence at all
            s["fixed_slice_hit_share"] = holds.mean(axis=0).round(4).tolist()
            s["mean_profile_top_slice"] = int(np.argmax(ev.mean(axis=0)))
            # case-specific part: each case's deviation from the cohort's mean profile
            dev = [
                spearmanr(e - ev.mean(0), m - amount.mean(0)).statistic
                for e, m in zip(ev, amount, strict=True)
            ]
            s["centred_spearman_mean"] = float(np.nanmean(dev))
            s["centred_spearman_positive"] = int(np.sum(np.asarray(dev) > 0))
        if rs and "control" in rs[0]:
            ev_all = [np.asarray(r["evidence"]) for r in rs]
            ctl = [np.asarray(r["control"]) for r in rs]
            occ = [np.asarray(r["occlusion"]) for r in rs]
            s.update(
                evidence_level_mean=float(np.mean([e.mean() for e in ev_all])),
                evidence_spread_mean=float(np.mean([np.ptp(e) for e in ev_all])),
                control_hit_share=float(np.mean([r["control_hit"] for r in rs])),
                control_same_top_share=float(
                    np.mean(
                        [np.argmax(e) == np.argmax(c) for e, c in zip(ev_all, ctl, strict=True)]
                    )
                ),
                control_vs_evidence_spearman_mean=float(
                    np.nanmean([spearman(e, c) for e, c in zip(ev_all, ctl, strict=True)])
                ),
                control_level_mean=float(np.mean([c.mean() for c in ctl])),
                control_top_slices=np.bincount([int(np.argmax(c)) for c in ctl]).tolist(),
                evidence_top_slices=np.bincount([int(np.argmax(e)) for e in ev_all]).tolist(),
                occlusion_hit_share=float(np.mean([r["occlusion_hit"] for r in rs])),
                occlusion_top_slices=np.bincount([int(np.argmax(o)) for o in occ]).tolist(),
                occlusion_spearman_amount_mean=float(
                    np.nanmean([r["occlusion_spearman_amount"] for r in rs])
                ),
                occlusion_vs_evidence_spearman_mean=float(
                    np.nanmean([spearman(e, o) for e, o in zip(ev_all, occ, strict=True)])
                ),
            )
        if ig:
            ig_rho = np.array([r["ig_vs_evidence_spearman"] for r in rs])
            s.update(
                ig_vs_evidence_spearman_mean=float(np.nanmean(ig_rho)),
                ig_vs_evidence_spearman_median=float(np.nanmedian(ig_rho)),
                ig_vs_evidence_positive=int(np.sum(ig_rho > 0)),
                ig_hit_share=float(np.mean([r["ig_hit"] for r in rs])),
                ig_spearman_amount_mean=float(np.nanmean([r["ig_spearman_amount"] for r in rs])),
            )
            if same and rs:  # agreement beyond the shared mean profiles
                ig_all = np.array([r["ig"] for r in rs])
                ev = np.array([r["evidence"] for r in rs])
                dev = [
                    spearmanr(g - ig_all.mean(0), e - ev.mean(0)).statistic
                    for g, e in zip(ig_all, ev, strict=True)
                ]
                s["ig_vs_evidence_centred_spearman_mean"] = float(np.nanmean(dev))
                s["ig_vs_evidence_centred_positive"] = int(np.sum(np.asarray(dev) > 0))
        summary[roi] = s
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("heldout")
    ap.add_argument("out")
    ap.add_argument("--ig-steps", type=int, default=0)
    ap.add_argument(
        "--controls", action="store_true", help="content-free control and exact occlusion (5-6)"
    )
    ap.add_argument("--limit", type=int, default=0, help="stop after this many PD cases (tests)")
    ap.add_argument("--hc", action="store_true", help="also the held-out HC called HC")
    ap.add_argument("--method", default="auto", choices=("auto", "reference", "leave-out"))
    ap.add_argument(
        "--resummarise", action="store_true", help="recompute the summary of an existing OUT.json"
    )
    a = ap.parse_args()
    if a.resummarise:
        result = json.loads(Path(a.out).read_text())
        result["summary"] = summarise(result["cases"], result["ig_steps"] > 0)
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"], indent=2))
        return

    import torch

    from mrn_engine.data import discover_cases, find_labels, load_case
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.inference.evidence import case_evidence

    torch.set_num_threads(1)
    predictor = MRNPredictor.from_bundle(a.bundle, device="cpu")
    labels = find_labels(a.heldout)
    cases, t0 = [], time.perf_counter()
    control_cache: dict = {}
    n_pd, n_hc, methods, controls_hc = 0, 0, set(), []
    for cf in discover_cases(a.heldout):
        y = labels.get(cf.case_id)
        if y not in ((0, 1) if a.hc else (1,)) or (y == 1 and a.limit and n_pd >= a.limit):
            continue
        n_pd, n_hc = n_pd + (y == 1), n_hc + (y == 0)
        case = load_case(cf, label=y)
        pred = predictor.predict_case(case, keep_slice_tokens=True, nuclei=False)
        if pred.call != y:
            continue
        ev = case_evidence(predictor, pred, method=a.method)
        methods.add(ev.method)
        if y == 0:
            controls_hc.append(hc_row(case, pred, ev))
            continue
        inputs = None
        if a.ig_steps > 0 or a.controls:
            inputs = {
                n: torch.as_tensor(np.asarray(c.image), dtype=torch.float32)[None]
                for n, c in pred.crops.items()
            }
        row = {"case_id": cf.case_id, "p_pd": pred.p_pd, "rois": {}}
        for roi in EFFECT_ROIS:
            holds, amount = effect_per_slice(case, pred.crops[roi], roi)
            real = ~np.isnan(amount)
            e = np.where(real, ev.evidence[roi], -np.inf)
            top = int(np.argmax(e))
            med = float(np.median(amount[real]))
            r = {
                "evidence": ev.evidence[roi][real].tolist(),
                "holds": holds[real].tolist(),
                "amount": amount[real].tolist(),
                "top": top,
                "hit": bool(holds[top]),
                "chance": float(holds[real].mean()),
                "upper_half": bool(amount[top] >= med),
                "upper_half_chance": float((amount[real] >= med).mean()),
                "spearman": spearman(ev.evidence[roi][real], amount[real]),
                "attention": ev.attention[roi][real].tolist(),
            }
            if a.controls:
                c = control_evidence(predictor, inputs, pred.crops, roi, control_cache)
                top_occ = int(np.argmax(np.where(real, c["occlusion"], -np.inf)))
                top_ctl = int(np.argmax(np.where(real, c["control"], -np.inf)))
                r.update(
                    control=c["control"][real].tolist(),
                    control_hit=bool(holds[top_ctl]),
                    occlusion=c["occlusion"][real].tolist(),
                    occlusion_hit=bool(holds[top_occ]),
                    occlusion_spearman_amount=spearman(c["occlusion"][real], amount[real]),
                )
            if a.ig_steps > 0:
                ig = integrated_gradients(predictor, inputs, roi, a.ig_steps)
                top_ig = int(np.argmax(np.where(real, ig, -np.inf)))
                r.update(
                    ig=ig[real].tolist(),
                    ig_hit=bool(holds[top_ig]),
                    ig_vs_evidence_spearman=spearman(ig[real], ev.evidence[roi][real]),
                    ig_spearman_amount=spearman(ig[real], amount[real]),
                )
            row["rois"][roi] = r
        cases.append(row)
        print(cf.case_id, {k: (v["hit"], round(v["chance"], 2)) for k, v in row["rois"].items()})

    summary = summarise(cases, a.ig_steps > 0)
    if a.hc:
        summary["hc_vs_pd"] = hc_summary(controls_hc, cases)
    result = {
        "bundle": a.bundle,
        "heldout": a.heldout,
        "method": sorted(methods),
        "held_out_pd": n_pd,
        "pd_called_pd": len(cases),
        "held_out_hc": n_hc,
        "hc_called_hc": len(controls_hc),
        "ig_steps": a.ig_steps,
        "controls": a.controls,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": f"{_cpu()} ({platform.machine()}), {torch.get_num_threads()} torch thread(s)",
        "summary": summary,
        "cases": cases,
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=2))


if __name__ == "__main__":
    main()
