"""The unlabelled cohort of ``mrn pretrain``: cases with masks, their descriptors, a data hash.

Diagnosis labels are never read here (no ``train_cases.csv`` / ``val_cases.csv``): cases are
discovered by folder, loaded with ``label=None``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mrn_engine.config import RoiConfig, atomic_write_text
from mrn_engine.data.cases import CaseFiles, discover_cases, load_case
from mrn_engine.data.tables import read_csv
from mrn_engine.errors import InputDataError, MRNWarning
from mrn_engine.pretraining.descriptors import AGE, case_descriptors
from mrn_engine.rois.cache import RoiCache, inputs_hash
from mrn_engine.runtime import file_sha256

#: the files whose bytes make the data hash (T1 is not used)
HASHED = ("nm", "qsm", "nm_mask", "qsm_mask")


@dataclass
class PretrainCohort:
    """Usable cases (``files``), their raw descriptors, and the data hash."""

    roots: list[Path]
    files: dict[str, CaseFiles]
    descriptors: dict[str, dict[str, float]]
    data_sha256: str
    skipped: dict[str, str]


def read_ages(path: str | os.PathLike) -> dict[str, float]:
    """``case_id,age`` CSV (with that header) -> {case id: age}; empty / non-numeric = unknown."""
    rows = read_csv(path, required=("case_id", "age"))
    out: dict[str, float] = {}
    for r in rows:
        try:
            age = float(r["age"])
        except (TypeError, ValueError):
            continue
        if math.isfinite(age):
            out[r["case_id"].strip()] = age
    return out


def file_hashes(files: CaseFiles) -> dict[str, str]:
    """SHA-256 of a case's NM, QSM and mask files."""
    return {name: file_sha256(getattr(files, name)) for name in HASHED}


def data_hash(hashes: dict[str, dict[str, str]]) -> str:
    """SHA-256 over the case ids and the SHA-256 of their NM, QSM and mask files."""
    digest = hashlib.sha256()
    for cid in sorted(hashes):
        digest.update(cid.encode())
        for name in HASHED:
            digest.update(f"{name}:{hashes[cid][name]}".encode())
    return digest.hexdigest()


def _read_memo(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        memo = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(
            f"{path}: unreadable descriptor cache ({e}); recomputing", MRNWarning, stacklevel=3
        )
        return {}
    return memo if isinstance(memo, dict) else {}


def _named_roots(roots: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """One folder or several; several must exist and have distinct folder names."""
    paths = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(r) for r in roots]
    if not paths:
        raise InputDataError("pretraining: no cases folder given")
    for p in paths:
        if not p.is_dir():
            raise InputDataError(f"{p}: cases folder not found")
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        raise InputDataError(
            f"pretraining folders must have distinct names (case ids are prefixed with them): "
            f"{', '.join(map(str, paths))}"
        )
    return paths


def load_pretrain_cohort(
    roots: str | os.PathLike | Sequence[str | os.PathLike],
    cfg: RoiConfig,
    ages: dict[str, float] | None = None,
    *,
    memo_file: str | os.PathLike | None = None,
    progress: bool = True,
    roi_cache: RoiCache | None = None,
) -> PretrainCohort:
    """Discover cases under ``roots`` and compute their descriptors (labels are not read).

    With several folders, a case is named ``<folder name>/<case id>`` (two cohorts may both
    hold ``RJPD_000``); ``ages`` is keyed by the plain case id.

    A case without both masks, or whose descriptors (or, with ``roi_cache``, ROI crops)
    cannot be measured, is skipped with an
    :class:`MRNWarning` naming it. ``InputDataError`` when fewer than 2 cases remain.
    ``memo_file`` (JSON) keeps each case's descriptors and file hashes, keyed by its inputs
    (path, size, mtime, as the ROI cache), so a resumed or repeated run does not reload them.
    ``roi_cache``: a case loaded for its descriptors also gets its ROI crops cached there, so
    that the first pretraining epoch does not read it again.
    """
    memo_path = Path(memo_file) if memo_file is not None else None
    memo = _read_memo(memo_path)
    hashes: dict[str, dict[str, str]] = {}
    paths = _named_roots(roots)
    found = [
        (f"{p.resolve().name}/{f.case_id}" if len(paths) > 1 else f.case_id, f)
        for p in paths
        for f in discover_cases(p)
    ]
    files: dict[str, CaseFiles] = {}
    table: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    for cid, f in tqdm(found, desc="descriptors", unit="case", disable=not progress):
        absent = [n for n in HASHED if getattr(f, n) is None]
        if absent:
            skipped[cid] = f"no {', '.join(absent)}"
            continue
        key = inputs_hash(f)
        entry = memo.get(cid)
        if not (isinstance(entry, dict) and entry.get("inputs") == key):
            try:
                case = load_case(f, None, with_t1=False)
                desc = case_descriptors(case, cfg)
                if roi_cache is not None:
                    roi_cache.get_or_compute(f, cfg, case=case)
            except InputDataError as e:
                skipped[cid] = str(e)
                continue
            entry = {"inputs": key, "sha256": file_hashes(f), "descriptors": desc}
            memo[cid] = entry
        desc = dict(entry["descriptors"])
        hashes[cid] = entry["sha256"]
        if ages is not None:
            desc[AGE] = ages.get(f.case_id, math.nan)
        files[cid] = f
        table[cid] = desc
    for cid, why in skipped.items():
        warnings.warn(f"{cid}: skipped for pretraining ({why})", MRNWarning, stacklevel=2)
    if len(files) < 2:
        raise InputDataError(
            f"{', '.join(map(str, paths))}: {len(files)} usable case(s) with NM/QSM images and both masks; "
            "pretraining needs at least 2"
        )
    if memo_path is not None:
        atomic_write_text(memo_path, json.dumps(memo))
    return PretrainCohort(paths, files, table, data_hash(hashes), skipped)
