"""Batch prediction and the challenge's submission format.

Per case ``OUT/RJPD_xxx/``: ``NM_pred.nii.gz`` and ``QSM_pred.nii.gz`` (uint8 masks on the
input grids, challenge label values) and ``PD_pred.txt`` (``0`` or ``1``). At the top of
``OUT``: ``label_predict.csv`` (``patient_id,prediction``), ``probabilities.csv`` / ``.json``
(per-fold P(PD), mean, std, call, and an ``error`` for cases that failed), ``errors.json`` and
the ``config.json`` of the model. A run writes everything into a hidden staging folder
``OUT/.mrn-predict-*.partial`` and moves it into ``OUT`` at the end, case folders first and the
tables last; a run that fails to write (disk full) removes the staging folder and raises
:class:`OutputWriteError`, so ``OUT`` never holds half a submission.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mrn_engine.config import atomic_write_text
from mrn_engine.data import discover_cases, load_case, save_volume
from mrn_engine.data.tables import write_csv, write_json
from mrn_engine.errors import InputDataError, MRNError
from mrn_engine.fileio import make_temp_dir
from mrn_engine.results import THRESHOLD

#: per-case output file names (challenge Docker route)
NM_PRED = "NM_pred.nii.gz"
QSM_PRED = "QSM_pred.nii.gz"
PD_PRED = "PD_pred.txt"
#: top-level output file names
LABEL_CSV = "label_predict.csv"
PROB_CSV = "probabilities.csv"
PROB_JSON = "probabilities.json"
ERRORS_JSON = "errors.json"


class OutputWriteError(MRNError):
    """The outputs could not be written (disk full, permissions); nothing was left behind."""


#: suffix of the hidden staging folder of a run (left only if the process is killed)
STAGE_SUFFIX = ".partial"


@dataclass
class SubmissionResult:
    """What :func:`predict_cases` wrote.

    Attributes
    ----------
    out_dir: the output folder.
    rows: one summary row per case (``case_id``, ``p_pd_fold<k>``..., ``p_pd``, ``p_pd_std``,
        ``call``, ``error``).
    errors: ``{case_id, error}`` for the cases that failed.
    """

    out_dir: Path
    rows: list[dict[str, object]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return len(self.rows) - len(self.errors)


def write_pd_pred(folder: str | os.PathLike, call: int) -> Path:
    """Write ``folder/PD_pred.txt``: the call, ``0`` (HC) or ``1`` (PD), no newline (atomic).

    The one writer of this file: the CLI's submission and napari-mrn's *Save results* both use it.
    """
    value = int(call)
    if value not in (0, 1):
        raise InputDataError(f"{PD_PRED}: the call must be 0 (HC) or 1 (PD), got {call!r}")
    path = Path(folder) / PD_PRED
    atomic_write_text(path, str(value))
    return path


def write_case_outputs(pred: Any, case: Any, out_dir: str | os.PathLike) -> Path:
    """Write one case's ``NM_pred.nii.gz``, ``QSM_pred.nii.gz`` and ``PD_pred.txt``.

    The folder ``out_dir/<case_id>`` is built under a temporary name and renamed into place,
    replacing an older prediction of the same case (never an input folder). A diagnosis-only
    prediction (``seg_source == "none"``) writes ``PD_pred.txt`` alone.
    """
    out_dir = Path(out_dir)
    target = out_dir / pred.case_id
    folder = getattr(getattr(case, "files", None), "folder", None)
    if folder is not None and target.resolve() == Path(folder).resolve():
        raise InputDataError(
            f"{target}: output folder is the input case folder; choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(out_dir, prefix=f".{pred.case_id}.", suffix=".tmp"))
    try:
        if pred.seg_source != "none":
            save_volume(case.nm.like(pred.nm_nuclei.astype("uint8"), kind="mask"), tmp / NM_PRED)
            save_volume(case.qsm.like(pred.nuclei.astype("uint8"), kind="mask"), tmp / QSM_PRED)
        write_pd_pred(tmp, pred.call)
        old = None
        if target.exists():
            old = Path(make_temp_dir(out_dir, prefix=f".{pred.case_id}.", suffix=".old"))
            os.replace(target, old / "prev")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def iter_predictions(
    predictor: Any,
    cases_dir: str | os.PathLike,
    *,
    labels: dict[str, int] | None = None,
    only: set[str] | None = None,
    progress: bool = True,
    on_case: Callable[[str, int, int], None] | None = None,
    nuclei: bool = True,
) -> Iterator[tuple[Any, Any, str | None]]:
    """Load and predict every case under ``cases_dir``.

    Yields
    ------
    ``(case, prediction, None)`` or ``(case_files, None, error message)`` per case; an input
    problem with one case never stops the others. ``only`` restricts to those case ids.
    ``nuclei=False``: diagnosis only (``predict_case(nuclei=False)``, no DPT head).
    """
    files = discover_cases(cases_dir)
    if only is not None:
        files = [f for f in files if f.case_id in only]
    if not files:
        raise InputDataError(f"{cases_dir}: no case folders (with NM/QSM files) found")
    bar = tqdm(files, desc="predict", unit="case", disable=not progress)
    for i, cf in enumerate(bar):
        if on_case:
            on_case(cf.case_id, i, len(files))
        bar.set_postfix_str(cf.case_id)
        try:
            case = load_case(cf, label=(labels or {}).get(cf.case_id))
            pred = predictor.predict_case(case, **({} if nuclei else {"nuclei": False}))
        except (MRNError, OSError, ValueError) as e:
            msg = str(e) if isinstance(e, MRNError) else f"{type(e).__name__}: {e}"
            if not msg.startswith(cf.case_id):
                msg = f"{cf.case_id}: {msg}"
            bar.write(f"skipped {msg}")
            yield cf, None, msg
            continue
        yield case, pred, None


def _config_of(predictor: Any) -> Any:
    return getattr(predictor, "config", None)


def predict_cases(
    predictor: Any,
    cases_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    on_case: Callable[[str, int, int], None] | None = None,
    nuclei: bool = True,
) -> SubmissionResult:
    """Predict every case under ``cases_dir`` and write the submission to ``out_dir``.

    Parameters
    ----------
    predictor: an ``MRNPredictor``.
    cases_dir: folder searched recursively for case folders.
    out_dir: output folder (neither ``cases_dir`` nor inside it).
    progress: tqdm bar.
    on_case: ``callback(case_id, index, total)`` before each case (GUI progress).
    nuclei: False = diagnosis only: no DPT head, no NM_pred/QSM_pred files.
    """
    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    if out_dir.resolve() == cases_dir.resolve():
        raise InputDataError(f"{out_dir}: the output folder must differ from the input folder")
    if cases_dir.resolve() in out_dir.resolve().parents:
        raise InputDataError(
            f"{out_dir}: the output folder must not lie inside the input folder {cases_dir} "
            "(its RJPD_xxx folders would be found as cases next time)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(make_temp_dir(out_dir, prefix=".mrn-predict-", suffix=STAGE_SUFFIX))
    try:
        result = _predict_into(
            predictor, cases_dir, stage, progress=progress, on_case=on_case, nuclei=nuclei
        )
        publish_staged(stage, out_dir)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputWriteError(
            f"{e.filename or out_dir}: cannot write the outputs ({e.strerror or e}); "
            f"nothing was written to {out_dir}"
            + (" (disk full: free some space and rerun)" if e.errno == errno.ENOSPC else "")
        ) from e
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    result.out_dir = out_dir
    return result


def publish_staged(stage: Path, out_dir: Path) -> None:
    """Move every case folder, then the tables, from ``stage`` into ``out_dir``; drop ``stage``.

    The tables (``label_predict.csv`` ...) move last: a submission whose CSVs exist is complete.
    """
    tables = {LABEL_CSV, PROB_CSV, PROB_JSON, ERRORS_JSON, "config.json"}
    entries = sorted(stage.iterdir(), key=lambda q: (q.name in tables, q.name))
    for src in entries:
        dst = out_dir / src.name
        if src.is_dir() and dst.is_dir():
            old = Path(make_temp_dir(out_dir, prefix=f".{src.name}.", suffix=".old"))
            os.replace(dst, old / "prev")
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    shutil.rmtree(stage, ignore_errors=True)


def _predict_into(
    predictor: Any,
    cases_dir: Path,
    out_dir: Path,
    *,
    progress: bool,
    on_case: Callable[[str, int, int], None] | None,
    nuclei: bool = True,
) -> SubmissionResult:
    result = SubmissionResult(out_dir)
    folds = list(getattr(predictor, "folds", []))
    for case, pred, error in iter_predictions(
        predictor, cases_dir, progress=progress, on_case=on_case, nuclei=nuclei
    ):
        if error is None:
            try:
                write_case_outputs(pred, case, out_dir)
            except MRNError as e:
                error = str(e)
        if error is not None:
            row: dict[str, object] = {"case_id": case.case_id}
            row.update({f"p_pd_fold{k}": "" for k in folds})
            row.update(p_pd="", p_pd_std="", call="", p_pd_raw="", mask_source="", error=error)
            result.errors.append({"case_id": case.case_id, "error": error})
        else:
            row = pred.summary()
            row["error"] = ""
        result.rows.append(row)
    _write_tables(result, predictor, folds)
    return result


def _write_tables(result: SubmissionResult, predictor: Any, folds: list[int]) -> None:
    out = result.out_dir
    ok = [r for r in result.rows if not r["error"]]
    write_csv(
        [{"patient_id": r["case_id"], "prediction": r["call"]} for r in ok],
        out / LABEL_CSV,
        columns=("patient_id", "prediction"),
    )
    cols = [
        "case_id",
        *[f"p_pd_fold{k}" for k in folds],
        "p_pd",
        "p_pd_std",
        "call",
        "p_pd_raw",
        "mask_source",
        "error",
    ]
    write_csv(result.rows, out / PROB_CSV, columns=cols)
    json_rows = []
    for r in result.rows:
        json_rows.append(
            {
                "case_id": r["case_id"],
                "p_pd_folds": {str(k): r[f"p_pd_fold{k}"] for k in folds}
                if not r["error"]
                else None,
                "p_pd": r["p_pd"] if not r["error"] else None,
                "p_pd_std": r["p_pd_std"] if not r["error"] else None,
                "call": r["call"] if not r["error"] else None,
                "mask_source": r.get("mask_source") or None,
                "error": r["error"] or None,
            }
        )
    meta = {
        "folds": folds,
        "tta": bool(getattr(predictor, "tta", False)),
        "device": str(getattr(predictor, "device", "")),
        "model": str(predictor.bundle.root)
        if getattr(predictor, "bundle", None) is not None
        else None,
        "threshold": THRESHOLD,
        "calibrated": bool(getattr(predictor, "calibrated", False)),
    }
    write_json({"meta": meta, "cases": json_rows}, out / PROB_JSON)
    write_json(result.errors, out / ERRORS_JSON)
    cfg = _config_of(predictor)
    if cfg is not None:
        cfg.save(out / "config.json")
