"""Challenge-format cases: discovery, label CSVs, loading with validation, duplicate check.

A case folder is a directory named like ``RJPD_<digits>`` or any directory holding
``NM.nii(.gz)`` / ``QSM.nii(.gz)``; folders are found recursively (released archives nest
them). Labels come from headerless ``case_id,label`` CSVs (0 = HC, 1 = PD).
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mrn_engine.data.labels import NM_LABELS, QSM_LABELS
from mrn_engine.data.nifti import (
    Volume,
    check_mask_labels,
    check_same_grid,
    load_volume,
    nifti_path,
)
from mrn_engine.data.sanity import check_image_content
from mrn_engine.errors import InputDataError, MRNWarning
from mrn_engine.runtime import file_sha256

#: folder names that are case folders even before looking inside
CASE_DIR_PATTERN = re.compile(r"^RJPD_\d+$")
#: label CSV file names searched by :func:`find_labels`, with the split they define
LABEL_FILES: dict[str, str] = {"train_cases.csv": "train", "val_cases.csv": "val"}
#: file stems of a case folder -> CaseFiles attribute
CASE_FILE_STEMS: dict[str, str] = {
    "NM": "nm",
    "QSM": "qsm",
    "T1": "t1",
    "NM_mask": "nm_mask",
    "QSM_mask": "qsm_mask",
}
LABEL_NAMES = {0: "HC", 1: "PD"}


@dataclass
class CaseFiles:
    """What one case folder holds (``None`` = file absent)."""

    case_id: str
    folder: Path
    nm: Path | None = None
    qsm: Path | None = None
    t1: Path | None = None
    nm_mask: Path | None = None
    qsm_mask: Path | None = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, case_id: str | None = None) -> CaseFiles:
        """Look up the challenge file names in ``folder``."""
        folder = Path(folder)
        found = {attr: nifti_path(folder, stem) for stem, attr in CASE_FILE_STEMS.items()}
        return cls(case_id or folder.name, folder, **found)

    @property
    def has_masks(self) -> bool:
        """Both NM_mask and QSM_mask present."""
        return self.nm_mask is not None and self.qsm_mask is not None

    def input_paths(self) -> dict[str, Path]:
        """Present files by stem (``NM``, ``QSM``, ...)."""
        out = {}
        for stem, attr in CASE_FILE_STEMS.items():
            p = getattr(self, attr)
            if p is not None:
                out[stem] = p
        return out


def walk_following_links(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` that follows symlinked folders (data on another disk), each real folder once.

    Hidden folders are skipped; ``dirnames`` is sorted and may be pruned by the caller.
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, dirnames, filenames


def _has_images(names: list[str]) -> bool:
    return any(n in names for n in ("NM.nii.gz", "NM.nii", "QSM.nii.gz", "QSM.nii"))


def _case_id_for(folder: Path, root: Path) -> str:
    """The folder's name, or the nearest enclosing ``RJPD_<digits>`` folder's name."""
    if CASE_DIR_PATTERN.match(folder.name):
        return folder.name
    for parent in folder.parents:
        if parent == root.parent:
            break
        if CASE_DIR_PATTERN.match(parent.name):
            return parent.name
    return folder.name


def discover_cases(root: str | os.PathLike) -> list[CaseFiles]:
    """All case folders under ``root`` (recursive, ``root`` itself included), sorted by id.

    A folder holding ``NM``/``QSM`` images is a case; its id is its name, or the name of the
    nearest enclosing ``RJPD_<digits>`` folder (``RJPD_001/RJPD_001/NM.nii.gz`` and
    ``RJPD_001/images/NM.nii.gz`` are both case ``RJPD_001``). An ``RJPD_<digits>`` folder
    with no images anywhere below it is listed as a case with no files.

    Raises
    ------
    InputDataError
        ``root`` is not a folder, or one case id occurs in two folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputDataError(f"{root}: not a folder")
    found: dict[str, CaseFiles] = {}
    empty_named: list[Path] = []
    for dirpath, dirnames, filenames in walk_following_links(root):
        here = Path(dirpath)
        if _has_images(filenames):
            cf = CaseFiles.from_folder(here, _case_id_for(here, root))
            if cf.case_id in found:
                raise InputDataError(
                    f"{cf.case_id}: case found twice, in {found[cf.case_id].folder} and {here}; "
                    "remove one copy"
                )
            found[cf.case_id] = cf
            dirnames[:] = []  # a case folder holds no cases
        elif CASE_DIR_PATTERN.match(here.name):
            empty_named.append(here)
    for folder in empty_named:
        if folder.name not in found and not any(folder in c.folder.parents for c in found.values()):
            found[folder.name] = CaseFiles.from_folder(folder)
    return [found[k] for k in sorted(found)]


def read_labels_csv(
    path: str | os.PathLike, known_cases: set[str] | list[str] | None = None
) -> dict[str, int]:
    """Read a headerless ``case_id,label`` CSV (0 = HC, 1 = PD).

    A first row ``case_id,label`` (a header written by mistake) is tolerated. With
    ``known_cases``, every case named must be among them.

    Raises
    ------
    InputDataError
        Unreadable file, malformed rows, labels other than 0/1, conflicting duplicates or
        cases that do not exist (all listed).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise InputDataError(f"{path}: label file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputDataError(f"{path}: unreadable label file ({e})") from e
    labels: dict[str, int] = {}
    bad: list[str] = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        row = [c.strip() for c in row]
        if not row or all(c == "" for c in row):
            continue
        if lineno == 1 and len(row) >= 2 and row[1].lower() in ("label", "labels", "prediction"):
            continue
        if len(row) != 2 or not row[0]:
            bad.append(f"line {lineno}: expected 'case_id,label', got {','.join(row)!r}")
            continue
        case_id, value = row
        try:
            lab = int(float(value))
            if float(value) != lab or lab not in (0, 1):
                raise ValueError
        except ValueError:
            bad.append(f"line {lineno}: label {value!r} of {case_id} is not 0 (HC) or 1 (PD)")
            continue
        if case_id in labels and labels[case_id] != lab:
            bad.append(f"line {lineno}: {case_id} labelled both {labels[case_id]} and {lab}")
            continue
        labels[case_id] = lab
    if bad:
        raise InputDataError(
            f"{path}: bad label rows: "
            + "; ".join(bad[:10])
            + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "")
        )
    if known_cases is not None:
        unknown = sorted(set(labels) - set(known_cases))
        if unknown:
            raise InputDataError(
                f"{path}: names {len(unknown)} case(s) with no case folder: {', '.join(unknown)}"
            )
    return labels


def _label_files(root: Path) -> list[tuple[Path, str]]:
    out = []
    for dirpath, dirnames, filenames in walk_following_links(root):
        for name in dirnames:
            if name in LABEL_FILES:
                raise InputDataError(f"{Path(dirpath) / name}: is a folder, not a label CSV file")
        for name in sorted(filenames):
            if name in LABEL_FILES:
                out.append((Path(dirpath) / name, LABEL_FILES[name]))
    return out


def find_label_splits(
    root: str | os.PathLike, *, check_cases: bool = True
) -> dict[str, tuple[int, str]]:
    """``case_id -> (label, split)`` from every ``train_cases.csv``/``val_cases.csv`` under root."""
    root = Path(root)
    known = {c.case_id for c in discover_cases(root)} if check_cases else None
    out: dict[str, tuple[int, str]] = {}
    where: dict[str, Path] = {}
    for path, split in _label_files(root):
        for case_id, lab in read_labels_csv(path, known).items():
            if case_id in out and out[case_id][0] != lab:
                raise InputDataError(
                    f"{path}: {case_id} labelled {lab}, but {where[case_id]} says {out[case_id][0]}"
                )
            out.setdefault(case_id, (lab, split))
            where.setdefault(case_id, path)
    return out


def find_labels(root: str | os.PathLike, *, check_cases: bool = True) -> dict[str, int]:
    """Labels from ``train_cases.csv`` + ``val_cases.csv`` found anywhere under ``root``.

    With ``check_cases`` (default) every case named must have a case folder under ``root``.
    Returns ``{}`` when no label file exists.
    """
    return {k: v[0] for k, v in find_label_splits(root, check_cases=check_cases).items()}


def case_table(root: str | os.PathLike) -> list[dict]:
    """One row per case: id, folder, which files it has, label and split (None if unknown)."""
    cases = discover_cases(root)
    labels = find_label_splits(root, check_cases=True)
    rows = []
    for c in cases:
        row: dict = {"case_id": c.case_id, "folder": str(c.folder)}
        for stem, attr in CASE_FILE_STEMS.items():
            row[stem] = getattr(c, attr) is not None
        lab = labels.get(c.case_id)
        row["label"] = lab[0] if lab else None
        row["split"] = lab[1] if lab else None
        rows.append(row)
    return rows


@dataclass
class Case:
    """A loaded, validated case: NM and QSM (and optional T1/masks) on one grid."""

    case_id: str
    nm: Volume
    qsm: Volume
    t1: Volume | None = None
    nm_mask: Volume | None = None
    qsm_mask: Volume | None = None
    label: int | None = None
    files: CaseFiles | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(X, Y, Z)``."""
        return self.qsm.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm)."""
        return self.qsm.spacing


def load_case(
    files: CaseFiles | str | os.PathLike,
    label: int | None = None,
    *,
    require_masks: bool = False,
    with_t1: bool = True,
) -> Case:
    """Read and validate one case (``with_t1=False``: leave an optional T1 unread, as
    everything that only predicts or crops does).

    Checks: NM and QSM present, 3D, finite, real, plausible values, not (near-)constant
    (:mod:`mrn_engine.data.sanity`); NM and QSM on one grid; each mask on its image's grid
    with only known label values (NM 0-2, QSM 0-16). A bad optional T1 only warns
    (:class:`MRNWarning`) and the case is loaded without it.

    Raises
    ------
    InputDataError
        The first problem found, message starting with the offending file or case.
    """
    if not isinstance(files, CaseFiles):
        folder = Path(files)
        if not folder.is_dir():
            raise InputDataError(f"{folder}: case folder not found")
        files = CaseFiles.from_folder(folder)
    cid = files.case_id
    for attr, stem in (("nm", "NM"), ("qsm", "QSM")):
        if getattr(files, attr) is None:
            raise InputDataError(f"{cid}: {stem}.nii.gz missing in {files.folder}")
    if require_masks:
        for attr, stem in (("nm_mask", "NM_mask"), ("qsm_mask", "QSM_mask")):
            if getattr(files, attr) is None:
                raise InputDataError(f"{cid}: {stem}.nii.gz missing in {files.folder}")
    if label is not None and label not in (0, 1):
        raise InputDataError(f"{cid}: label must be 0 (HC) or 1 (PD), got {label!r}")
    nm = load_volume(files.nm, kind="image")
    check_image_content(nm.name, nm.array, "NM")
    qsm = load_volume(files.qsm, kind="image")
    check_image_content(qsm.name, qsm.array, "QSM")
    check_same_grid(nm, qsm, "NM and QSM must be co-registered on one grid")
    t1 = None
    if with_t1 and files.t1 is not None:
        try:  # optional: a bad T1 is reported and the case goes on without it
            t1 = load_volume(files.t1, kind="image")
            check_image_content(t1.name, t1.array, "T1")
            check_same_grid(qsm, t1, "T1 must share the QSM grid")
        except InputDataError as e:
            warnings.warn(f"{cid}: optional T1 ignored: {e}", MRNWarning, stacklevel=2)
            t1 = None
    nm_mask = qsm_mask = None
    if files.nm_mask is not None:
        nm_mask = load_volume(files.nm_mask, kind="mask")
        check_same_grid(nm, nm_mask, "mask must share its image's grid")
        check_mask_labels(nm_mask, NM_LABELS, "NM_mask")
    if files.qsm_mask is not None:
        qsm_mask = load_volume(files.qsm_mask, kind="mask")
        check_same_grid(qsm, qsm_mask, "mask must share its image's grid")
        check_mask_labels(qsm_mask, QSM_LABELS, "QSM_mask")
    return Case(cid, nm, qsm, t1, nm_mask, qsm_mask, label, files)


def check_duplicates(cases: list[CaseFiles], *, warn: bool = True) -> list[tuple[str, str]]:
    """Pairs of cases whose NM files are byte-identical (warns with :class:`MRNWarning`).

    Files are grouped by size first, so only same-size files are hashed.
    """
    by_size: dict[int, list[CaseFiles]] = {}
    for c in cases:
        if c.nm is not None:
            by_size.setdefault(c.nm.stat().st_size, []).append(c)
    pairs: list[tuple[str, str]] = []
    for group in by_size.values():
        if len(group) < 2:
            continue
        by_hash: dict[str, list[str]] = {}
        for c in group:
            by_hash.setdefault(file_sha256(c.nm), []).append(c.case_id)  # type: ignore[arg-type]
        for ids in by_hash.values():
            ids = sorted(ids)
            pairs.extend((a, b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    pairs.sort()
    if warn:
        for a, b in pairs:
            warnings.warn(
                f"{a} and {b}: byte-identical NM.nii.gz (duplicate subject?); keep them in the "
                "same cross-validation fold or drop one",
                MRNWarning,
                stacklevel=2,
            )
    return pairs
