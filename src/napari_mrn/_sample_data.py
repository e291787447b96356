"""Sample data: one synthetic Parkinson's disease case and one healthy control.

Both come from :func:`mrn_engine.phantom.make_phantom_case` with a fixed seed, so every user
(and every test) sees the same volumes. They are phantoms, not patient data.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

from mrn_engine.data import Case, Volume
from mrn_engine.phantom import make_phantom_case
from napari_mrn._compat import guard_triton
from napari_mrn._layers import LayerDataTuple
from napari_mrn._reader import case_layers

guard_triton()

#: seeds of the two sample cases
SAMPLE_SEEDS: dict[int, int] = {1: 2025, 0: 2026}


#: case ids of the two sample cases
SAMPLE_IDS: dict[int, str] = {1: "PD_sample", 0: "HC_sample"}


@lru_cache(maxsize=2)
def sample_case(label: int) -> Case:
    """The deterministic phantom case with ``label`` (1 = PD, 0 = HC) as an engine ``Case``."""
    pc = make_phantom_case(label, seed=SAMPLE_SEEDS[label], case_id=SAMPLE_IDS[label])

    def vol(array, kind: str) -> Volume:
        return Volume(array, pc.affine.copy(), None, None, kind)

    return Case(
        case_id=pc.case_id,
        nm=vol(pc.nm, "image"),
        qsm=vol(pc.qsm, "image"),
        t1=vol(pc.t1, "image"),
        nm_mask=vol(pc.nm_mask, "mask"),
        qsm_mask=vol(pc.qsm_mask, "mask"),
        label=pc.label,
    )


def open_panel() -> None:
    """Dock the MRN diagnosis panel in the current viewer unless one is there already.

    Opening a sample case then leaves the user one click (Run) from a diagnosis. Docking is a
    convenience: if napari cannot do it (no window, headless viewer), the menu still can.
    """
    import napari

    from napari_mrn._widget import MRNDiagnosisWidget

    viewer = napari.current_viewer()
    window = getattr(viewer, "window", None)
    if window is None or not hasattr(window, "dock_widgets"):
        return
    if any(isinstance(w, MRNDiagnosisWidget) for w in window.dock_widgets.values()):
        return
    try:
        window.add_plugin_dock_widget("napari-mrn", "MRN diagnosis")
    except (KeyError, ValueError, RuntimeError) as e:  # plugin not registered in this viewer
        warnings.warn(f"napari-mrn: could not open the MRN panel ({e})", stacklevel=2)


def pd_case() -> list[LayerDataTuple]:
    """npe2 sample: a synthetic PD case (NM, QSM, T1 and both masks); opens the MRN panel."""
    layers = case_layers(sample_case(1))
    open_panel()
    return layers


def hc_case() -> list[LayerDataTuple]:
    """npe2 sample: a synthetic healthy control case; opens the MRN panel."""
    layers = case_layers(sample_case(0))
    open_panel()
    return layers
