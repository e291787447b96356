"""``mrn doctor``: what a user runs before asking for help.

Collects the versions that matter, the compute devices and their memory, the thread settings,
and runs the checks (nnU-Net environment, cache and output folders, display for the GUI). Every
problem carries a one-line fix. A check fails (``mrn doctor`` exits 1) when the engine
itself cannot work (torch, the cache or output folder, a file missing from the install); display
and GUI problems are warnings, since the engine and ``mrn`` run without them. The engine never imports napari or Qt: versions come from
``importlib.metadata`` and the Qt start-up test (:func:`qt_starts`) runs in a child process.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from mrn_engine.config import cache_dir
from mrn_engine.segmentation import env as seg_env

Status = Literal["ok", "warn", "fail"]

#: distributions whose versions a bug report needs (None = not installed)
PACKAGES = (
    "napari-mrn",
    "torch",
    "torchvision",
    "timm",
    "monai",
    "nnunetv2",
    "numpy",
    "nibabel",
    "isal",
    "napari",
    "magicgui",
    "qtpy",
    "npe2",
)
#: Qt bindings, in the order qtpy prefers them
QT_BINDINGS = ("PyQt5", "PySide2", "PyQt6", "PySide6")
#: thread-count environment variables read by torch / numpy's BLAS
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: nnU-Net v2's folder variables (``mrn seg`` sets them itself, per run, under ``--workspace``)
NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: free space below which a folder check fails, in GiB (cache: ROI crops and demo bundle
#: records; output: a demo run with its cohort, bundle and report)
MIN_FREE_GIB = {"cache": 1.0, "output": 2.0}
#: the reason the test suite gives for skipping the GUI tests (tests/conftest.py)
NO_DISPLAY_REASON = "no display: install xvfb or set DISPLAY"
INSTALL_HINT = "bash scripts/install.sh"


@dataclass
class Check:
    """One check: its status, what was found and, when not ok, the one-line fix."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Report:
    """Everything ``mrn doctor`` prints (``--json`` dumps :func:`dataclasses.asdict` of it)."""

    versions: dict[str, str | None]
    devices: list[dict[str, object]]
    threads: dict[str, object]
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(c.status != "fail" for c in self.checks)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


# --------------------------------------------------------------------------- versions


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Python, platform, the packages of :data:`PACKAGES` and the installed Qt bindings."""
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }
    out.update({name: _version(name) for name in PACKAGES})
    bindings = [f"{b} {_version(b)}" for b in QT_BINDINGS if _version(b)]
    out["qt_binding"] = ", ".join(bindings) or None
    return out


# --------------------------------------------------------------------------- devices, threads


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):
        return None


def usable_cores() -> int:
    """CPU cores this process may run on (affinity/cgroup-aware where the OS says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def torch_devices() -> tuple[dict[str, str | None], list[dict[str, object]], list[Check]]:
    """torch's CUDA/cuDNN/MPS versions, the devices with their memory, and a torch check."""
    cpu: dict[str, object] = {
        "device": "cpu",
        "name": platform.processor() or platform.machine(),
        "cores": usable_cores(),
        "memory_gib": _round(_ram_gib()),
    }
    try:
        import torch
    except ImportError as e:
        fix = "pip install torch==2.14.1 torchvision==0.29.1"
        return {}, [cpu], [Check("torch", "fail", f"torch cannot be imported: {e}", fix)]
    info: dict[str, str | None] = {
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(torch.backends.cudnn.version())
        if torch.backends.cudnn.is_available()
        else None,
        "mps": str(torch.backends.mps.is_available()),
    }
    devices = [cpu]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            devices.append(
                {
                    "device": f"cuda:{i}",
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": _round(total / 2**30),
                    "free_gib": _round(free / 2**30),
                    "bf16": bool(torch.cuda.is_bf16_supported()),
                }
            )
    if torch.backends.mps.is_available():
        devices.append({"device": "mps", "name": "Apple Metal (shares system memory)"})
    kinds = ", ".join(str(d["device"]) for d in devices)
    checks = [Check("torch", "ok", f"torch {torch.__version__}; devices: {kinds}")]
    if torch.version.cuda and not torch.cuda.is_available():
        detail = f"torch is built for CUDA {torch.version.cuda} but sees no GPU: runs on CPU"
        checks.append(Check("cuda", "ok", detail))
    return info, devices, checks


def thread_settings() -> tuple[dict[str, object], list[Check]]:
    """torch's thread counts, the environment variables, the load; warns on oversubscription."""
    cores = usable_cores()
    info: dict[str, object] = {"usable_cores": cores}
    info.update({k: os.environ.get(k) for k in THREAD_ENV})
    try:
        info["load_1min"] = _round(os.getloadavg()[0])
    except (AttributeError, OSError):
        info["load_1min"] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        return info, []
    threads = int(info["torch_threads"])  # type: ignore[arg-type]
    load = info["load_1min"]
    if threads > cores:
        return info, [
            Check(
                "threads",
                "warn",
                f"torch uses {threads} threads on {cores} usable cores (oversubscribed)",
                f"export OMP_NUM_THREADS={cores} (or pass --threads {cores})",
            )
        ]
    if isinstance(load, float) and load >= cores and threads > 1:
        return info, [
            Check(
                "threads",
                "warn",
                f"the machine is busy (load {load:.1f} on {cores} cores) and torch uses "
                f"{threads} threads",
                "pass --threads 1 (or export OMP_NUM_THREADS=1) while others share the cores",
            )
        ]
    return info, [Check("threads", "ok", f"torch uses {threads} of {cores} usable cores")]


# --------------------------------------------------------------------------- folders


def default_cache_dir() -> Path:
    """The engine's cache folder (``$MRN_CACHE_DIR``, default ``~/.cache/mrn``)."""
    return cache_dir()


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_folder(path: Path, role: str, min_free_gib: float | None = None) -> Check:
    """Can files be written in ``path`` (or created under its nearest existing parent), and is
    there at least ``min_free_gib`` free? Writes and removes one temporary file; creates nothing.
    """
    need = MIN_FREE_GIB.get(role, 1.0) if min_free_gib is None else min_free_gib
    name = f"{role} folder"
    base = _existing_ancestor(path)
    where = str(path) if base == path.absolute() else f"{path} (not yet created; under {base})"
    if not base.is_dir():
        return Check(
            name,
            "fail",
            f"{where}: {base} is a file, not a folder",
            f"choose another {role} folder",
        )
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".mrn-doctor-"):
            pass
    except OSError as e:
        env = " (export MRN_CACHE_DIR=/a/writable/folder)" if role == "cache" else ""
        return Check(
            name,
            "fail",
            f"{where}: not writable ({e.strerror or e})",
            f"chmod u+w {base}, or choose another {role} folder{env}",
        )
    free = shutil.disk_usage(base).free / 2**30
    if free < need:
        return Check(
            name,
            "fail",
            f"{where}: only {free:.2f} GiB free (need about {need:g} GiB)",
            f"free some space on that disk, or choose a {role} folder on another disk",
        )
    return Check(name, "ok", f"{where}: writable, {free:.1f} GiB free")


def check_nnunet_env() -> list[Check]:
    """nnU-Net's three folder variables (optional) and our trainer extension (shipped)."""
    trainer = seg_env.EXT_TRAINER_DIR / "mrn_trainers.py"
    if trainer.is_file():
        checks = [Check("nnU-Net trainer", "ok", f"{trainer.name} shipped")]
    else:
        checks = [
            Check(
                "nnU-Net trainer",
                "fail",
                f"{trainer} is missing from the installed package",
                "reinstall: pip install --force-reinstall napari-mrn",
            )
        ]
    unset = [var for var in NNUNET_ENV if not os.environ.get(var)]
    if unset:
        detail = f"{', '.join(unset)} not set (fine: `mrn seg` sets them)"
        checks.append(Check("nnU-Net env", "ok", detail))
    for var in NNUNET_ENV:
        value = os.environ.get(var)
        if not value:
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            fix = f"mkdir -p {value} or unset {var}"
            checks.append(Check(var, "warn", f"{var}={value}: folder does not exist", fix))
        elif not os.access(folder, os.W_OK):
            fix = f"chmod u+w {value} or unset {var}"
            checks.append(Check(var, "warn", f"{var}={value}: not writable", fix))
        else:
            checks.append(Check(var, "ok", f"{var}={value}"))
    return checks


# --------------------------------------------------------------------------- display


def x_server_answers(display: str, timeout: float = 1.0) -> bool:
    """Does an X server accept connections at ``display`` (``[host]:N[.screen]``)?"""
    host, _, rest = display.rpartition(":")
    try:
        number = int(rest.split(".")[0])
    except ValueError:
        return False
    if host in ("", "unix") or host.startswith("/"):
        targets = [f"\0/tmp/.X11-unix/X{number}", f"/tmp/.X11-unix/X{number}"]
        if host.startswith("/"):  # XQuartz's launchd socket path
            targets = [display]
        for target in targets:
            if target.startswith("\0") and not sys.platform.startswith("linux"):
                continue
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(timeout)
                    s.connect(target)
                return True
            except OSError:
                continue
        return False
    try:
        with socket.create_connection((host, 6000 + number), timeout=timeout):
            return True
    except OSError:
        return False


def display_status() -> Check:
    """Is there a display napari's Qt window can open on (no Qt is imported)?"""
    name = "display"
    qpa = os.environ.get("QT_QPA_PLATFORM", "")
    if sys.platform in ("darwin", "win32"):
        return Check(name, "ok", f"{sys.platform}: the native window system")
    if qpa.split(":")[0] in ("offscreen", "minimal"):
        return Check(name, "ok", f"QT_QPA_PLATFORM={qpa}: no windows, off-screen rendering only")
    wayland = os.environ.get("WAYLAND_DISPLAY")
    if wayland:
        runtime = Path(os.environ.get("XDG_RUNTIME_DIR", "/run/user/0"))
        sock = Path(wayland) if wayland.startswith("/") else runtime / wayland
        if sock.exists():
            return Check(name, "ok", f"WAYLAND_DISPLAY={wayland}")
    display = os.environ.get("DISPLAY")
    xvfb = shutil.which("Xvfb")
    if display and x_server_answers(display):
        return Check(name, "ok", f"DISPLAY={display}: an X server answers")
    if display:
        detail = f"DISPLAY={display} is set but no X server answers there"
    else:
        detail = "no display (DISPLAY is not set)"
    if xvfb:
        return Check(
            name,
            "warn",
            f"{detail}; Xvfb is installed ({xvfb}), so the tests run under it",
            "start the GUI as `xvfb-run -a napari` (or log in with a desktop / ssh -X)",
        )
    return Check(
        name,
        "warn",
        f"{detail} and Xvfb is not installed: napari cannot open and the GUI tests are skipped",
        f"{INSTALL_HINT} (installs xvfb), or set DISPLAY to a running X server",
    )


QT_PROBE = (
    "import sys\n"
    "from qtpy.QtWidgets import QApplication\n"
    "app = QApplication(sys.argv[:1])\n"
    "print(app.platformName())\n"
)


def qt_starts(timeout: float = 60.0) -> tuple[bool, str]:
    """Start a ``QApplication`` in a child process (a Qt abort there cannot kill us).

    Returns (ok, Qt's platform name or the last line Qt printed).
    """
    try:
        r = subprocess.run(
            [sys.executable, "-c", QT_PROBE],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"a QApplication did not start within {timeout:.0f} s"
    if r.returncode == 0:
        return True, r.stdout.strip()
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    useful = [ln for ln in lines if "qt." in ln.lower() or "could not" in ln.lower()]
    return False, (useful or lines or [f"exit code {r.returncode}"])[0]


def gui_check(display: Check) -> Check:
    """napari installed, and a Qt application starts on the display found."""
    if _version("napari") is None:
        return Check(
            "GUI", "warn", "napari is not installed (engine only)", "pip install 'napari-mrn[gui]'"
        )
    if not any(_version(b) for b in QT_BINDINGS):
        return Check("GUI", "warn", "napari is installed but no Qt binding is", "pip install PyQt6")
    if display.status != "ok":
        return Check("GUI", "warn", "not tried: no display (see `display`)", display.fix)
    ok, said = qt_starts()
    if ok:
        return Check("GUI", "ok", f"a Qt application starts (platform {said})")
    return Check(
        "GUI",
        "warn",
        f"Qt cannot start on this display: {said}",
        f"{INSTALL_HINT} (installs the Qt xcb libraries: libxcb-cursor0, libxkbcommon-x11-0, ...)",
    )


# --------------------------------------------------------------------------- report


def run_doctor(
    out: Path | None = None, *, cache: Path | None = None, try_qt: bool = True
) -> Report:
    """All of the above. ``out``: the output folder to check (default: the current folder)."""
    versions = package_versions()
    torch_info, devices, checks = torch_devices()
    versions.update(torch_info)
    threads, thread_checks = thread_settings()
    checks += thread_checks
    checks.append(check_folder(cache if cache is not None else default_cache_dir(), "cache"))
    checks.append(check_folder(out if out is not None else Path.cwd(), "output"))
    checks += check_nnunet_env()
    display = display_status()
    checks.append(display)
    if try_qt:
        checks.append(gui_check(display))
    return Report(versions=versions, devices=devices, threads=threads, checks=checks)


def format_report(report: Report) -> str:
    """Plain text, one line per item; problems end with ``-> fix``."""
    v = report.versions
    lines = ["versions:"]
    lines += [f"  {k}: {val if val is not None else '-'}" for k, val in v.items()]
    lines.append("devices:")
    for d in report.devices:
        rest = ", ".join(f"{k} {val}" for k, val in d.items() if k != "device")
        lines.append(f"  {d['device']}: {rest}")
    lines.append("threads:")
    lines += [f"  {k}: {val if val is not None else '-'}" for k, val in report.threads.items()]
    lines.append("checks:")
    for c in report.checks:
        fix = f"  -> {c.fix}" if c.status != "ok" and c.fix else ""
        lines.append(f"  [{c.status:>4}] {c.name}: {c.detail}{fix}")
    n_fail = sum(c.status == "fail" for c in report.checks)
    n_warn = sum(c.status == "warn" for c in report.checks)
    lines.append(f"{n_fail} failed, {n_warn} warnings")
    return "\n".join(lines)


def _cudnn_version(v: int | None) -> str | None:
    """cuDNN's integer version (e.g. 92400 or 8902) as ``major.minor.patch``."""
    if not v:
        return None
    major = v // 10000 if v >= 10000 else v // 1000
    rest = v - major * (10000 if v >= 10000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 1)
