"""On-disk cache of preprocessed ROI crops (``.npz``, no pickles), keyed by case inputs + config.

The key of a case is a hash of its input files (path, size, mtime) and of the ``RoiConfig``
(JSON), so changing a file or a preprocessing setting recomputes. Fields added after the first
release (``slice_policy``) enter the hash only when they differ from their default, so caches
written before them stay valid. Files are written atomically; an unreadable cache file is
recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mrn_engine.config import RoiConfig, RunConfig, cache_dir
from mrn_engine.data.cases import Case, CaseFiles, load_case
from mrn_engine.errors import MRNWarning
from mrn_engine.fileio import make_temp_file
from mrn_engine.rois.boxes import CropBox
from mrn_engine.rois.extract import RoiCrop, extract_rois

#: bump when the stored layout or the extraction changes
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$MRN_CACHE_DIR/rois`` or ``~/.cache/mrn/rois``."""
    return cache_dir() / "rois"


#: ``RoiConfig`` fields added later -> the value that leaves the hash unchanged (their default,
#: i.e. the behaviour before the field existed)
_HASH_OMIT_IF = {"slice_policy": "pad"}


def config_hash(cfg: RoiConfig | RunConfig) -> str:
    """Short hash of the preprocessing settings (and the cache version)."""
    rc = cfg.roi if isinstance(cfg, RunConfig) else cfg
    roi = {k: v for k, v in asdict(rc).items() if _HASH_OMIT_IF.get(k, object()) != v}
    text = json.dumps({"v": CACHE_VERSION, "roi": roi}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def inputs_hash(files: CaseFiles) -> str:
    """Short hash of the case's input files (resolved path, size, mtime)."""
    parts = []
    for stem, path in sorted(files.input_paths().items()):
        if stem == "T1":
            continue  # not used by the ROIs
        st = path.stat()
        parts.append(f"{stem}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def crops_to_arrays(crops: dict[str, RoiCrop]) -> dict[str, np.ndarray]:
    """Flatten crops into plain arrays + one JSON string (for ``np.savez``)."""
    arrays: dict[str, np.ndarray] = {}
    meta = {}
    for name, c in crops.items():
        arrays[f"{name}.image"] = c.image
        arrays[f"{name}.slice_index"] = c.slice_index
        if c.mask is not None:
            arrays[f"{name}.mask"] = c.mask.astype(np.uint8)
        meta[name] = {
            "box": c.box.to_dict(),
            "resized_hw": list(c.resized_hw),
            "pad": list(c.pad),
            "scale": c.scale,
            "midline_x": c.midline_x,
            "window": list(c.window),
            "spacing": list(c.spacing),
            "volume_shape": list(c.volume_shape),
            "case_id": c.case_id,
            "has_mask": c.mask is not None,
            "slice_policy": c.slice_policy,
            "pad_value": c.pad_value,
        }
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def crops_from_arrays(data) -> dict[str, RoiCrop]:
    """Inverse of :func:`crops_to_arrays`."""
    meta = json.loads(str(data["meta"]))
    out = {}
    for name, m in meta.items():
        out[name] = RoiCrop(
            name=name,
            image=np.asarray(data[f"{name}.image"], dtype=np.float32),
            mask=np.asarray(data[f"{name}.mask"], dtype=np.int64) if m["has_mask"] else None,
            box=CropBox(**m["box"]),
            slice_index=np.asarray(data[f"{name}.slice_index"], dtype=np.int64),
            resized_hw=tuple(m["resized_hw"]),
            pad=tuple(m["pad"]),
            scale=float(m["scale"]),
            midline_x=float(m["midline_x"]),
            window=tuple(m["window"]),
            spacing=tuple(m["spacing"]),
            volume_shape=tuple(m["volume_shape"]),
            case_id=m["case_id"],
            slice_policy=m.get("slice_policy", "pad"),  # absent in files written before it
            pad_value=float(m.get("pad_value", 0.0)),
        )
    return out


class RoiCache:
    """Preprocessed ROI crops on disk: ``root/<case_id>_<inputs hash>_<config hash>.npz``.

    Parameters
    ----------
    root : path-like, optional
        Cache folder (default :func:`default_cache_dir`).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path_for(self, files: CaseFiles, cfg: RoiConfig | RunConfig) -> Path:
        """Cache file of a case under a config."""
        return self.root / f"{files.case_id}_{inputs_hash(files)}_{config_hash(cfg)}.npz"

    def get_or_compute(
        self,
        case_files: CaseFiles | str | os.PathLike,
        cfg: RoiConfig | RunConfig,
        *,
        case: Case | None = None,
    ) -> dict[str, RoiCrop]:
        """Crops of a case from the cache, computing and storing them on a miss.

        Uses the case's own masks (ground truth); a corrupt cache file is recomputed with
        an :class:`MRNWarning`. ``case``: these files already loaded (a miss then crops it
        instead of reading the files again).
        """
        files = (
            case_files if isinstance(case_files, CaseFiles) else CaseFiles.from_folder(case_files)
        )
        path = self.path_for(files, cfg)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    crops = crops_from_arrays(data)
                self.hits += 1
                return crops
            except (
                OSError,
                ValueError,
                KeyError,
                EOFError,
                zipfile.BadZipFile,
                json.JSONDecodeError,
                TypeError,
            ) as e:
                warnings.warn(
                    f"{path}: corrupt ROI cache file ({type(e).__name__}: {e}); recomputing",
                    MRNWarning,
                    stacklevel=2,
                )
        self.misses += 1
        if case is None:
            case = load_case(files, with_t1=False)
        crops = extract_rois(case, cfg)
        self._write(path, crops)
        return crops

    def _write(self, path: Path, crops: dict[str, RoiCrop]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez_compressed(tmp, **crops_to_arrays(crops))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> int:
        """Delete all cache files; returns how many."""
        n = 0
        if self.root.is_dir():
            for p in self.root.glob("*.npz"):
                p.unlink()
                n += 1
        return n
