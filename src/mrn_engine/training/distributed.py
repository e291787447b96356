"""Distributed data-parallel training under ``torchrun`` (PyTorch DDP; docs/training.md).

``torchrun --nproc_per_node N [--nnodes M ...] -m mrn_engine.cli train ...`` starts one process
per device with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment. :func:`session`
turns that into a process group (NCCL for CUDA, gloo for CPU) and tears it down again; every
other helper here asks ``torch.distributed`` whether a group exists, so without torchrun
(or with one process) nothing changes: world size 1, rank 0, no collectives.

The rules the trainer follows with more than one rank:

* the **global** batch is ``train.batch_size``: each global batch of the single-process order
  is cut into ``world_size`` contiguous pieces (:class:`RankBatchSampler`), so
  ``batch_size % world_size == 0``;
* BatchNorm layers use the statistics of the global batch (:func:`synced_batch_norms`, works on
  gloo and NCCL), so a step equals the single-process step up to float rounding;
* only rank 0 writes files (:func:`is_main`) and shows progress; all ranks read the same
  checkpoint on resume.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from mrn_engine.errors import ConfigError
from mrn_engine.runtime import resolve_device

#: how long a rank waits for the others in a collective (rank 0 validating, checkpointing)
TIMEOUT = timedelta(minutes=30)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from e


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment ((0, 1, 0) without it)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"torchrun environment: RANK={rank}, WORLD_SIZE={world} do not fit")
    return rank, world, local


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0, the only rank that writes files and prints progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(name: str | torch.device = "auto") -> torch.device:
    """:func:`resolve_device`, pinned to ``cuda:LOCAL_RANK`` for CUDA under torchrun."""
    device = resolve_device(name)
    if device.type not in ("cuda", "cpu") and launch_env()[1] > 1:
        raise ConfigError(f"device {device}: distributed training runs on CUDA or CPU only")
    if device.type != "cuda" or launch_env()[1] == 1:
        return device
    if device.index is not None:
        raise ConfigError(
            f"device {device}: under torchrun every rank takes cuda:LOCAL_RANK; pass --device cuda"
            " (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    local = launch_env()[2]
    if local >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} CUDA device(s); "
            "lower torchrun --nproc_per_node"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def check_launch() -> None:
    """``ConfigError`` when torchrun started several ranks but no process group exists."""
    world = launch_env()[1]
    if world > 1 and not is_distributed():
        raise ConfigError(
            f"started by torchrun with WORLD_SIZE={world} but without a process group: only "
            "`mrn train` runs distributed (mrn compare / demo run in one process)"
        )


@contextmanager
def session(device: str | torch.device = "auto") -> Iterator[torch.device]:
    """Join torchrun's process group for the block (NCCL on CUDA, gloo on CPU); yield the device.

    Without torchrun (``WORLD_SIZE`` unset or 1) no group is made and this only resolves the
    device. A group made here is destroyed on exit, also after an error.
    """
    rank_, world, _ = launch_env()
    dev = local_device(device)
    if world == 1 or is_distributed():
        yield dev
        return
    dist.init_process_group(backend_for(dev), rank=rank_, world_size=world, timeout=TIMEOUT)
    try:
        yield dev
    finally:
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all ranks (a new tensor; ``values`` itself without a group)."""
    if not is_distributed():
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s buffers from rank ``src`` to every rank (in place)."""
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)


def wrap(objective: nn.Module, device: torch.device) -> nn.Module:
    """The objective in ``DistributedDataParallel`` when distributed, else the objective.

    ``find_unused_parameters``: the pretraining stage leaves the classification head without a
    gradient (it is not in the loss); DDP then leaves its ``.grad`` None on every rank, as a
    single process does, so AdamW skips it.
    """
    if not is_distributed():
        return objective
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=True)


class RankBatchSampler(Sampler[list[int]]):
    """This rank's piece of every global batch of ``order`` (the last, short one dropped).

    Global batch ``[i_0 .. i_{B-1}]`` gives rank ``r`` of ``W`` the contiguous indices
    ``[i_{r*B/W} .. i_{(r+1)*B/W - 1}]``; the ranks' pieces, concatenated in rank order, are
    the single-process batch (which is what the all-gathered mSupMoCo keys rely on).
    """

    def __init__(self, order: Sampler[int], batch_size: int, rank_: int, world: int) -> None:
        if batch_size % world:
            raise ConfigError(
                f"train.batch_size={batch_size} is the global batch and must divide by the "
                f"{world} ranks (use --batch-size {max(world, batch_size // world * world)})"
            )
        self.order, self.batch_size = order, batch_size
        self.per_rank = batch_size // world
        self.rank = rank_

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        lo = self.rank * self.per_rank
        for index in self.order:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                yield batch[lo : lo + self.per_rank]
                batch = []

    def __len__(self) -> int:
        assert isinstance(self.order, Sized)
        return len(self.order) // self.batch_size


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient is the all-reduced gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class _GlobalBatchNorm:
    """Mixin: BatchNorm whose training statistics are those of the global batch (all ranks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        if not (bn.training and is_distributed()):
            return super().forward(x)  # type: ignore[misc]
        dims = [0, *range(2, x.dim())]
        xd = x.double()
        count = xd.new_tensor([x.numel() / x.shape[1]])
        stats = _AllReduceSum.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:
            y = y * bn.weight.double().view(shape) + bn.bias.double().view(shape)
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(bn.num_batches_tracked)
                    if bn.momentum is None
                    else float(bn.momentum)
                )
                unbiased = var * n / (n - 1).clamp(min=1)
                bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
                bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
        return y.to(x.dtype)


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with global-batch statistics under DDP."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with global-batch statistics under DDP."""


class GlobalBatchNorm3d(_GlobalBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with global-batch statistics under DDP."""


_GLOBAL = {
    nn.BatchNorm1d: GlobalBatchNorm1d,
    nn.BatchNorm2d: GlobalBatchNorm2d,
    nn.BatchNorm3d: GlobalBatchNorm3d,
}


@contextmanager
def synced_batch_norms(module: nn.Module) -> Iterator[int]:
    """Give ``module``'s BatchNorm layers global-batch statistics for the block; yields how many.

    The layers keep their parameters, buffers and ``isinstance`` type (only their class is
    swapped for a subclass, and swapped back on exit), so state dicts and the head's
    precise-BN code are unaffected. Outside a process group nothing is swapped.
    PyTorch's ``SyncBatchNorm`` is not used: it runs on GPUs only, and replaces the modules.
    """
    swapped = [m for m in module.modules() if type(m) in _GLOBAL] if is_distributed() else []
    for m in swapped:
        m.__class__ = _GLOBAL[type(m)]
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            m.__class__ = next(b for b, g in _GLOBAL.items() if type(m) is g)
