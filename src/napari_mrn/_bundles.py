"""Where model bundles are looked for: ``MRN_BUNDLE``, the last one used, and ``mrn demo``'s output.

What a bundle folder holds is the engine's business (``open_bundle``); this module only
decides which folders to offer.
"""

from __future__ import annotations

import os
from pathlib import Path

from mrn_engine.bundle import last_demo_bundle, open_bundle
from mrn_engine.errors import MRNError

#: where ``mrn demo`` writes its bundle when run with ``--out mrn_demo`` (relative to the
#: working directory, then home); the fallbacks after the bundle ``mrn demo`` recorded
DEMO_BUNDLE_LOCATIONS: tuple[str, ...] = ("./mrn_demo/bundle", "~/mrn_demo/bundle")


def bundle_folds(path: str | os.PathLike) -> int:
    """Number of folds with weights in a bundle (0 if the folder is not a usable bundle)."""
    try:
        return len(open_bundle(Path(path).expanduser()).folds)
    except MRNError:
        return 0


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a model bundle the engine can open."""
    return bundle_folds(path) > 0


def candidate_bundles(last: str | None = None) -> list[Path]:
    """Existing bundles to offer, best first: ``$MRN_BUNDLE``, the last used, the bundle the
    last ``mrn demo`` recorded (``$MRN_CACHE_DIR/last_demo_bundle.json``), then
    ``./mrn_demo/bundle`` and ``~/mrn_demo/bundle``. Stale entries (folders gone) are skipped."""
    demo = last_demo_bundle()
    raw = [os.environ.get("MRN_BUNDLE"), last, demo, *DEMO_BUNDLE_LOCATIONS]
    out: list[Path] = []
    for item in raw:
        if not item:
            continue
        p = Path(item).expanduser().resolve()
        if p not in out and is_bundle(p):
            out.append(p)
    return out
