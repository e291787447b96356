"""The model bundle (output of ``mrn train`` / ``mrn demo``): the one module that knows its layout.

Layout::

    BUNDLE/config.json                RunConfig
    BUNDLE/bundle.json                folds -> {train, val} case ids, provenance, weights sha256
    BUNDLE/.bundle.lock               lock of parallel ``--fold`` processes
    BUNDLE/fold_k/model.safetensors   the fold's student weights
    BUNDLE/fold_k/config.json, metrics.csv, oof.csv (case_id,label,p_pd,fold), optimizer.pt,
                  done.json, checkpoints/, calibration.json, anchor_controls.safetensors,
                  reference_slices.safetensors (healthy reference of per-slice evidence)
    BUNDLE/nnunet/                    optional nnU-Net NM/QSM models

``mrn demo`` records where its bundle went in ``$MRN_CACHE_DIR/last_demo_bundle.json``
(:func:`record_demo_bundle` / :func:`last_demo_bundle`), read by napari-mrn.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mrn_engine.config import RunConfig, atomic_write_text, cache_dir
from mrn_engine.data.tables import read_csv
from mrn_engine.errors import ConfigError, InputDataError, WeightsError
from mrn_engine.runtime import check_finite_state, file_sha256

try:  # POSIX advisory file locks; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

#: file names of the layout
CONFIG_FILE = "config.json"
INFO_FILE = "bundle.json"
LOCK_FILE = ".bundle.lock"
WEIGHTS_FILE = "model.safetensors"
OOF_FILE = "oof.csv"
METRICS_FILE = "metrics.csv"
OPTIMIZER_FILE = "optimizer.pt"
DONE_FILE = "done.json"
CHECKPOINTS_DIR = "checkpoints"
NNUNET_DIR = "nnunet"
#: columns of ``fold_k/oof.csv``
OOF_COLUMNS = ("case_id", "label", "p_pd", "fold")
#: file name of the demo-bundle record in the engine's cache folder
DEMO_BUNDLE_RECORD = "last_demo_bundle.json"

_FOLD_DIR = re.compile(r"^fold_(\d+)$")


def fold_dir(root: str | os.PathLike, k: int) -> Path:
    """``root/fold_k``."""
    return Path(root) / f"fold_{int(k)}"


def fold_dirs(root: str | os.PathLike) -> dict[int, Path]:
    """Every ``fold_k`` folder of ``root`` (trained or not), by fold index."""
    root = Path(root)
    if not root.is_dir():
        return {}
    found = {
        int(m.group(1)): d for d in root.iterdir() if d.is_dir() and (m := _FOLD_DIR.match(d.name))
    }
    return dict(sorted(found.items()))


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
    info: dict[str, Any] = field(default_factory=dict)
    folds: list[int] = field(default_factory=list)
    splits: dict[int, dict[str, list[str]]] = field(default_factory=dict)

    def fold_dir(self, k: int) -> Path:
        return fold_dir(self.root, k)

    def weights_path(self, k: int) -> Path:
        return self.fold_dir(k) / WEIGHTS_FILE

    def oof_path(self, k: int) -> Path:
        return self.fold_dir(k) / OOF_FILE

    @property
    def nnunet_dir(self) -> Path | None:
        d = self.root / NNUNET_DIR
        return d if d.is_dir() else None

    @property
    def weights_provenance(self) -> dict[str, Any]:
        """Backbone weights the folds started from (file, sha256), as ``bundle.json`` records."""
        return dict(self.info.get("weights_provenance") or {})

    @property
    def weights_sha256(self) -> dict[str, str]:
        """``fold_k`` -> sha256 of its ``model.safetensors``, as ``bundle.json`` records."""
        return dict(self.info.get("weights") or {})

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


def _parse_splits(info: dict[str, Any]) -> dict[int, dict[str, list[str]]]:
    """Accept ``folds`` as a list (index = fold, or items with ``fold``) or a mapping."""
    folds = info.get("folds")
    out: dict[int, dict[str, list[str]]] = {}
    items: list[tuple[int, Any]] = []
    if isinstance(folds, list):
        items = [
            (int(it.get("fold", i)) if isinstance(it, dict) else i, it)
            for i, it in enumerate(folds)
        ]
    elif isinstance(folds, dict):
        items = [
            (int(m.group(1)), it)
            for key, it in folds.items()
            if (m := re.search(r"(\d+)$", str(key)))
        ]
    for k, item in items:
        if isinstance(item, dict):
            out[k] = {"train": list(item.get("train", [])), "val": list(item.get("val", []))}
    return out


def read_info(root: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``bundle.json`` of ``root`` ({} when absent); ``InputDataError`` if not JSON."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputDataError(f"{path}: not valid JSON ({e})") from e


def open_bundle(path: str | os.PathLike) -> ModelBundle:
    """Read a bundle's config, fold list and splits (weights are loaded on demand).

    Raises
    ------
    InputDataError: the folder is missing or holds no ``config.json`` / no fold weights.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputDataError(f"{root}: model bundle folder not found")
    if not (root / CONFIG_FILE).exists():  # a folder of that name: RunConfig.load says so
        raise InputDataError(f"{root}: not a model bundle (no {CONFIG_FILE})")
    config = RunConfig.load(root / CONFIG_FILE)
    info = read_info(root)
    folds = [k for k, d in fold_dirs(root).items() if (d / WEIGHTS_FILE).is_file()]
    if not folds:
        raise InputDataError(f"{root}: model bundle has no fold_*/{WEIGHTS_FILE}")
    return ModelBundle(root=root, config=config, info=info, folds=folds, splits=_parse_splits(info))


def read_oof(bundle: ModelBundle | str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """Per fold, the out-of-fold rows ``{case_id, label, p_pd, fold}``.

    ``bundle`` may be an unfinished run folder: folds without ``oof.csv`` are skipped.
    ``InputDataError`` naming the file for a missing column or a bad value.
    """
    root = bundle.root if isinstance(bundle, ModelBundle) else Path(bundle)
    out: dict[int, list[dict[str, Any]]] = {}
    for k, d in fold_dirs(root).items():
        path = d / OOF_FILE
        if not path.is_file():
            continue
        rows = read_csv(path, required=OOF_COLUMNS[:3])
        try:
            out[k] = [
                {
                    "case_id": r["case_id"],
                    "label": int(r["label"]),
                    "p_pd": float(r["p_pd"]),
                    "fold": int(r.get("fold") or k),
                }
                for r in rows
            ]
        except ValueError as e:
            raise InputDataError(f"{path}: bad label or probability ({e})") from e
    return out


# ----------------------------------------------------------------------------- writing
@contextlib.contextmanager
def bundle_lock(root: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``root/.bundle.lock`` (``fcntl.flock``).

    Parallel ``mrn train --fold k`` processes on one bundle read, modify and rewrite
    ``bundle.json``; the lock makes each read-modify-write atomic with respect to the others
    (the write itself stays an atomic replace). Where ``fcntl`` is missing (Windows) there is
    no lock: folds then have to be trained in one process or one after another.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(root / LOCK_FILE, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x))


def create_bundle(root: str | os.PathLike, cfg: RunConfig, info: dict[str, Any]) -> Path:
    """Create ``root/config.json`` + ``root/bundle.json``, or check an existing bundle matches.

    An existing bundle must have the same folds and configuration (another fold of the same
    run, started in parallel or resumed); otherwise ``ConfigError``. Runs under
    :func:`bundle_lock`.
    """
    root = Path(root)
    with bundle_lock(root):
        if (root / INFO_FILE).is_file():
            old = read_info(root)
            cfg_path = root / CONFIG_FILE
            old_cfg = RunConfig.load(cfg_path).to_dict() if cfg_path.is_file() else None
            if old.get("folds") != _json(info.get("folds")) or _json(old_cfg) != _json(
                cfg.to_dict()
            ):
                raise ConfigError(
                    f"{root}: already holds a bundle with other folds or another configuration; "
                    "use a new --out folder"
                )
            return root
        cfg.save(root / CONFIG_FILE)
        atomic_write_text(root / INFO_FILE, json.dumps(info, indent=2))
    return root


def update_bundle_weights(root: str | os.PathLike) -> dict[str, Any]:
    """Record the sha256 of every fold's ``model.safetensors`` in ``bundle.json`` (under the lock)."""
    root = Path(root)
    with bundle_lock(root):
        info = read_info(root)
        info["weights"] = {
            d.name: file_sha256(d / WEIGHTS_FILE)
            for d in fold_dirs(root).values()
            if (d / WEIGHTS_FILE).is_file()
        }
        atomic_write_text(root / INFO_FILE, json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- demo bundle record
def demo_record_path() -> Path:
    """``$MRN_CACHE_DIR/last_demo_bundle.json`` (default ``~/.cache/mrn/last_demo_bundle.json``)."""
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
    return path if (path / CONFIG_FILE).is_file() else None
