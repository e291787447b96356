"""Batch prediction and the challenge's submission format.

Per case ``OUT/RJPD_xxx/``: ``NM_pred.nii.gz`` and ``QSM_pred.nii.gz`` (uint8 masks on the
input grids, challenge label values) and ``PD_pred.txt`` (``0`` or ``1``). At the top of
``OUT``: ``label_predict.csv`` (``patient_id,prediction``), ``probabilities.csv`` / ``.json``
(per-fold P(PD), mean, std, call, and an ``error`` for cases that failed), ``errors.json``, the
``config.json`` of the model, ``timing.csv`` / ``timing.json`` (seconds per stage and case) and
``predict.json`` (the run record: :mod:`mrn_engine.inference.manifest`).

A run writes into the hidden staging folder ``OUT/.mrn-predict.partial`` (each case folder
atomically, then its record) and moves it into ``OUT`` at the end, case folders first and the
tables last. A killed run leaves the staging folder; the same command then skips the cases
already done. A run that fails to write (disk full) removes the staging folder and raises
:class:`OutputWriteError`, so ``OUT`` never holds half a submission. Cases stream through
:mod:`mrn_engine.inference.cohort` (read and cropped ahead in loader workers); ``shard`` picks
one slice of the cohort, and :mod:`mrn_engine.inference.merge` joins the slices.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mrn_engine.config import atomic_write_text
from mrn_engine.data import CaseFiles, discover_cases, save_volume
from mrn_engine.data.tables import write_csv, write_json
from mrn_engine.errors import ConfigError, InputDataError, MRNError
from mrn_engine.fileio import make_temp_dir
from mrn_engine.inference.cohort import (
    Shard,
    default_workers,
    parse_shard,
    stream_predictions,
)
from mrn_engine.inference.manifest import (
    MANIFEST,
    RECORDS_DIR,
    STAGE_DIR,
    STAGE_RUN,
    CaseRecord,
    done_cases,
    folder_digests,
    out_dir_lock,
    read_json,
    run_fingerprint,
    write_manifest,
    write_record,
)
from mrn_engine.inference.timing import STAGES, summarize, timed, timing_row
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
CONFIG_JSON = "config.json"
TIMING_CSV = "timing.csv"
TIMING_JSON = "timing.json"
#: the challenge submission: what a merge of shards reproduces byte for byte
SUBMISSION_TABLES = (LABEL_CSV, PROB_CSV, PROB_JSON, ERRORS_JSON, CONFIG_JSON)


class OutputWriteError(MRNError):
    """The outputs could not be written (disk full, permissions); nothing was left behind."""

    @classmethod
    def from_os_error(cls, e: OSError, out_dir: Path, what: str) -> OutputWriteError:
        """``FILE: cannot write WHAT (reason); nothing was written to OUT`` (+ a disk-full hint)."""
        return cls(
            f"{e.filename or out_dir}: cannot write {what} ({e.strerror or e}); "
            f"nothing was written to {out_dir}"
            + (" (disk full: free some space and rerun)" if e.errno == errno.ENOSPC else "")
        )


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
    skipped: cases not predicted again (done by an earlier run with the same settings).
    timing: per-stage summary of this run (:func:`mrn_engine.inference.timing.summarize`).
    """

    out_dir: Path
    rows: list[dict[str, object]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    timing: dict[str, object] = field(default_factory=dict)

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
    workers: int = 0,
) -> Iterator[tuple[Any, Any, str | None]]:
    """Load and predict every case under ``cases_dir``.

    Yields
    ------
    ``(case, prediction, None)`` or ``(case_files, None, error message)`` per case; an input
    problem with one case never stops the others. ``only`` restricts to those case ids.
    ``nuclei=False``: diagnosis only (``predict_case(nuclei=False)``, no DPT head).
    ``workers``: DataLoader workers reading ahead (:func:`stream_predictions`).
    """
    files = discover_cases(cases_dir)
    if only is not None:
        files = [f for f in files if f.case_id in only]
    if not files:
        raise InputDataError(f"{cases_dir}: no case folders (with NM/QSM files) found")
    with tqdm(total=len(files), desc="predict", unit="case", disable=not progress) as bar:
        for item, pred, error in stream_predictions(
            predictor,
            files,
            labels=labels,
            workers=workers,
            nuclei=nuclei,
            on_case=on_case,
            bar=bar,
        ):
            bar.update(1)
            yield (item.files, None, error) if error is not None else (item.case, pred, None)


def submission_meta(predictor: Any) -> dict[str, object]:
    """The ``meta`` of ``probabilities.json``."""
    return {
        "folds": list(getattr(predictor, "folds", [])),
        "tta": bool(getattr(predictor, "tta", False)),
        "device": str(getattr(predictor, "device", "")),
        "model": str(predictor.bundle.root)
        if getattr(predictor, "bundle", None) is not None
        else None,
        "threshold": THRESHOLD,
        "calibrated": bool(getattr(predictor, "calibrated", False)),
        "site_adaptation": site.record()
        if (site := getattr(predictor, "site_adaptation", None))
        else None,
    }


def _check_out_dir(cases_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == cases_dir.resolve():
        raise InputDataError(f"{out_dir}: the output folder must differ from the input folder")
    if cases_dir.resolve() in out_dir.resolve().parents:
        raise InputDataError(
            f"{out_dir}: the output folder must not lie inside the input folder {cases_dir} "
            "(its RJPD_xxx folders would be found as cases next time)"
        )


def _open_stage(out_dir: Path, run: dict[str, object], overwrite: bool) -> Path:
    """``OUT/.mrn-predict.partial``: kept from a killed run of the same settings, else new."""
    stage = out_dir / STAGE_DIR
    if stage.exists() and (overwrite or read_json(stage / STAGE_RUN) != run):
        shutil.rmtree(stage)
    stage.mkdir(exist_ok=True)
    write_json(run, stage / STAGE_RUN)
    return stage


def predict_cases(
    predictor: Any,
    cases_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    on_case: Callable[[str, int, int], None] | None = None,
    nuclei: bool = True,
    workers: int | None = None,
    shard: Shard | str | None = None,
    overwrite: bool = False,
) -> SubmissionResult:
    """Predict every case under ``cases_dir`` and write the submission to ``out_dir``.

    Parameters
    ----------
    predictor: an ``MRNPredictor``.
    cases_dir: folder searched recursively for case folders.
    out_dir: output folder (neither ``cases_dir`` nor inside it).
    progress: tqdm bar (with ETA).
    on_case: ``callback(case_id, index, total)`` before each case (GUI progress).
    nuclei: False = diagnosis only: no DPT head, no NM_pred/QSM_pred files.
    workers: DataLoader workers reading and cropping ahead (None = :func:`default_workers`).
    shard: ``"i/n"`` or :class:`Shard`: only the i-th of n slices of the sorted case ids.
    overwrite: predict every case again, even those an earlier run (killed or finished, same
        bundle and settings) has already done; by default those are skipped.
    """
    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    _check_out_dir(cases_dir, out_dir)
    shard = shard if isinstance(shard, Shard) else parse_shard(shard)
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ConfigError(f"workers={workers}: must be 0 (read in this process) or more")
    files = discover_cases(cases_dir)
    if not files:
        raise InputDataError(f"{cases_dir}: no case folders (with NM/QSM files) found")
    cohort = [f.case_id for f in files]
    chosen = set(shard.select(cohort))
    files = [f for f in files if f.case_id in chosen]
    if not files:
        raise InputDataError(
            f"{cases_dir}: shard {shard} is empty ({len(cohort)} case(s)); "
            f"use at most {len(cohort)} shards"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(predictor, nuclei=nuclei)
    run = {"fingerprint": fingerprint, "shard": str(shard)}
    with out_dir_lock(out_dir):
        stage = _open_stage(out_dir, run, overwrite)
        try:
            result = _predict_into(
                predictor,
                files,
                stage,
                out_dir,
                run={**run, "cohort": cohort},
                done={} if overwrite else done_cases(chosen, stage, out_dir, fingerprint),
                progress=progress,
                on_case=on_case,
                nuclei=nuclei,
                workers=workers,
            )
            publish_staged(stage, out_dir)
        except OSError as e:
            shutil.rmtree(stage, ignore_errors=True)
            raise OutputWriteError.from_os_error(e, out_dir, "the outputs") from e
    result.out_dir = out_dir
    return result


def publish_staged(stage: Path, out_dir: Path) -> None:
    """Move every case folder, then the tables, from ``stage`` into ``out_dir``; drop ``stage``.

    The tables (``label_predict.csv`` ...) move last and ``predict.json`` after them: a
    submission whose ``predict.json`` exists is complete. The stage's own records stay behind.
    """
    tables = {*SUBMISSION_TABLES, TIMING_CSV, TIMING_JSON}
    internal = {RECORDS_DIR, STAGE_RUN}
    entries = sorted(
        (q for q in stage.iterdir() if q.name not in internal),
        key=lambda q: (q.name == MANIFEST, q.name in tables, q.name),
    )
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


def _tidy_stage(stage: Path, case_ids: set[str]) -> None:
    """Drop what a killed run left in ``stage`` that this run will not publish: half-written
    ``.<case>.*.tmp`` folders and folders of cases outside this run's selection."""
    for q in stage.iterdir():
        if (
            q.is_dir()
            and q.name != RECORDS_DIR
            and (q.name.startswith(".") or q.name not in case_ids)
        ):
            shutil.rmtree(q, ignore_errors=True)


def error_row(case_id: str, folds: list[int], error: str) -> dict[str, object]:
    """The ``probabilities.csv`` row of a case that failed."""
    row: dict[str, object] = {"case_id": case_id}
    row.update({f"p_pd_fold{k}": "" for k in folds})
    row.update(p_pd="", p_pd_std="", call="", p_pd_raw="", mask_source="", error=error)
    return row


def _predict_into(
    predictor: Any,
    files: list[CaseFiles],
    stage: Path,
    out_dir: Path,
    *,
    run: dict[str, Any],
    done: dict[str, CaseRecord],
    progress: bool,
    on_case: Callable[[str, int, int], None] | None,
    nuclei: bool,
    workers: int,
) -> SubmissionResult:
    """Predict the cases not ``done`` into ``stage``, then write the tables for all of them."""
    fingerprint = run["fingerprint"]
    folds = list(getattr(predictor, "folds", []))
    records: dict[str, CaseRecord] = dict(done)
    timings: list[dict[str, object]] = []
    todo = [f for f in files if f.case_id not in done]
    _tidy_stage(stage, {f.case_id for f in files})
    start = time.perf_counter()
    with tqdm(
        total=len(files), initial=len(done), desc="predict", unit="case", disable=not progress
    ) as bar:
        for item, pred, error in stream_predictions(
            predictor, todo, workers=workers, nuclei=nuclei, on_case=on_case, bar=bar
        ):
            cid = item.files.case_id
            digests: dict[str, str] = {}
            if error is None:
                try:
                    with timed(pred.timings, "write"):
                        digests = folder_digests(write_case_outputs(pred, item.case, stage))
                except MRNError as e:
                    error = str(e)
            if error is None:
                row = {**pred.summary(), "error": ""}
                timings.append(timing_row(cid, pred.timings))
            else:
                shutil.rmtree(stage / cid, ignore_errors=True)  # a stale folder of a killed run
                row = error_row(cid, folds, error)
            records[cid] = CaseRecord(cid, row, digests, dict(fingerprint))
            write_record(stage, records[cid])
            bar.update(1)
    ordered = [records[f.case_id] for f in files]
    result = SubmissionResult(stage, rows=[r.row for r in ordered])
    result.errors = [
        {"case_id": r.case_id, "error": str(r.row["error"])} for r in ordered if not r.ok
    ]
    result.skipped = [f.case_id for f in files if f.case_id in done]
    result.timing = summarize(
        timings, wall_s=time.perf_counter() - start, workers=workers, skipped=len(done)
    )
    meta = submission_meta(predictor)
    write_tables(stage, result.rows, result.errors, folds, meta)
    cfg = getattr(predictor, "config", None)
    if cfg is not None:
        cfg.save(stage / CONFIG_JSON)
    write_csv(timings, stage / TIMING_CSV, columns=("case_id", *STAGES, "wait", "total"))
    write_json(result.timing, stage / TIMING_JSON)
    index, count = (int(v) for v in str(run["shard"]).split("/"))
    write_manifest(
        stage,
        fingerprint=fingerprint,
        meta=meta,
        shard={"index": index, "count": count},
        cohort=run["cohort"],
        records=ordered,
    )
    return result


def write_tables(
    out: Path,
    rows: list[dict[str, object]],
    errors: list[dict[str, str]],
    folds: list[int],
    meta: dict[str, object],
) -> None:
    """``label_predict.csv``, ``probabilities.csv`` / ``.json`` and ``errors.json`` into ``out``."""
    ok = [r for r in rows if not r["error"]]
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
    write_csv(rows, out / PROB_CSV, columns=cols)
    json_rows = []
    for r in rows:
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
    write_json({"meta": meta, "cases": json_rows}, out / PROB_JSON)
    write_json(errors, out / ERRORS_JSON)
