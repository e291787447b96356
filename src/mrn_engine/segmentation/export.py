"""Export challenge cases as two nnU-Net v2 raw datasets (NM: SN right/left; QSM: 16 nuclei).

Layout written (one per modality)::

    NNUNET_RAW/Dataset504_PDCADxNM/
        dataset.json
        imagesTr/RJPD_000_0000.nii.gz     # hard link (or copy) of RJPD_000/NM.nii.gz
        labelsTr/RJPD_000.nii.gz          # hard link (or copy) of RJPD_000/NM_mask.nii.gz

Files are linked or copied byte for byte (geometry unchanged); only ``.nii`` sources are
re-encoded to ``.nii.gz`` through :func:`mrn_engine.data.save_volume`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mrn_engine.config import atomic_write_text
from mrn_engine.data import CaseFiles, discover_cases, load_case, load_volume, save_volume
from mrn_engine.data.labels import NM_LABELS, QSM_LABELS
from mrn_engine.errors import InputDataError
from mrn_engine.fileio import make_temp_file

#: nnU-Net file ending of every exported file
FILE_ENDING = ".nii.gz"
#: the organisers' baseline dataset ids (NM 504, QSM 505)
DEFAULT_IDS = {"NM": 504, "QSM": 505}
DEFAULT_NAMES = {"NM": "PDCADxNM", "QSM": "PDCADxQSM"}
MODALITIES = ("NM", "QSM")


@dataclass(frozen=True)
class DatasetSpec:
    """One nnU-Net dataset: which modality, its id and name."""

    modality: str  #: "NM" or "QSM"
    dataset_id: int
    name: str

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise InputDataError(f"modality must be one of {MODALITIES}, not {self.modality!r}")
        if not 1 <= int(self.dataset_id) <= 999:
            raise InputDataError(f"nnU-Net dataset id must lie in 1..999, got {self.dataset_id}")
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("Dataset"):
            raise InputDataError(f"invalid nnU-Net dataset name {self.name!r}")

    @property
    def folder_name(self) -> str:
        """``DatasetXXX_Name`` (nnU-Net's three-digit convention)."""
        return f"Dataset{int(self.dataset_id):03d}_{self.name}"

    @property
    def labels(self) -> dict[int, str]:
        """Challenge label value -> name for this modality."""
        return NM_LABELS if self.modality == "NM" else QSM_LABELS


def default_specs(
    nm_id: int = DEFAULT_IDS["NM"],
    qsm_id: int = DEFAULT_IDS["QSM"],
    nm_name: str = DEFAULT_NAMES["NM"],
    qsm_name: str = DEFAULT_NAMES["QSM"],
) -> dict[str, DatasetSpec]:
    """The two dataset specs keyed by modality."""
    if int(nm_id) == int(qsm_id):
        raise InputDataError(f"NM and QSM datasets need different ids (both {nm_id})")
    return {
        "NM": DatasetSpec("NM", int(nm_id), nm_name),
        "QSM": DatasetSpec("QSM", int(qsm_id), qsm_name),
    }


def dataset_json(spec: DatasetSpec, num_training: int) -> dict:
    """nnU-Net v2 ``dataset.json`` content for ``spec``."""
    labels = {"background": 0}
    labels.update({name: int(value) for value, name in sorted(spec.labels.items())})
    return {
        "channel_names": {"0": spec.modality},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
        "name": spec.name,
        "description": f"PDCADxFoundation {spec.modality} nuclei (exported by napari-mrn)",
    }


def _place_file(src: Path, dst: Path, *, link: bool, kind: str) -> None:
    """Put ``src`` at ``dst`` atomically: hard link, else byte copy, else re-encode (.nii)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not str(src).endswith(FILE_ENDING):
        save_volume(load_volume(src, kind=kind), dst)
        return
    fd, tmp = make_temp_file(dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            if not link:
                raise OSError("copy requested")
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exportable_cases(cases_dir: str | os.PathLike, modality: str) -> list[CaseFiles]:
    """Cases under ``cases_dir`` that hold the modality's image and mask."""
    img_attr, mask_attr = ("nm", "nm_mask") if modality == "NM" else ("qsm", "qsm_mask")
    return [c for c in discover_cases(cases_dir) if getattr(c, img_attr) and getattr(c, mask_attr)]


def export_dataset(
    cases: Sequence[CaseFiles],
    raw_root: str | os.PathLike,
    spec: DatasetSpec,
    *,
    link: bool = True,
    validate: bool = True,
    progress: bool = True,
) -> Path:
    """Write one nnU-Net raw dataset for ``spec.modality`` and return its folder.

    Parameters
    ----------
    cases
        Case files (each must hold the modality's image and mask).
    raw_root
        The ``nnUNet_raw`` folder.
    link
        Hard-link files when possible (same file system), else copy bytes.
    validate
        Load every case first (grid, label values; :func:`mrn_engine.data.load_case`).

    Raises
    ------
    InputDataError
        No usable case, a case without the needed files, or invalid case data.
    """
    img_attr, mask_attr = ("nm", "nm_mask") if spec.modality == "NM" else ("qsm", "qsm_mask")
    if not cases:
        raise InputDataError(f"{raw_root}: no cases with {spec.modality} image and mask to export")
    for c in cases:
        for attr, stem in ((img_attr, spec.modality), (mask_attr, f"{spec.modality}_mask")):
            if getattr(c, attr) is None:
                raise InputDataError(f"{c.case_id}: {stem}.nii.gz missing in {c.folder}")
    out = Path(raw_root) / spec.folder_name
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    it = tqdm(cases, desc=f"export {spec.folder_name}", disable=not progress, leave=False)
    for c in it:
        if validate:
            load_case(c, require_masks=False)
        _place_file(
            getattr(c, img_attr),
            out / "imagesTr" / f"{c.case_id}_0000{FILE_ENDING}",
            link=link,
            kind="image",
        )
        _place_file(
            getattr(c, mask_attr),
            out / "labelsTr" / f"{c.case_id}{FILE_ENDING}",
            link=link,
            kind="mask",
        )
    # drop stale cases from an earlier export into the same folder
    keep = {c.case_id for c in cases}
    for f in (out / "labelsTr").glob(f"*{FILE_ENDING}"):
        if f.name[: -len(FILE_ENDING)] not in keep:
            f.unlink()
    for f in (out / "imagesTr").glob(f"*_0000{FILE_ENDING}"):
        if f.name[: -len(f"_0000{FILE_ENDING}")] not in keep:
            f.unlink()
    atomic_write_text(out / "dataset.json", json.dumps(dataset_json(spec, len(cases)), indent=2))
    return out


def export_datasets(
    cases_dir: str | os.PathLike,
    raw_root: str | os.PathLike,
    *,
    specs: dict[str, DatasetSpec] | None = None,
    modalities: Sequence[str] = MODALITIES,
    link: bool = True,
    validate: bool = True,
    progress: bool = True,
) -> dict[str, Path]:
    """Export the NM and/or QSM datasets of all labelled cases under ``cases_dir``.

    Returns
    -------
    dict
        Modality -> dataset folder.
    """
    specs = specs or default_specs()
    out = {}
    for modality in modalities:
        cases = exportable_cases(cases_dir, modality)
        if not cases:
            raise InputDataError(
                f"{cases_dir}: no case holds both {modality}.nii.gz and {modality}_mask.nii.gz"
            )
        out[modality] = export_dataset(
            cases, raw_root, specs[modality], link=link, validate=validate, progress=progress
        )
    return out
