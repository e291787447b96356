"""Site harmonisation from local controls: a new scanner's controls sit where training's did.

A bundle trained on some scanners sees another scanner's cases shifted as a whole: on the
transfer benchmark (docs/results.md) the ensemble still *ranks* a new site's cases well
(AUC 0.82-0.95) but calls 78-88 % of a balanced cohort PD on one site and 10-17 % on another.
The shift sits in the patient vector (the four ROI tokens concatenated, the classification
head's input). Multi-site neuroimaging removes such site effects with a location shift per
site (ComBat's additive term); we do the same on the patient vector, anchored on **healthy
controls**, so the new site's PD prevalence never enters:

    delta_k = mean(v | anchor controls of fold k) - mean(v | the site's controls)

per fold ``k`` (``v``: patient vector, TTA views averaged). The anchor controls are the
training cohort's HC cases that fold ``k`` did **not** train on (its out-of-fold cases): like
the site's controls they are unseen by its weights, and they are the cases its calibration was
fitted on (the cases it trained on sit deeper in the HC region; see docs/results.md). The shift is applied exactly where
the head reads ``v``: for a head that starts with ``BatchNorm1d`` (``head_input_norm``) its
running mean moves by ``-delta``; for one that starts with ``Linear`` its bias moves by
``W delta``. So every number read from the head -- P(PD), calibration, ROI masking,
per-slice evidence -- is that of the shifted vector, from one place (:meth:`adapt_state`). A
masked ROI's empty token is shifted like the real token it replaces.

Assumptions (docs/data.md): the reference controls are healthy subjects scanned on the same
scanner and protocol as the cases to predict, at least ``MIN_CONTROLS`` of them. Scale is not
adapted (measured: no gain with 10 controls; more parameters than cases).

Stored as one safetensors file: tensor ``fold_k`` = ``delta_k`` (4D,), metadata
``mrn_site_adaptation`` = JSON provenance (site, reference and training case ids, the bundle's
fold weight digests it belongs to).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mrn_engine.errors import ConfigError, InputDataError, WeightsError
from mrn_engine.results import Probabilities
from mrn_engine.training.checkpoint import atomic_file

#: fewest reference controls accepted (the mean of fewer moves with each subject)
MIN_CONTROLS = 5
#: below this many controls a warning says the shift is noisy
FEW_CONTROLS = 10
METADATA_KEY = "mrn_site_adaptation"
FORMAT = 1

ProgressFn = Callable[[float, str], None]


def patient_vectors(
    predictor: Any, cases: Iterable[Any], n: int = 0, progress: ProgressFn | None = None
) -> dict[str, dict[int, torch.Tensor]]:
    """Case id -> fold -> patient vector, one diagnosis-only prediction per case.

    ``cases`` may be a generator (one case in memory at a time); ``n`` is its length for
    ``progress``. The vectors are the head's input *before* any site adaptation (the shift lives in the
    head), so a predictor that already carries one gives the same vectors.
    """
    patient = predictor.model.patient  # the head's input, as the model builds it
    out: dict[str, dict[int, torch.Tensor]] = {}
    for i, case in enumerate(cases):
        pred = predictor.predict_case(case, nuclei=False)
        if not pred.roi_tokens or not pred.roi_tokens[0]:
            raise ConfigError("site adaptation needs a model that gives ROI tokens (MRN, SERes10)")
        out[case.case_id] = {  # TTA views averaged
            k: patient({n: v.float().mean(dim=0, keepdim=True) for n, v in t.items()})[0]
            for k, t in zip(pred.folds, pred.roi_tokens, strict=True)
        }
        if progress:
            progress((i + 1) / max(n, i + 1), f"{case.case_id}: patient vectors")
    return out


def _mean(
    vectors: Mapping[str, Mapping[int, torch.Tensor]], ids: Iterable[str], k: int
) -> torch.Tensor:
    return torch.stack([vectors[c][k] for c in ids]).mean(dim=0)


@dataclass
class SiteAdaptation:
    """Per-fold shift of the patient vector, with where it came from."""

    shift: dict[int, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def folds(self) -> list[int]:
        return sorted(self.shift)

    @property
    def site(self) -> str:
        return str(self.info.get("site") or "site")

    def record(self) -> dict[str, Any]:
        """What a saved result says about the harmonisation it went through."""
        keys = ("site", "path", "n_site_controls", "reference_root", "created")
        return {k: self.info.get(k) for k in keys}

    def check_bundle(self, bundle: Any, folds: Iterable[int], where: str = "") -> None:
        """``WeightsError`` unless this adaptation was fitted on these folds' weights."""
        where = where or self.site
        missing = sorted(set(folds) - set(self.shift))
        if missing:
            raise WeightsError(
                f"{where}: site adaptation has folds {self.folds}, the predictor uses {sorted(folds)}"
            )
        fitted = self.info.get("bundle_weights") or {}
        actual = getattr(bundle, "weights_sha256", {}) if bundle is not None else {}
        for k in folds:
            a, b = fitted.get(f"fold_{k}"), actual.get(f"fold_{k}")
            if a and b and a != b:
                raise WeightsError(
                    f"{where}: site adaptation was fitted for other fold {k} weights "
                    f"({a[:12]}... vs the bundle's {b[:12]}...); fit it again with mrn site-adapt"
                )

    def adapt_state(self, k: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold ``k``'s state dict with the shift folded into the head's first layer."""
        delta = self.shift[k]
        out = dict(state)
        if "head.mlp.0.running_mean" in out:  # BatchNorm1d(v + delta) == BN with mean - delta
            mean = out["head.mlp.0.running_mean"]
            _check_dim(mean.shape[0], delta, k)
            out["head.mlp.0.running_mean"] = mean - delta.to(mean)
        elif "head.mlp.0.weight" in out and "head.mlp.0.bias" in out:  # W(v + delta) + b
            w, b = out["head.mlp.0.weight"], out["head.mlp.0.bias"]
            _check_dim(w.shape[1], delta, k)
            out["head.mlp.0.bias"] = b + (w.float() @ delta.float()).to(b)
        else:
            raise ConfigError(
                "site adaptation needs the MRN classification head (head.mlp.0); "
                "this model has none"
            )
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors (+ JSON provenance in its metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ConfigError(f"{path}: site adaptation files must end in .safetensors")
        tensors = {f"fold_{k}": v.float().contiguous() for k, v in self.shift.items()}
        meta = {METADATA_KEY: json.dumps({"format": FORMAT, **self.info})}
        atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path


def _check_dim(dim: int, delta: torch.Tensor, k: int) -> None:
    if delta.shape != (dim,):
        raise WeightsError(
            f"site adaptation fold {k}: shift has shape {tuple(delta.shape)}, the head reads {dim}"
        )


def load_site_adaptation(path: str | os.PathLike) -> SiteAdaptation:
    """Read a file written by :meth:`SiteAdaptation.save` (no code is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: site adaptation file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors has its own error types
        raise InputDataError(f"{path}: not a site adaptation file ({e})") from e
    if METADATA_KEY not in meta:
        raise InputDataError(f"{path}: not a site adaptation file (no {METADATA_KEY} metadata)")
    try:
        info = json.loads(meta[METADATA_KEY])
        shift = {int(key.removeprefix("fold_")): t for key, t in tensors.items()}
    except ValueError as e:
        raise InputDataError(f"{path}: damaged site adaptation metadata ({e})") from e
    bad = [k for k, t in shift.items() if t.ndim != 1 or not torch.isfinite(t).all()]
    if not shift or bad:
        raise InputDataError(f"{path}: site adaptation holds no usable shift (folds {bad})")
    info.pop("format", None)
    info["path"] = str(path)
    return SiteAdaptation(shift=shift, info=info)


Anchors = Mapping[int, tuple[torch.Tensor, Sequence[str]]]


def anchors_from_vectors(
    train_vectors: Mapping[str, Mapping[int, torch.Tensor]],
    train_controls: Mapping[int, Sequence[str]],
) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """Fold -> (mean patient vector, case ids) of its anchor controls, from their vectors.

    ``train_controls``: fold -> the anchor HC case ids (``workflows.site_adaptation``: the
    controls that fold did not train on). Cases without vectors are left out.
    """
    out = {}
    for k, ids in sorted(train_controls.items()):
        ids = [c for c in ids if c in train_vectors]
        if len(ids) < MIN_CONTROLS:
            raise InputDataError(
                f"site adaptation: fold {k} has {len(ids)} anchor controls with vectors "
                f"(need {MIN_CONTROLS}); is the training cohort complete?"
            )
        out[k] = (_mean(train_vectors, ids, k), ids)
    return out


def fit_site_adaptation(
    anchors: Anchors,
    site_vectors: Mapping[str, Mapping[int, torch.Tensor]],
    site_controls: Sequence[str],
    info: Mapping[str, Any] | None = None,
) -> SiteAdaptation:
    """``delta_k`` = fold ``k``'s anchor mean - the mean site-control vector.

    Parameters
    ----------
    anchors: fold -> (mean patient vector, case ids) of its anchor controls
        (:func:`anchors_from_vectors`, or stored by ``mrn train``: ``training.anchor``).
    site_vectors: case id -> fold -> patient vector (:func:`patient_vectors`).
    site_controls: the site's reference controls (HC) case ids.

    Raises
    ------
    InputDataError: fewer than ``MIN_CONTROLS`` controls on either side, or vectors missing.
    """
    site_controls = list(site_controls)
    if len(site_controls) < MIN_CONTROLS:
        raise InputDataError(
            f"site adaptation needs at least {MIN_CONTROLS} reference controls, got "
            f"{len(site_controls)}"
        )
    missing = [c for c in site_controls if c not in site_vectors]
    if missing:
        raise InputDataError(f"site adaptation: no patient vectors for {missing[:5]}")
    shift = {}
    for k, (mean, ids) in sorted(anchors.items()):
        if len(ids) < MIN_CONTROLS:
            raise InputDataError(
                f"site adaptation: fold {k} has {len(ids)} anchor controls (need {MIN_CONTROLS})"
            )
        shift[k] = mean.float() - _mean(site_vectors, site_controls, k)
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": "location shift of the patient vector, anchored on healthy controls",
        "n_site_controls": len(site_controls),
        "site_controls": site_controls,
        "n_train_controls": {str(k): len(ids) for k, (_, ids) in sorted(anchors.items())},
        **dict(info or {}),
    }
    return SiteAdaptation(shift=shift, info=meta)


def head_p_pd(
    predictor: Any,
    vectors: Mapping[str, Mapping[int, torch.Tensor]],
    ids: Sequence[str],
    adaptation: SiteAdaptation | None = None,
) -> list[float]:
    """Calibrated ensemble P(PD) of ``ids`` from their patient vectors, with ``adaptation``
    folded into each fold's head as :class:`MRNPredictor` does (head passes only).

    ``predictor`` must be the bundle *as trained* (no site adaptation of its own).
    """
    ensemble = predictor.ensemble
    p = torch.zeros(len(ids), len(predictor.folds))
    for j, k in enumerate(predictor.folds):
        state = ensemble.fold_states[k]
        ensemble.load_other(adaptation.adapt_state(k, state) if adaptation else state)
        v = torch.stack([vectors[c][k] for c in ids]).to(ensemble.device)
        with torch.no_grad():
            p[:, j] = torch.softmax(ensemble.model.head(v).float(), dim=-1)[:, 1].cpu()
    folds = predictor.folds
    return [predictor.calibrate(Probabilities.from_folds(folds, row.tolist())).p_pd for row in p]


def leave_one_out_p_pd(
    predictor: Any,
    anchors: Anchors,
    site_vectors: Mapping[str, Mapping[int, torch.Tensor]],
    site_controls: Sequence[str],
) -> list[float]:
    """P(PD) of each site control under a shift fitted on the *other* controls.

    The shift puts the mean of the controls it was fitted on exactly on the anchor, so scoring
    those same controls flatters it. Left out one at a time, they say how the harmonised
    bundle calls a healthy subject of this site that it has not seen: comparable with how it
    calls the training site's own unseen (out-of-fold) controls. Head passes only. Needs one
    control more than :data:`MIN_CONTROLS`.
    """
    site_controls = list(site_controls)
    out = []
    for c in site_controls:
        rest = [o for o in site_controls if o != c]
        (p,) = head_p_pd(
            predictor, site_vectors, [c], fit_site_adaptation(anchors, site_vectors, rest)
        )
        out.append(p)
    return out


def shift_norms(adaptation: SiteAdaptation) -> dict[int, float]:
    """Fold -> |delta| (how far the site's controls sat from training's)."""
    return {k: float(v.norm()) for k, v in sorted(adaptation.shift.items())}
