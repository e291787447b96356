"""Default CPU threads: the cores not already busy, one left free, unless the user chose."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from mrn_engine import threads


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [
        (2, 0.0, 1),  # idle: one core stays free for a neighbour that starts later
        (2, 0.3, 1),
        (2, 1.0, 1),
        (2, 1.6, 1),
        (2, 7.0, 1),
        (16, 0.0, 15),
        (16, 3.2, 13),
        (1, 0.0, 1),
    ],
)
def test_default_threads_leave_the_busy_cores(cores, load, expected):
    assert threads.default_threads(cores, load) == expected


def test_user_setting_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.apply_default_threads() is None
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_default_is_applied_to_env_and_torch(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.2)  # another job on one core
    try:
        assert threads.apply_default_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_every_mrn_command_gets_the_default(monkeypatch):
    from mrn_engine.cli import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
    import torch

    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli, ["cases", "--help"])
        assert result.exit_code == 0
        # --help exits before the group runs; a real subcommand run applies the default
        result = CliRunner().invoke(cli, ["cases", "/nonexistent/folder"])
        assert os.environ["OMP_NUM_THREADS"] == "3"  # 4 idle cores, one left free
    finally:
        torch.set_num_threads(before)


def test_set_threads_sets_torch_only_when_given():
    import torch

    from mrn_engine.threads import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(None)
        assert torch.get_num_threads() == before
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
