"""The released artefacts: ``python -m build`` makes an sdist and a wheel that carry what they
need, and the wheel, installed into a fresh virtual environment (not the checkout), runs
``mrn --help``, ``mrn phantom --n 2`` and is found by napari's plugin manager (npe2).

Offline: the build uses the installed setuptools (``--no-isolation``) and the venv reuses the
installed dependencies (``--system-site-packages``; the wheel itself with ``--no-deps``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

pytest.importorskip("build", reason="the `build` package makes the sdist and wheel")
pytest.importorskip("ensurepip", reason="venv without pip (Debian: apt-get install python3-venv)")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
#: files the installed package needs at run time besides its .py modules
PACKAGE_DATA = (
    "napari_mrn/napari.yaml",
    "mrn_engine/py.typed",
    "mrn_engine/segmentation/nnunet_ext/mrn_trainers.py",
)
HUB_CLASSIFIERS = (
    "Framework :: napari",
    "Development Status :: 3 - Alpha",
    "Intended Audience :: Science/Research",
    "Operating System :: OS Independent",
    "Programming Language :: Python :: 3",
    "Topic :: Scientific/Engineering :: Image Processing",
    "Topic :: Scientific/Engineering :: Medical Science Apps.",
)


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout}\n{r.stderr}"
    return r


def _clean_env() -> dict[str, str]:
    """The environment without anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist + wheel of a clean copy of the checkout (the checkout itself is left untouched)."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src_copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", "build", "dist")
    for name in ("src", "tests", "pyproject.toml", "README.md", "LICENSE"):
        p = ROOT / name
        (shutil.copytree if p.is_dir() else shutil.copy2)(
            p, src / name, **({"ignore": ignore} if p.is_dir() else {})
        )  # type: ignore[operator]
    out = tmp / "dist"
    _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        cwd=tmp,
        env=_clean_env(),
    )
    return out


def _one(folder: Path, pattern: str) -> Path:
    (path,) = folder.glob(pattern)
    return path


def test_wheel_and_sdist_carry_manifest_data_licence_readme(dist):
    wheel = _one(dist, "napari_mrn-*.whl")
    sdist = _one(dist, "napari_mrn-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    for f in PACKAGE_DATA:
        assert f in names, f"{f} missing from the wheel"
    assert f"{info}/licenses/LICENSE" in names
    assert "mrn_engine/cli/doctor.py" in names and "napari_mrn/_about.py" in names
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# napari-mrn")  # README is the long description
    assert set(HUB_CLASSIFIERS) <= set(meta.get_all("Classifier"))
    assert "napari-mrn = napari_mrn:napari.yaml" in entry_points
    assert "mrn = mrn_engine.cli:main" in entry_points
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    for f in ("LICENSE", "README.md", "pyproject.toml", *(f"src/{p}" for p in PACKAGE_DATA)):
        assert f in members, f"{f} missing from the sdist"


@pytest.fixture(scope="module")
def venv_python(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (dependencies reused from this interpreter)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    env = _clean_env()
    _run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        cwd=venv.parent,
        env=env,
    )
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    wheel = _one(dist, "napari_mrn-*.whl")
    _run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        cwd=venv.parent,
        env=env,
    )
    return py


def test_wheel_runs_mrn_from_a_fresh_venv(venv_python, tmp_path):
    env = _clean_env()
    bindir = venv_python.parent
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
    where = _run(
        [
            str(venv_python),
            "-c",
            "import mrn_engine, napari_mrn; print(mrn_engine.__file__); print(napari_mrn.__file__)",
        ],
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    venv_root = venv_python.parents[1].resolve()
    for f in where:  # the wheel's copy, not the checkout or an editable install
        assert Path(f).resolve().is_relative_to(venv_root), f
    mrn = str(bindir / "mrn")
    assert "phantom" in _run([mrn, "--help"], cwd=tmp_path, env=env).stdout
    _run(
        [mrn, "phantom", "--n", "2", "--workers", "1", "--quiet", "--out", "cohort"],
        cwd=tmp_path,
        env=env,
    )
    cases = sorted(
        p.name for p in (tmp_path / "cohort").iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    assert len(cases) == 2
    for case in cases:
        assert (tmp_path / "cohort" / case / "NM.nii.gz").is_file()
        assert (tmp_path / "cohort" / case / "QSM.nii.gz").is_file()
    doctor = _run([mrn, "doctor", "--no-qt", "--out", "."], cwd=tmp_path, env=env).stdout
    assert "[  ok] nnU-Net trainer" in doctor  # the trainer file shipped as package data


NPE2_PROBE = textwrap.dedent(
    """
    import json, npe2
    pm = npe2.PluginManager.instance()
    pm.discover()
    m = pm.get_manifest("napari-mrn")
    c = m.contributions
    print(json.dumps({
        "version": m.package_metadata.version if m.package_metadata else None,
        "module": __import__("napari_mrn").__file__,
        "readers": [r.command for r in c.readers or []],
        "writers": [w.command for w in c.writers or []],
        "samples": [s.key for s in c.sample_data or []],
        "widgets": [w.display_name for w in c.widgets or []],
    }))
    """
)


def test_npe2_discovers_the_installed_plugin(venv_python, tmp_path):
    pytest.importorskip("npe2")
    import json

    r = _run([str(venv_python), "-c", NPE2_PROBE], cwd=tmp_path, env=_clean_env())
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["version"] == "0.1.0"
    assert Path(found["module"]).resolve().is_relative_to(venv_python.parents[1].resolve())
    assert found["readers"] == ["napari-mrn.get_reader"]
    assert set(found["writers"]) == {"napari-mrn.write_labels", "napari-mrn.write_image"}
    assert set(found["samples"]) == {"mrn_pd_case", "mrn_hc_case"}
    assert {"MRN diagnosis", "MRN diagnostics"} <= set(found["widgets"])
    npe2_exe = venv_python.parent / "npe2"
    cmd = [str(npe2_exe)] if npe2_exe.exists() else [str(venv_python), "-m", "npe2"]
    _run([*cmd, "validate", "napari-mrn"], cwd=tmp_path, env=_clean_env())
