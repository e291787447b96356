"""Reading a model bundle (the output of ``mrn train`` / ``mrn demo``).

Layout (docs/architecture.md)::

    BUNDLE/config.json        RunConfig
    BUNDLE/bundle.json        folds -> {train, val} case ids, provenance
    BUNDLE/fold_k/model.safetensors, metrics.csv, oof.csv (case_id,label,p_pd)
    BUNDLE/nnunet/            optional nnU-Net NM/QSM models

``mrn demo`` records where its bundle went in ``$MRN_CACHE_DIR/last_demo_bundle.json``
(default ``~/.cache/mrn``): :func:`record_demo_bundle` / :func:`last_demo_bundle`, read by
napari-mrn to offer that bundle without asking.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mrn_engine.config import RunConfig, atomic_write_text
from mrn_engine.errors import InputDataError, WeightsError
from mrn_engine.models.checkpoint import check_finite_state

_FOLD_DIR = re.compile(r"^fold_(\d+)$")

#: file name of the demo-bundle record in the engine's cache folder
DEMO_BUNDLE_RECORD = "last_demo_bundle.json"


@dataclass
class ModelBundle:
    """A model bundle on disk.

    Attributes
    ----------
    root: the bundle folder.
    config: its ``RunConfig``.
    info: the parsed ``bundle.json`` (empty if absent).
    folds: fold indices that have weights, sorted.
    splits: fold -> ``{"train": [...], "val": [...]}`` case ids (as far as ``bundle.json`` says).
    """

    root: Path
    config: RunConfig
    info: dict = field(default_factory=dict)
    folds: list[int] = field(default_factory=list)
    splits: dict[int, dict[str, list[str]]] = field(default_factory=dict)

    def fold_dir(self, k: int) -> Path:
        return self.root / f"fold_{k}"

    def weights_path(self, k: int) -> Path:
        return self.fold_dir(k) / "model.safetensors"

    def load_state(self, k: int) -> dict[str, torch.Tensor]:
        """The fold's student ``state_dict`` (CPU tensors)."""
        path = self.weights_path(k)
        if not path.is_file():
            raise WeightsError(f"{path}: fold {k} weights not found")
        try:
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise WeightsError(f"{path}: cannot read weights ({e})") from e
        return check_finite_state(state, path)

    @property
    def nnunet_dir(self) -> Path | None:
        d = self.root / "nnunet"
        return d if d.is_dir() else None

    def oof_path(self, k: int) -> Path:
        return self.fold_dir(k) / "oof.csv"

    def metrics_path(self, k: int) -> Path:
        return self.fold_dir(k) / "metrics.csv"


def _parse_splits(info: dict) -> dict[int, dict[str, list[str]]]:
    """Accept ``folds`` as a list (index = fold, or items with ``fold``) or a mapping."""
    folds = info.get("folds")
    out: dict[int, dict[str, list[str]]] = {}
    if isinstance(folds, list):
        for i, item in enumerate(folds):
            if isinstance(item, dict):
                k = int(item.get("fold", i))
                out[k] = {"train": list(item.get("train", [])), "val": list(item.get("val", []))}
    elif isinstance(folds, dict):
        for key, item in folds.items():
            m = re.search(r"(\d+)$", str(key))
            if m and isinstance(item, dict):
                out[int(m.group(1))] = {
                    "train": list(item.get("train", [])),
                    "val": list(item.get("val", [])),
                }
    return out


def open_bundle(path: str | os.PathLike) -> ModelBundle:
    """Read a bundle's config, fold list and splits (weights are loaded on demand).

    Raises
    ------
    InputDataError: the folder is missing or holds no ``config.json`` / no fold weights.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputDataError(f"{root}: model bundle folder not found")
    if not (root / "config.json").exists():  # a folder of that name: RunConfig.load says so
        raise InputDataError(f"{root}: not a model bundle (no config.json)")
    config = RunConfig.load(root / "config.json")
    info: dict = {}
    if (root / "bundle.json").is_file():
        try:
            info = json.loads((root / "bundle.json").read_text())
        except json.JSONDecodeError as e:
            raise InputDataError(f"{root / 'bundle.json'}: not valid JSON ({e})") from e
    folds = sorted(
        int(m.group(1))
        for d in root.iterdir()
        if d.is_dir() and (m := _FOLD_DIR.match(d.name)) and (d / "model.safetensors").is_file()
    )
    if not folds:
        raise InputDataError(f"{root}: model bundle has no fold_*/model.safetensors")
    return ModelBundle(root=root, config=config, info=info, folds=folds, splits=_parse_splits(info))


def read_oof(bundle: ModelBundle) -> dict[int, list[dict[str, object]]]:
    """Per fold, the out-of-fold rows ``{case_id, label, p_pd}`` (folds without oof.csv skipped)."""
    from mrn_engine.analysis.tables import read_csv

    out: dict[int, list[dict[str, object]]] = {}
    for k in bundle.folds:
        p = bundle.oof_path(k)
        if not p.is_file():
            continue
        rows = read_csv(p, required=("case_id", "label", "p_pd"))
        try:
            out[k] = [
                {"case_id": r["case_id"], "label": int(r["label"]), "p_pd": float(r["p_pd"])}
                for r in rows
            ]
        except ValueError as e:
            raise InputDataError(f"{p}: bad label or probability ({e})") from e
    return out


# ----------------------------------------------------------------------------- demo bundle record
def demo_record_path() -> Path:
    """``$MRN_CACHE_DIR/last_demo_bundle.json`` (default ``~/.cache/mrn/last_demo_bundle.json``)."""
    from mrn_engine.phantom.atlas import cache_dir

    return cache_dir() / DEMO_BUNDLE_RECORD


def record_demo_bundle(bundle: str | os.PathLike) -> Path:
    """Record ``bundle`` (absolute path) as the last demo bundle; returns the record file.

    Written atomically. Raises ``OSError`` when the cache folder is not writable.
    """
    record = {
        "bundle": str(Path(bundle).expanduser().resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = demo_record_path()
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def last_demo_bundle() -> Path | None:
    """The bundle recorded by the last ``mrn demo``, or None when there is no usable record.

    A record whose folder was deleted (or no longer holds ``config.json``), an unreadable or
    malformed record: all None, never an error.
    """
    try:
        record = json.loads(demo_record_path().read_text())
        path = Path(record["bundle"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if (path / "config.json").is_file() else None
