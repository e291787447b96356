"""What a ``mrn predict`` run records so that it can resume and its shards can be merged.

``OUT/predict.json`` (written last, with the tables) holds the run's fingerprint (bundle
digest, folds, TTA, nuclei, ignore-masks), the ``probabilities.json`` meta, the shard, the
whole cohort's sorted case ids and, per case of the shard, its summary row and the SHA-256 of
each output file. While a run is going, the same per-case record is written to
``OUT/.mrn-predict.partial/records/<case>.json`` right after the case's folder: a case counts
as done on a rerun only if its record matches the run's fingerprint and its files still have
the recorded digests, so a killed run never leaves a half case that counts as done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mrn_engine.bundle import CONFIG_FILE, ModelBundle
from mrn_engine.data.tables import write_json
from mrn_engine.errors import InputDataError
from mrn_engine.runtime import file_sha256
from mrn_engine.segmentation.settings import SegInferenceSettings
from mrn_engine.training.calibration import CALIBRATION_FILE
from mrn_engine.training.ensemble_calibration import ENSEMBLE_FILE

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None  # type: ignore[assignment]

#: the run record at the top of ``OUT``
MANIFEST = "predict.json"
#: the fixed-name staging folder of a run (kept when the run is killed, for resuming)
STAGE_DIR = ".mrn-predict.partial"
#: per-case records inside the staging folder
RECORDS_DIR = "records"
#: the staging folder's own fingerprint
STAGE_RUN = "run.json"
FORMAT = 1


def bundle_digest(bundle: ModelBundle | None, folds: Iterable[int]) -> str | None:
    """SHA-256 over the bundle's ``config.json``, the chosen folds' weights and calibrations and
    the ensemble calibration.

    The bundle's ``nnunet/`` files enter by relative path and size (they can be gigabytes).
    None for a predictor built without a bundle.
    """
    if bundle is None:
        return None
    root = Path(bundle.root)
    digest = hashlib.sha256()
    paths = [root / CONFIG_FILE, root / ENSEMBLE_FILE]
    for k in sorted(folds):
        paths += [bundle.weights_path(k), bundle.fold_dir(k) / CALIBRATION_FILE]
    for p in paths:
        if p.is_file():
            digest.update(f"{p.relative_to(root).as_posix()}:{file_sha256(p)}\n".encode())
    if bundle.nnunet_dir is not None:
        for p in sorted(q for q in bundle.nnunet_dir.rglob("*") if q.is_file()):
            digest.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    return digest.hexdigest()


def run_fingerprint(predictor: Any, *, nuclei: bool) -> dict[str, object]:
    """What makes two runs' predictions interchangeable (the device is not part of it)."""
    folds = list(getattr(predictor, "folds", []))
    masks = getattr(predictor, "masks", None)
    return {
        "format": FORMAT,
        "bundle_sha256": bundle_digest(getattr(predictor, "bundle", None), folds),
        "folds": folds,
        "tta": bool(getattr(predictor, "tta", False)),
        "nuclei": bool(nuclei),
        "ignore_masks": bool(getattr(masks, "ignore_masks", False)),
        # nnU-Net settings change the masks of cases without mask files
        "seg": asdict(getattr(masks, "seg_settings", None) or SegInferenceSettings()),
        # a site harmonisation changes every P(PD)
        "site_adaptation": _site_digest(getattr(predictor, "site_adaptation", None)),
    }


def _site_digest(adaptation: Any) -> str | None:
    """SHA-256 of the site shifts (None without site adaptation)."""
    if adaptation is None:
        return None
    digest = hashlib.sha256()
    for k in sorted(adaptation.shift):
        digest.update(f"fold_{k}:".encode() + adaptation.shift[k].float().numpy().tobytes())
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 of every file in a case output folder."""
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


@dataclass
class CaseRecord:
    """One case of a run: its summary row (with ``error``) and its output files' digests."""

    case_id: str
    row: dict[str, object]
    files: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.row.get("error")

    def files_match(self, folder: Path) -> bool:
        """``folder`` holds exactly the recorded files with the recorded digests."""
        try:
            return folder.is_dir() and folder_digests(folder) == self.files
        except OSError:
            return False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaseRecord:
        return cls(
            str(data["case_id"]),
            dict(data["row"]),
            dict(data.get("files") or {}),
            dict(data.get("fingerprint") or {}),
        )


def write_record(stage: Path, record: CaseRecord) -> Path:
    """``stage/records/<case>.json`` (atomic)."""
    path = stage / RECORDS_DIR / f"{record.case_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(asdict(record), path)
    return path


def read_json(path: Path) -> Any:
    """Parsed JSON, or None when missing or unreadable (an unusable record = not done)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_records(stage: Path) -> dict[str, CaseRecord]:
    """The readable per-case records of a staging folder."""
    out: dict[str, CaseRecord] = {}
    folder = stage / RECORDS_DIR
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.json")):
        data = read_json(p)
        with contextlib.suppress(KeyError, TypeError, ValueError):
            rec = CaseRecord.from_json(data)
            out[rec.case_id] = rec
    return out


def manifest_records(out_dir: Path, fingerprint: Mapping[str, object]) -> dict[str, CaseRecord]:
    """The case records of an earlier finished run in ``out_dir`` with the same fingerprint."""
    data = read_json(out_dir / MANIFEST)
    if not isinstance(data, dict) or data.get("fingerprint") != dict(fingerprint):
        return {}
    out: dict[str, CaseRecord] = {}
    for c in data.get("cases") or []:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            rec = CaseRecord.from_json({**c, "fingerprint": data["fingerprint"]})
            out[rec.case_id] = rec
    return out


def done_cases(
    case_ids: Sequence[str],
    stage: Path,
    out_dir: Path,
    fingerprint: Mapping[str, object],
) -> dict[str, CaseRecord]:
    """The cases of ``case_ids`` already predicted with this fingerprint, files intact.

    Looked up in the staging folder of a killed run (the case folder still staged or already
    moved into ``out_dir``) and in the ``predict.json`` of a finished run in ``out_dir``.
    Failed cases are never done (they are tried again).
    """
    staged = stage_records(stage)
    finished = manifest_records(out_dir, fingerprint)
    done: dict[str, CaseRecord] = {}
    for cid in case_ids:
        for rec in (staged.get(cid), finished.get(cid)):
            if rec is None or not rec.ok or rec.fingerprint != dict(fingerprint):
                continue
            if rec.files_match(stage / cid) or rec.files_match(out_dir / cid):
                done[cid] = rec
                break
    return done


def write_manifest(
    folder: Path,
    *,
    fingerprint: Mapping[str, object],
    meta: Mapping[str, object],
    shard: Mapping[str, int],
    cohort: Sequence[str],
    records: Sequence[CaseRecord],
) -> Path:
    """``folder/predict.json`` (atomic)."""
    data = {
        "format": FORMAT,
        "fingerprint": dict(fingerprint),
        "meta": dict(meta),
        "shard": dict(shard),
        "cohort": list(cohort),
        "cases": [{"case_id": r.case_id, "row": r.row, "files": r.files} for r in records],
    }
    path = folder / MANIFEST
    write_json(data, path)
    return path


#: descriptors of the held output locks, closed in forked children (loader workers), so that
#: a child outliving a killed run never keeps the folder locked
_LOCK_FDS: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in list(_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lock_fds_in_child)


@contextlib.contextmanager
def out_dir_lock(out_dir: Path) -> Iterator[None]:
    """Refuse a second ``mrn predict`` writing into the same ``out_dir`` (``flock`` on the folder).

    The lock ends with the process (also when it is killed). Where ``fcntl`` is missing
    (Windows) there is no lock.
    """
    if fcntl is None:
        yield
        return
    fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    _LOCK_FDS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputDataError(
                f"{out_dir}: another mrn predict is writing into this folder; wait for it to "
                "finish or choose another --out (one --out per shard)"
            ) from None
        yield
    finally:
        _LOCK_FDS.discard(fd)
        os.close(fd)
