"""What the diagnosis panel does, without Qt: layers -> engine Case, the prediction generator,
probabilities for display, and saving results.

The panel wraps :func:`prediction_steps` in a ``napari.qt.threading.thread_worker``.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrn_engine.config import atomic_write_text
from mrn_engine.data import Case, Volume, save_volume
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import InputDataError, MRNError
from mrn_engine.inference import write_pd_pred
from napari_mrn._display import DisplayMapping
from napari_mrn._writer import layer_to_volume


class RunCancelled(MRNError):
    """The user pressed Cancel."""


# ----------------------------------------------------------------------------- layers -> Case
def layer_mapping(layer: Any) -> DisplayMapping:
    """The display mapping of a layer (from napari-mrn metadata, else assume LAS + layer scale)."""
    meta = getattr(layer, "metadata", {}) or {}
    if "affine" in meta and "source_shape" in meta:
        return DisplayMapping.from_metadata(meta)
    return DisplayMapping.default_for_display(np.shape(layer.data), tuple(layer.scale))


def layer_volume(layer: Any, *, kind: str) -> Volume:
    """An engine :class:`Volume` ``(X, Y, Z)`` from a napari layer (``kind`` image or mask)."""
    if np.ndim(layer.data) != 3:
        raise InputDataError(
            f"layer '{layer.name}': expected a 3D volume, got shape {np.shape(layer.data)}"
        )
    mapping = layer_mapping(layer)
    meta = {**(layer.metadata or {}), **mapping.to_metadata()}
    vol = layer_to_volume(np.asarray(layer.data), meta, name=f"layer '{layer.name}'", kind=kind)
    # engine messages start with Volume.name: the file the layer came from, else the layer
    source = meta.get("source_path")
    vol.path = Path(source) if source else Path(f"layer '{layer.name}'")
    if kind == "image":
        vol.array = vol.array.astype(np.float32, copy=False)
        if not np.isfinite(vol.array).all():
            raise InputDataError(f"layer '{layer.name}': holds NaN or infinite values")
    return vol


def _grid_text(mapping: DisplayMapping) -> str:
    sp = ", ".join(f"{s:.3g}" for s in mapping.spacing)
    return f"{mapping.shape[0]}x{mapping.shape[1]}x{mapping.shape[2]} voxels of {sp} mm"


def check_layers_grid(reference: Any, others: Iterable[Any | None]) -> None:
    """Raise :class:`InputDataError` unless every layer in ``others`` lies on ``reference``'s grid."""
    ref = layer_mapping(reference)
    for layer in others:
        if layer is None:
            continue
        m = layer_mapping(layer)
        if m.shape != ref.shape or not np.allclose(m.affine, ref.affine, atol=1e-3):
            raise InputDataError(
                f"layer '{layer.name}': not on the grid of layer '{reference.name}' "
                f"({_grid_text(m)} vs {_grid_text(ref)}"
                + ("" if m.shape != ref.shape else "; the affines differ")
                + "). NM, QSM and masks must be co-registered on one grid."
            )


def case_from_layers(
    nm: Any,
    qsm: Any,
    nm_mask: Any | None = None,
    qsm_mask: Any | None = None,
    case_id: str | None = None,
) -> Case:
    """Build the engine's :class:`Case` from napari layers, checking that they share a grid."""
    if nm is None or qsm is None:
        raise InputDataError(
            "choose an NM layer and a QSM layer (File > Open Sample > MRN PD case)"
        )
    if nm is qsm:
        raise InputDataError(f"layer '{nm.name}': chosen as both NM and QSM")
    check_layers_grid(qsm, [nm, nm_mask, qsm_mask])
    cid = case_id or (qsm.metadata or {}).get("case_id") or (nm.metadata or {}).get("case_id")
    return Case(
        case_id=str(cid or qsm.name),
        nm=layer_volume(nm, kind="image"),
        qsm=layer_volume(qsm, kind="image"),
        nm_mask=layer_volume(nm_mask, kind="mask") if nm_mask is not None else None,
        qsm_mask=layer_volume(qsm_mask, kind="mask") if qsm_mask is not None else None,
    )


# ----------------------------------------------------------------------------- the run
@dataclass
class Progress:
    """One progress report: ``fraction`` in [0, 1] (or None = unknown) and a message."""

    fraction: float | None
    message: str = ""


def parse_progress(*args: Any, **kwargs: Any) -> Progress:
    """Accept the usual progress-callback shapes: ``(fraction)``, ``(done, total)``,
    ``(done, total, message)``, ``(message)``, or keywords ``done/total/message/fraction``."""
    msg = str(kwargs.get("message", kwargs.get("desc", "")))
    if "fraction" in kwargs:
        return Progress(float(kwargs["fraction"]), msg)
    if "done" in kwargs and "total" in kwargs:
        args = (kwargs["done"], kwargs["total"])
    nums = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    texts = [str(a) for a in args if isinstance(a, str)]
    msg = msg or " ".join(texts)
    if len(nums) >= 2 and nums[1]:
        return Progress(min(max(nums[0] / nums[1], 0.0), 1.0), msg)
    if len(nums) == 1:
        v = float(nums[0])
        return Progress(min(max(v if v <= 1.0 else v / 100.0, 0.0), 1.0), msg)
    return Progress(None, msg)


@dataclass
class RunResult:
    """What a finished run hands back to the panel."""

    predictor: Any
    prediction: Any
    case: Case
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


_DONE = object()


def prediction_steps(
    make_predictor: Callable[[], Any],
    case: Case,
    cancel: threading.Event,
) -> Generator[Progress, None, RunResult]:
    """Generator run in a worker thread: yields :class:`Progress`, returns a :class:`RunResult`.

    The predictor's own progress callback is pumped through a queue (``predict_case`` runs in
    a helper thread) so that every report becomes a ``yielded`` signal. The predictor also
    caches every fold's empty-ROI tokens (``warm_masking``), so that ROI masking afterwards
    needs no backbone pass on the GUI thread. Setting ``cancel``
    makes the next progress callback raise :class:`RunCancelled`, which ends the run.
    """
    t0 = time.perf_counter()
    yield Progress(0.0, "Loading the model bundle")
    predictor = make_predictor()
    if cancel.is_set():
        raise RunCancelled("cancelled")
    yield Progress(0.02, f"Predicting {case.case_id}")
    reports: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def callback(*args: Any, **kwargs: Any) -> None:
        if cancel.is_set():
            raise RunCancelled("cancelled")
        reports.put(parse_progress(*args, **kwargs))

    def target() -> None:
        try:
            # warm_masking: each fold's empty-ROI tokens are computed here, in the worker, so
            # that an ROI toggle in the panel runs only the classification head
            outcome["prediction"] = predictor.predict_case(
                case, progress=callback, warm_masking=True
            )
        except BaseException as e:  # handed to the worker thread below
            outcome["error"] = e
        finally:
            reports.put(_DONE)

    helper = threading.Thread(target=target, name="mrn-predict", daemon=True)
    helper.start()
    while True:
        item = reports.get()
        if item is _DONE:
            break
        if item.fraction is not None:
            item = Progress(0.02 + 0.97 * item.fraction, item.message)
        yield item
    helper.join()
    if "error" in outcome:
        raise outcome["error"]
    if cancel.is_set():
        raise RunCancelled("cancelled")
    yield Progress(1.0, "Done")
    return RunResult(predictor, outcome["prediction"], case, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- probabilities
@dataclass
class Probabilities:
    """P(PD) for display: ensemble, spread across folds, per fold, and the call (1 = PD)."""

    p_pd: float
    p_pd_std: float
    p_pd_folds: list[float]
    call: int
    masked: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return "PD" if self.call == 1 else "HC"

    def to_dict(self) -> dict[str, Any]:
        return {
            "p_pd": self.p_pd,
            "p_pd_std": self.p_pd_std,
            "p_pd_folds": self.p_pd_folds,
            "call": self.call,
            "label": self.label,
            "masked": sorted(self.masked),
        }


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def as_probabilities(source: Any, masked: Iterable[str] = ()) -> Probabilities:
    """Normalise a ``CasePrediction`` or a ``masked_prediction`` dict into :class:`Probabilities`."""
    d = source if isinstance(source, Mapping) else vars(getattr(source, "probabilities", source))
    ens = d.get("ensemble") if isinstance(d.get("ensemble"), Mapping) else {}
    folds = _first(d, "p_pd_folds", "folds", "per_fold")
    if isinstance(folds, Mapping):
        folds = [folds[k] for k in sorted(folds)]
    folds = [float(v["p_pd"] if isinstance(v, Mapping) else v) for v in (folds or [])]
    p = _first(d, "p_pd")
    if p is None:
        p = _first(ens, "p_pd")
    if p is None:
        if not folds:
            raise ValueError(f"no P(PD) in the prediction ({sorted(d)})")
        p = float(np.mean(folds))
    std = _first(d, "p_pd_std")
    if std is None:
        std = _first(ens, "p_pd_std")
    if std is None:
        std = float(np.std(folds)) if folds else 0.0
    call = _first(d, "call")
    if call is None:
        call = _first(ens, "call")
    if call is None:
        call = int(float(p) >= 0.5)
    ms = _first(d, "masked")
    return Probabilities(
        float(p), float(std), folds, int(call), masked_set(ms if ms is not None else masked)
    )


def masked_set(masked: str | Iterable[str]) -> frozenset[str]:
    """ROI names from a list of names or a masking-table key (``none``, ``NM+QSM2`` ...)."""
    if isinstance(masked, str):
        if masked in ROI_NAMES:
            return frozenset({masked})
        if masked in ("", "none"):
            return frozenset()
        from mrn_engine.analysis import ROI_SHORT

        inverse = {v: k for k, v in ROI_SHORT.items()}
        try:
            return frozenset(inverse[part] for part in masked.split("+"))
        except KeyError:
            raise ValueError(f"unknown ROI subset {masked!r}") from None
    return frozenset(masked)


def masking_rows(table: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The predictor's 16-subset masking table as display rows (masked ROIs, P(PD), std, call, folds)."""
    rows = []
    for row in table:
        probs = as_probabilities(row)
        rows.append(
            {
                "masked": [r for r in ROI_NAMES if r in probs.masked],
                "p_pd": probs.p_pd,
                "p_pd_std": probs.p_pd_std,
                "call": probs.call,
                "p_pd_folds": probs.p_pd_folds,
            }
        )
    rows.sort(key=lambda r: (len(r["masked"]), [ROI_NAMES.index(m) for m in r["masked"]]))
    return rows


# ----------------------------------------------------------------------------- saving
def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(vars(value))
    return value


def bundle_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Path, ``bundle.json`` and ``config.json`` of a model bundle (what a result came from)."""
    root = Path(path)
    out: dict[str, Any] = {"path": str(root.resolve())}
    for name in ("bundle.json", "config.json"):
        f = root / name
        if f.is_file():
            try:
                out[name.removesuffix(".json")] = json.loads(f.read_text())
            except json.JSONDecodeError:
                out[name.removesuffix(".json")] = None
    return out


def save_results(
    folder: str | os.PathLike,
    *,
    prediction: Any,
    probabilities: Probabilities,
    masking_table: list[dict[str, Any]],
    bundle: str | os.PathLike | None,
    volumes: Mapping[str, Volume],
    settings: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``folder/<case_id>/``: masks as NIfTI (``QSM_pred.nii.gz`` ...), ``PD_pred.txt`` and
    ``mrn_result.json`` (probabilities, masking table, bundle identity, config, settings).

    Every file is written atomically; nothing is written over an input file. ``PD_pred.txt``
    is written by the engine's own writer (byte-identical to the CLI's submission file).
    """
    case_id = str(getattr(prediction, "case_id", "case"))
    out_dir = Path(folder) / case_id
    written = [save_volume(vol, out_dir / f"{name}.nii.gz") for name, vol in volumes.items()]
    full = as_probabilities(prediction)
    record = {
        "case_id": case_id,
        "prediction": full.to_dict(),
        "shown": probabilities.to_dict(),
        "masking_table": masking_table,
        "boxes": {k: _jsonable(v) for k, v in (getattr(prediction, "boxes", {}) or {}).items()},
        "bundle": bundle_identity(bundle) if bundle else None,
        "settings": dict(settings or {}),
        "files": [p.name for p in written],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    pd_txt = write_pd_pred(out_dir, full.call)  # the engine's writer: same bytes as `mrn predict`
    js = out_dir / "mrn_result.json"
    atomic_write_text(js, json.dumps(_jsonable(record), indent=2))
    return [*written, pd_txt, js]
