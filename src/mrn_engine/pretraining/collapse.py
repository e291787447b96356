"""Did a pretraining run learn anything? The collapse check written into every card.

AnatCL's loss (:func:`~mrn_engine.models.yaware.anatcl_loss`) equals ``log(2B - 1)`` when every
projection is the same (the card's ``uniform``). A backbone that finds no image feature
predicting the weak labels' kernel ends there: spreading the projections at random costs
more. Measured (docs/pretraining.md, "The collapse check"): collapsed runs ended between 0.003
below and 0.12 above that value, runs that learned 0.13 to 1.14 below it. A run whose last epoch ends
less than :data:`COLLAPSE_MARGIN` below it has given no evidence of learning, and its weights
are no better a start than random initialisation (measured: ensembles at chance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: how far below ``log(2B - 1)`` the last epoch's mean loss must end to count as learned
COLLAPSE_MARGIN = 0.05


def is_collapsed(curve: Sequence[Mapping[str, float]]) -> bool:
    """True when the last epoch of ``curve`` (the card's ``loss_curve``) did not end at least
    :data:`COLLAPSE_MARGIN` below the collapsed value; True for an empty curve."""
    if not curve:
        return True
    last = curve[-1]
    return float(last["loss"]) > float(last["uniform"]) - COLLAPSE_MARGIN


def collapse_note(curve: Sequence[Mapping[str, float]]) -> str:
    """One line for the user: the last loss against the collapsed value."""
    last = curve[-1] if curve else {"loss": float("nan"), "uniform": float("nan")}
    return (
        f"pretraining did not learn: its last loss {last['loss']:.3f} is not "
        f"{COLLAPSE_MARGIN} below the collapsed value {last['uniform']:.3f} (every projection "
        "the same); these weights are no better a start than random initialisation "
        "(docs/pretraining.md, 'The collapse check')"
    )
