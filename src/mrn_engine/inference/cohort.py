"""Cohort streaming for ``mrn predict``: shards, and a DataLoader that reads and crops ahead.

:class:`CaseStream` is a torch ``Dataset`` whose item is one case read from disk and cropped
(everything before the model, :func:`mrn_engine.inference.prepare.prepare_case`); with
``workers > 0`` DataLoader worker processes do that while the main process runs the model on
the previous case. Cases that need nnU-Net masks are only read in the worker; the segmenter
runs in the main process (it may hold the GPU). The predictions are those of
``MRNPredictor.predict_case`` on the same case: the same functions build the same inputs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mrn_engine.config import RoiConfig
from mrn_engine.data import CaseFiles, load_case
from mrn_engine.data.nifti import Volume
from mrn_engine.errors import ConfigError, MRNError
from mrn_engine.inference.mask_source import MaskSource
from mrn_engine.inference.prepare import PreparedCase, prepare_case
from mrn_engine.inference.timing import timed
from mrn_engine.threads import available_cores, default_threads

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
#: most loader workers chosen by default (reading is I/O and zlib bound)
MAX_DEFAULT_WORKERS = 4


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (1-based) of ``count`` slices of a cohort."""

    index: int = 1
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, case_ids: Sequence[str]) -> list[str]:
        """This shard's case ids: every ``count``-th of the sorted ids, from the ``index``-th."""
        return sorted(case_ids)[self.index - 1 :: self.count]


def parse_shard(value: str | None) -> Shard:
    """``"i/n"`` (1 <= i <= n) -> :class:`Shard`; None or ``""`` = the whole cohort (1/1)."""
    if value is None or not str(value).strip():
        return Shard()
    m = _SHARD.match(str(value))
    if not m:
        raise ConfigError(
            f"--shard {value!r}: give I/N, this machine's shard I of N (e.g. 1/4 ... 4/4)"
        )
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(
            f"--shard {value!r}: I must be between 1 and N (N >= 1), e.g. 1/{max(n, 2)}"
        )
    return Shard(i, n)


def default_workers(cores: int | None = None, free: int | None = None) -> int:
    """Loader workers for this machine: 0 on 1-2 cores, else half the free cores (1 to 4).

    On two shared cores a worker competes with the model for the same core and loses more to
    inter-process copies than it gains (measured: docs/inference.md, "Cohort-scale prediction").
    """
    cores = available_cores() if cores is None else cores
    if cores <= 2:
        return 0
    free = default_threads() if free is None else free
    return max(1, min(MAX_DEFAULT_WORKERS, free // 2))


@dataclass
class LoadedCase:
    """One item of :class:`CaseStream`: a read (and, when possible, prepared) case or an error.

    ``prepared`` is None when the case needs the segmenter (the caller prepares it) or failed.
    """

    files: CaseFiles
    case: Any = None
    prepared: PreparedCase | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def case_error(case_id: str, e: BaseException) -> str:
    """The message of a per-case failure, starting with the case id."""
    msg = str(e) if isinstance(e, MRNError) else f"{type(e).__name__}: {e}"
    return msg if msg.startswith(case_id) else f"{case_id}: {msg}"


#: errors that make one case fail without stopping the others
CASE_ERRORS = (MRNError, OSError, ValueError)


class CaseStream(Dataset):
    """Reads case ``i`` and crops its ROIs (a ``Dataset`` for worker processes).

    Parameters
    ----------
    files: the cases, in prediction order.
    roi: the bundle's ROI settings.
    ignore_masks: never crop with the case's own mask files.
    needs_masks: the model also takes merged-class masks (SERes10).
    labels: case id -> label (kept on the case).

    The optional T1 is not read: nothing in prediction uses it.
    """

    def __init__(
        self,
        files: Sequence[CaseFiles],
        roi: RoiConfig,
        *,
        ignore_masks: bool = False,
        needs_masks: bool = False,
        labels: Mapping[str, int] | None = None,
    ) -> None:
        self.files = list(files)
        self.roi = roi
        self.ignore_masks = ignore_masks
        self.needs_masks = needs_masks
        self.labels = dict(labels or {})

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> LoadedCase:
        cf = self.files[i]
        timings: dict[str, float] = {}
        try:
            with timed(timings, "read"):
                case = load_case(cf, label=self.labels.get(cf.case_id), with_t1=False)
            own = not self.ignore_masks and case.nm_mask is not None and case.qsm_mask is not None
            prepared = None
            if own:  # no segmenter needed: crop here (in the worker)
                prepared = prepare_case(
                    case,
                    self.roi,
                    MaskSource(ignore_masks=self.ignore_masks),
                    needs_masks=self.needs_masks,
                )
                prepared.timings = {**timings, **prepared.timings}
        except CASE_ERRORS as e:
            return LoadedCase(cf, error=case_error(cf.case_id, e), timings=timings)
        return LoadedCase(cf, case, prepared, timings=timings)


def _first(batch: Any) -> Any:
    """``collate_fn`` for ``batch_size=None``: the item unchanged (no tensor conversion)."""
    return batch


#: Linux ``prctl`` option: signal this process when its parent dies
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this worker when ``parent`` dies, even by SIGKILL.

    Else an orphaned worker can block for ever writing a case into the pipe nobody reads.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _worker_init(parent: int, _: int) -> None:
    """Worker init: one torch thread (the model keeps the main process's), die with the parent."""
    torch.set_num_threads(1)
    _die_with_parent(parent)


# The arrays of a case cross from a worker as torch tensors: DataLoader moves those through
# shared memory instead of pickling ~100 MB per case through a pipe. Docker's default
# /dev/shm is 64 MB, too small for a few cases in flight: there the arrays are pickled.
#: /dev/shm free space below which volumes are pickled instead of shared
MIN_SHARED_MEMORY = 2 << 30


def shared_memory_ok(path: str = "/dev/shm") -> bool:
    """Whether ``path`` (POSIX shared memory) has room for several cases in flight."""
    try:
        return shutil.disk_usage(path).free >= MIN_SHARED_MEMORY
    except OSError:
        return False


def _volume_out(v: Volume | None) -> Any:
    if v is None or not (v.array.flags.writeable and v.array.dtype.isnative):
        return v  # torch takes neither read-only nor byte-swapped arrays: pickle those
    try:
        return dataclasses.replace(v, array=torch.from_numpy(v.array))
    except TypeError:  # a dtype torch lacks
        return v


def _volume_in(v: Any) -> Volume | None:
    if v is None or not isinstance(v.array, torch.Tensor):
        return v
    return dataclasses.replace(v, array=v.array.numpy())


_VOLUMES = ("nm", "qsm", "t1", "nm_mask", "qsm_mask")


def _case_out(case: Any) -> Any:
    return dataclasses.replace(case, **{k: _volume_out(getattr(case, k)) for k in _VOLUMES})


def _case_in(case: Any) -> Any:
    return dataclasses.replace(case, **{k: _volume_in(getattr(case, k)) for k in _VOLUMES})


class _SharedMemoryStream(Dataset):
    """:class:`CaseStream` whose items carry their volumes as tensors (worker side)."""

    def __init__(self, inner: CaseStream) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> LoadedCase:
        item = self.inner[i]
        if item.case is not None:
            item.case = _case_out(item.case)
            if item.prepared is not None:
                item.prepared.case = item.case
        return item


def _restore(item: LoadedCase) -> LoadedCase:
    if item.case is not None:
        item.case = _case_in(item.case)
        if item.prepared is not None:
            item.prepared.case = item.case
    return item


def stream_cases(stream: CaseStream, workers: int = 0) -> Iterator[LoadedCase]:
    """The items of ``stream`` in order; ``workers > 0`` = read ahead in worker processes."""
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be 0 (read in this process) or more")
    if workers == 0 or len(stream) == 0:
        yield from (stream[i] for i in range(len(stream)))
        return
    loader = DataLoader(
        _SharedMemoryStream(stream) if shared_memory_ok() else stream,
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(stream)),
        collate_fn=_first,
        worker_init_fn=functools.partial(_worker_init, os.getpid()),
        prefetch_factor=2,
    )
    for item in loader:
        yield _restore(item)


def _predict_item(predictor: Any, item: LoadedCase, nuclei: bool) -> tuple[Any, str | None]:
    """``(prediction, None)`` or ``(None, error)`` for one streamed case."""
    if item.error is not None:
        return None, item.error
    try:
        prepared = item.prepared
        if prepared is None:  # needs the segmenter: prepared here, in the main process
            prepared = predictor.prepare(item.case)
            prepared.timings = {**item.timings, **prepared.timings}
        return predictor.predict_prepared(prepared, nuclei=nuclei), None
    except CASE_ERRORS as e:
        return None, case_error(item.files.case_id, e)


def stream_predictions(
    predictor: Any,
    files: list[CaseFiles],
    *,
    labels: dict[str, int] | None = None,
    workers: int = 0,
    nuclei: bool = True,
    on_case: Callable[[str, int, int], None] | None = None,
    bar: Any = None,
) -> Iterator[tuple[LoadedCase, Any, str | None]]:
    """``(item, prediction, None)`` or ``(item, None, error)`` per case, in ``files`` order.

    ``predictor``: an ``MRNPredictor`` (``prepare`` / ``predict_prepared``). Reading and ROI
    cropping run ``workers`` cases ahead in DataLoader workers (0 = in this process).
    ``pred.timings`` gets ``wait``: how long the model loop waited for the case (workers > 0).
    """
    stream = CaseStream(
        files,
        predictor.config.roi,
        ignore_masks=bool(getattr(predictor.masks, "ignore_masks", False)),
        needs_masks=bool(getattr(predictor.model, "needs_masks", False)),
        labels=labels,
    )
    items = stream_cases(stream, workers)
    for i in range(len(files)):
        waited: dict[str, float] = {}
        with timed(waited, "wait"):
            item = next(items)
        cid = item.files.case_id
        if on_case:
            on_case(cid, i, len(files))
        if bar is not None:
            bar.set_postfix_str(cid)
        pred, error = _predict_item(predictor, item, nuclei)
        if error is not None and bar is not None:
            bar.write(f"skipped {error}")
        if pred is not None and workers > 0:
            pred.timings["wait"] = waited["wait"]
        yield item, pred, error
