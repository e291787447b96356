"""``mrn doctor``: each check finds its problem and gives a fix; the CLI's exit code and JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner

from mrn_engine import doctor
from mrn_engine.cli import cli
from mrn_engine.doctor import (
    NO_DISPLAY_REASON,
    check_folder,
    check_nnunet_env,
    display_status,
    format_report,
    qt_starts,
    run_doctor,
    thread_settings,
    x_server_answers,
)

Usage = namedtuple("Usage", "total used free")
HAS_QT = importlib.util.find_spec("qtpy") is not None


@pytest.fixture
def no_display(monkeypatch):
    """Linux without DISPLAY, Wayland or a Qt platform override."""
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(doctor.sys, "platform", "linux")


# --------------------------------------------------------------------------- display


def test_missing_display_without_xvfb_names_the_install(no_display, monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    c = display_status()
    assert c.status == "warn"
    assert "DISPLAY is not set" in c.detail and "Xvfb is not installed" in c.detail
    assert "install.sh" in c.fix and "DISPLAY" in c.fix
    assert NO_DISPLAY_REASON.startswith("no display")


def test_missing_display_with_xvfb_says_xvfb_run(no_display, monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: "/usr/bin/Xvfb")
    c = display_status()
    assert c.status == "warn" and "xvfb-run -a napari" in c.fix


def test_display_set_but_nothing_listening(no_display, monkeypatch):
    monkeypatch.setenv("DISPLAY", ":987")  # no X server has that number here
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    c = display_status()
    assert c.status == "warn" and "no X server answers" in c.detail


def test_x_server_answers_over_tcp():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert port > 6000
        assert x_server_answers(f"127.0.0.1:{port - 6000}")
    assert not x_server_answers(f"127.0.0.1:{port - 6000}")
    assert not x_server_answers("garbage")


def test_offscreen_qt_counts_as_a_display(no_display, monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert display_status().status == "ok"


@pytest.mark.skipif(not HAS_QT, reason="qtpy not installed (GUI extra)")
def test_qt_abort_in_the_child_is_reported_not_fatal(monkeypatch):
    for var in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")  # Qt aborts: no display to connect to
    ok, said = qt_starts()
    assert not ok and said  # we are still running, with Qt's own words
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert qt_starts() == (True, "offscreen")


# --------------------------------------------------------------------------- folders


def test_writable_folder_with_space_is_ok(tmp_path):
    c = check_folder(tmp_path / "not" / "yet", "output", min_free_gib=0.0)
    assert c.status == "ok" and "not yet created" in c.detail
    assert not (tmp_path / "not").exists()  # the doctor creates nothing
    assert list(tmp_path.iterdir()) == []  # and leaves no probe file behind


def test_non_writable_cache_fails_with_fix(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(doctor.tempfile, "NamedTemporaryFile", refuse)
    c = check_folder(tmp_path, "cache")
    assert c.status == "fail"
    assert str(tmp_path) in c.detail and "not writable (Permission denied)" in c.detail
    assert "MRN_CACHE_DIR" in c.fix


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_folder_really_fails(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert check_folder(ro / "cache", "cache").status == "fail"
    finally:
        ro.chmod(0o700)


def test_no_free_space_fails_with_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: Usage(10 * 2**30, 10 * 2**30, 2**26))
    c = check_folder(tmp_path, "output")
    assert c.status == "fail"
    assert "only 0.06 GiB free (need about 2 GiB)" in c.detail
    assert "free some space" in c.fix


def test_a_file_where_the_folder_should_be(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    c = check_folder(f / "sub", "output")
    assert c.status == "fail" and "is a file" in c.detail


# --------------------------------------------------------------------------- nnU-Net, threads


def test_nnunet_variables(tmp_path, monkeypatch):
    for var in doctor.NNUNET_ENV:
        monkeypatch.delenv(var, raising=False)
    assert all(c.status == "ok" for c in check_nnunet_env())  # unset is fine, trainer shipped
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "missing"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    by_name = {c.name: c for c in check_nnunet_env()}
    assert by_name["nnUNet_raw"].status == "warn"
    assert by_name["nnUNet_raw"].fix.startswith("mkdir -p")
    assert by_name["nnUNet_results"].status == "ok"


def test_nnunet_trainer_missing_from_install(tmp_path, monkeypatch):
    import mrn_engine.segmentation.env as env

    monkeypatch.setattr(env, "EXT_TRAINER_DIR", tmp_path)
    c = check_nnunet_env()[0]
    assert (
        c.name == "nnU-Net trainer"
        and c.status == "fail"
        and "mrn_trainers.py" in c.detail
        and "reinstall" in c.fix
    )


def test_oversubscribed_threads_warn(monkeypatch):
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        monkeypatch.setattr(doctor, "usable_cores", lambda: 2)
        info, (c,) = thread_settings()
    finally:
        torch.set_num_threads(n)
    assert info["torch_threads"] == 3 and info["usable_cores"] == 2
    assert c.status == "warn" and "OMP_NUM_THREADS=2" in c.fix


def test_busy_machine_warns(monkeypatch):
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(doctor, "usable_cores", lambda: 2)
        monkeypatch.setattr(doctor.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
        _, (c,) = thread_settings()
    finally:
        torch.set_num_threads(n)
    assert c.status == "warn" and "busy" in c.detail and "--threads 1" in c.fix


# --------------------------------------------------------------------------- report and CLI


def test_report_lists_versions_devices_and_fixes(tmp_path, monkeypatch, no_display):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    report = run_doctor(tmp_path, cache=tmp_path, try_qt=False)
    for key in ("python", "torch", "timm", "monai", "nnunetv2", "napari", "qt_binding", "cuda"):
        assert key in report.versions
    assert report.versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report.devices[0]["device"] == "cpu" and report.devices[0]["cores"] >= 1
    assert "torch_threads" in report.threads
    text = format_report(report)
    for c in report.checks:
        line = next(ln for ln in text.splitlines() if f"] {c.name}: " in ln)
        assert (" -> " in line) == (c.status != "ok")  # every problem has its fix
    assert report.ok  # a missing display is a warning: the engine works without it


def test_cli_json_and_exit_code(tmp_path, monkeypatch, no_display):
    monkeypatch.setenv("MRN_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    r = runner.invoke(cli, ["doctor", "--json", "--no-qt", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["ok"] is True
    cache = next(c for c in data["checks"] if c["name"] == "cache folder")
    assert str(tmp_path / "cache") in cache["detail"]

    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: Usage(2**30, 2**30, 0))
    r = runner.invoke(cli, ["doctor", "--no-qt", "--out", str(tmp_path)])
    assert r.exit_code == 1
    assert "[fail] output folder" in r.output and "-> free some space" in r.output


def test_mrn_doctor_runs_as_a_command(tmp_path):
    exe = shutil.which("mrn")
    if exe is None:
        pytest.skip("the mrn console script is not on PATH")
    env = {**os.environ, "MRN_CACHE_DIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(doctor.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    r = subprocess.run(
        [exe, "doctor", "--no-qt", "--out", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "checks:" in r.stdout and "[  ok] cache folder" in r.stdout
