"""Import a script of ``docs/scripts`` as a module, for the tests of its functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

DOCS_SCRIPTS = Path(__file__).resolve().parents[1] / "docs" / "scripts"


def load_docs_script(name: str) -> ModuleType:
    """``docs/scripts/<name>.py``, executed as a fresh module."""
    spec = importlib.util.spec_from_file_location(name, DOCS_SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
