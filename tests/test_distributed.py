"""Distributed training (DDP, gloo on CPU): 2 ranks train what 1 process trains.

The equality test trains a cpu-tiny MRN with mSupMoCo and the head's BatchNorm (28 px, two
slices per ROI, 8 training cases, global batch 4: 2 steps per epoch, one pretraining and one
full-loss epoch) once in this process and once in 2 spawned ranks with global batch 4 (2 per
rank), the second epoch resumed from rank 0's checkpoint. Dropout and drop-path are off (their
masks are drawn per rank); augmentation stays on (it is seeded per case).

Tolerance: the ranks agree bitwise; every tensor of the objective (student, projection head,
EMA teacher, memory banks, BatchNorm statistics) is within ``ATOL`` = 5e-5 of the
single-process run (AdamW steps are 3e-4 / 1e-3 here), and the logits within 1e-4. Excluded:
the attention *key* biases (the middle third of each ``attn.qkv.bias``). Softmax ignores a
shift of the keys, so their exact gradient is 0 and they never change the output; AdamW divides
that gradient's float rounding noise (~1e-10, which depends on the summation order) by its own
size and moves them by up to the learning rate (measured: up to 1.3e-4 apart).

Without the keys' all-gather or the global-batch BatchNorm the head norm's weight ends 4e-3
away (both checked by breaking them). Takes 60-80 s on 2 shared cores at load ~9 (each
spawned rank imports torch and MONAI); marked slow.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mrn_engine.config import get_preset
from mrn_engine.data.labels import ROI_BY_NAME
from mrn_engine.errors import ConfigError
from mrn_engine.runtime import seed_everything
from mrn_engine.training import distributed
from mrn_engine.training.augment import RoiAugmenter
from mrn_engine.training.checkpoint import load_state_dict
from mrn_engine.training.dataset import RoiStackDataset, make_loader
from mrn_engine.training.objective import MRNObjective
from mrn_engine.training.trainer import epoch_seed, train_fold

ATOL = 5e-5
LOGITS_ATOL = 1e-4
SLICES = {"nm_sn": 2, "qsm_bg": 2, "qsm_midbrain": 2, "qsm_dentate": 2}
N_TRAIN, N_VAL = 8, 4


def tiny_cfg():
    return get_preset("cpu-tiny").replace(
        roi={"image_size": 28, "slices": dict(SLICES)},
        model={"dropout": 0.0, "drop_path": 0.0},
        train={
            "pretrain_epochs": 1,
            "epochs": 1,
            "batch_size": 4,
            "device": "cpu",
            "lr_backbone": 3e-4,  # the tolerances below were measured at these rates
            "lr_head": 1e-3,
        },
    )


def _cases(cfg) -> tuple[dict, dict[str, int]]:
    g = torch.Generator().manual_seed(7)
    s = cfg.roi.image_size
    data = {}
    for i in range(N_TRAIN + N_VAL):
        data[f"C{i:02d}"] = {
            n: {
                "image": (torch.rand(k, s, s, generator=g) * 255).numpy(),
                "mask": torch.randint(0, ROI_BY_NAME[n].num_classes, (k, s, s), generator=g)
                .long()
                .numpy(),
            }
            for n, k in cfg.roi.slices.items()
        }
    labels = {c: i % 2 for i, c in enumerate(sorted(data))}
    return data, labels


def train_tiny(out: Path, **kw) -> MRNObjective:
    """Train (or resume) the tiny fold 0 into ``out``; returns the objective."""
    cfg = tiny_cfg()
    data, labels = _cases(cfg)
    ids = sorted(data)
    seed_everything(epoch_seed(cfg.train.seed, 0, 0))
    objective = MRNObjective(cfg, pretrained=False)
    aug = RoiAugmenter(epoch_seed(cfg.train.seed, 0, 0))
    train_ds = RoiStackDataset(ids[:N_TRAIN], labels, data.__getitem__, aug)
    val_ds = RoiStackDataset(ids[N_TRAIN:], labels, data.__getitem__)
    train_fold(objective, train_ds, val_ds, cfg, out, progress=False, **kw)
    return objective


def _rank_main(rank: int, world: int, port: int, tmp: str) -> None:
    """One spawned rank: epoch 1 (rank 1 given another folder), then resume epoch 2."""
    import os

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    root = Path(tmp)
    with distributed.session("cpu"):
        assert distributed.world_size() == world and distributed.rank() == rank
        # rank 0's files go to ddp/; rank 1 gets spy/, which must stay unwritten
        train_tiny(root / ("ddp" if rank == 0 else "spy"), stop_after=1)
        distributed.barrier()
        objective = train_tiny(root / "ddp", resume=True)  # all ranks read rank 0's checkpoint
        torch.save(objective.state_dict(), root / f"state_rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_error(key: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, attention key biases left out (module docstring)."""
    diff = (got.double() - ref.double()).abs()
    if key.endswith("attn.qkv.bias"):
        d = diff.shape[0] // 3
        diff[d : 2 * d] = 0
    return float(diff.max()) if diff.numel() else 0.0


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_two_ranks_train_what_one_process_trains(tmp_path):
    procs = mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    single = train_tiny(tmp_path / "single")  # while the ranks start
    while not procs.join():
        pass
    reference = single.state_dict()
    ranks = [torch.load(tmp_path / f"state_rank{r}.pt") for r in (0, 1)]
    assert set(ranks[0]) == set(reference)
    for key, ref in reference.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key}: ranks disagree"
        if ref.is_floating_point():
            err = max_error(key, ranks[0][key], ref)
            assert err <= ATOL, f"{key}: 2 ranks differ from 1 process by {err:.2e}"
        else:
            assert torch.equal(ranks[0][key], ref), key
    # the same function: logits of the out-of-fold cases
    ddp = MRNObjective(tiny_cfg(), pretrained=False)
    ddp.load_state_dict(ranks[0])
    data, labels = _cases(tiny_cfg())
    val = RoiStackDataset(sorted(data)[N_TRAIN:], labels, data.__getitem__)
    batch = next(iter(make_loader(val, N_VAL, shuffle=False)))
    with torch.no_grad():
        logits = [o.eval().predict_logits(batch) for o in (ddp, single)]
    assert torch.allclose(logits[0], logits[1], atol=LOGITS_ATOL), logits
    # the banks were filled (the comparison above is not of empty queues)
    assert int(reference["wrapper.bank.count"].sum()) == 2 * N_TRAIN
    # only rank 0 wrote: its bundle files exist, rank 1's folder was never created
    fold = tmp_path / "ddp"
    assert (fold / "model.safetensors").is_file() and (fold / "checkpoints" / "last.json").is_file()
    assert not (tmp_path / "spy").exists()
    saved = load_state_dict(fold / "model.safetensors")
    for key, value in saved.items():
        assert max_error(key, value, reference[f"wrapper.model.{key}"]) <= ATOL, key
    # metrics.csv: losses summed over both ranks = the single process's epoch losses
    lines = [(fold / "metrics.csv").read_text(), (tmp_path / "single/metrics.csv").read_text()]
    rows = [[r.split(",") for r in t.splitlines()] for t in lines]
    col = rows[0][0].index("loss")
    for a, b in zip(rows[0][1:], rows[1][1:], strict=True):
        assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-4)


class _Ids(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_rank_pieces_concatenate_to_the_single_process_batches():
    ds = _Ids(11)
    for epoch in (1, 2):
        one = [
            b.tolist()
            for b in make_loader(ds, 4, shuffle=True, seed=3, epoch=epoch, drop_last=True)
        ]
        pieces = [
            [
                b.tolist()
                for b in make_loader(ds, 4, shuffle=True, seed=3, epoch=epoch, rank=r, world_size=2)
            ]
            for r in (0, 1)
        ]
        assert [a + b for a, b in zip(*pieces, strict=True)] == one
        assert len(one) == 2  # 11 cases: the short third batch is dropped on every rank


def test_global_batch_must_divide_by_the_ranks():
    with pytest.raises(ConfigError, match="must divide by the 3 ranks"):
        make_loader(_Ids(8), 4, shuffle=True, rank=0, world_size=3)


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.session("cpu") as device:
        assert device == torch.device("cpu")
        assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
        assert not torch.distributed.is_initialized()
        norm = torch.nn.BatchNorm1d(3)
        with distributed.synced_batch_norms(norm) as n:
            assert n == 0 and type(norm) is torch.nn.BatchNorm1d  # untouched in one process
    distributed.check_launch()  # no torchrun: fine


def test_torchrun_environment_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        distributed.check_launch()
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ConfigError, match="RANK='two'"):
        distributed.launch_env()
