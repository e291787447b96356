#!/usr/bin/env bash
# Install napari-mrn from this checkout: system libraries for the GUI and its tests (Debian/Ubuntu,
# where root or sudo is available), then torch and the package with all extras.
#
#   bash scripts/install.sh            # everything (README step 1; .ci/run runs this too)
#   bash scripts/install.sh --check    # only report which system packages are missing
#   bash scripts/install.sh --dry-run  # print the commands instead of running them
#
# PYTHON selects the interpreter (default: python), e.g. PYTHON=.venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z ${PYTHON:-} ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
MODE=install
case "${1:-}" in
  --check) MODE=check ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: bash scripts/install.sh [--check|--dry-run]" >&2; exit 2 ;;
esac

# Xvfb (virtual display for the GUI tests and headless servers), Mesa GL, and the libraries the
# Qt xcb platform plugin loads. The one list of system packages: .ci/run installs through here.
APT_PACKAGES=(xvfb xauth libgl1 libegl1 libgl1-mesa-dri
  libxkbcommon-x11-0 libxkbcommon0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0
  libdbus-1-3 libfontconfig1)

run() {
  if [[ $MODE == dry ]]; then echo "+ $*"; else "$@"; fi
}

system_packages() {
  case "$(uname -s)" in
    Darwin)
      echo "macOS: no system packages needed (the PyQt6 wheel brings Qt)."
      return ;;
    MINGW* | MSYS* | CYGWIN*)
      echo "Windows: no system packages needed (the PyQt6 wheel brings Qt)."
      return ;;
  esac
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "Not a Debian/Ubuntu system: install Xvfb, Mesa (libGL/libEGL), libxkbcommon-x11 and the"
    echo "xcb-util libraries (icccm, image, keysyms, renderutil, cursor) with your package manager,"
    echo "or the GUI tests are skipped (no display). The engine and \`mrn\` need none of them."
    return
  fi
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    echo "System packages: all ${#APT_PACKAGES[@]} present."
    return
  fi
  echo "System packages missing: ${missing[*]}"
  [[ $MODE == check ]] && return
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo)
    else
      echo "No root and no password-less sudo: not installed. Ask an administrator to run:"
      echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}"
      echo "Until then \`mrn\` works and the GUI tests are skipped (\"no display\")."
      return
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  run "${sudo[@]}" apt-get update -qq
  run "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# The Python side: a recent enough interpreter that pip may install into.
python_ready() {
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "No Python found ($PYTHON). Debian/Ubuntu: sudo apt-get install -y python3 python3-venv;"
    echo "macOS/Windows: https://www.python.org/downloads/ (3.10 or newer)."
    return 1
  fi
  "$PYTHON" - <<'PY'
import os, sys, sysconfig
if sys.version_info < (3, 10):
    sys.exit(f"Python {sys.version.split()[0]} is too old: napari-mrn needs 3.10 or newer.")
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
if managed and sys.prefix == sys.base_prefix:
    sys.exit(
        f"{sys.executable} is the system's Python, which pip may not change (PEP 668).\n"
        "Make a virtual environment first, then run this script again inside it:\n"
        "  python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh\n"
        "(Debian/Ubuntu without venv support: sudo apt-get install -y python3-venv)"
    )
PY
}

system_packages
python_ready || exit 1
[[ $MODE == check ]] && exit 0

# torch first, pinned (CPU or CUDA build: pip picks the default wheel for the platform), then the
# package in editable mode with the GUI, test and explain (captum) extras.
run "$PYTHON" -m pip install -q torch==2.14.1 torchvision==0.29.1
run "$PYTHON" -m pip install -q -e ".[all]"
echo "Installed. Check the set-up with: mrn doctor"
