"""The generative model of the phantom cohort: latent variables, effect sizes, the oracle.

Per subject two latent variables carry the class information:

* ``severity`` ~ N(``effect * SEVERITY_GAP * label``, 1): disease burden. It drives NM
  depigmentation of the lateral/posterior SNc (smaller, fainter NM SN) and extra SN/RN iron.
  The classes overlap: some controls have "PD-like" values and vice versa.
* ``age`` ~ N(``AGE_MEAN + effect * label * AGE_GAP / 2``, ``AGE_SD``) with the HC mean the
  same distance below: PD patients are slightly older, and age raises iron in every nucleus (a
  confound a model can latch onto).

Everything else (pose, shape, nucleus iron offsets, NM contrast, scanner scale, bias fields,
noise) is nuisance, independent of the class. The Bayes-optimal classifier that sees the
latents thresholds the likelihood ratio of two independent Gaussians; with equal priors its
accuracy is ``Phi(d / 2)`` with ``d = effect * sqrt(SEVERITY_GAP**2 + (AGE_GAP / AGE_SD)**2)``.
The defaults put that ceiling at 0.90.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

#: class separation of the severity latent (SD units) at ``effect = 1``
SEVERITY_GAP = 2.514
#: mean age difference PD - HC (years) at ``effect = 1``, and the age distribution
AGE_GAP = 4.0
AGE_MEAN = 63.0
AGE_SD = 8.0

#: QSM nucleus model (ppb): base mean, SD of the subject offset, slope per year of age,
#: slope per unit of severity. Bases follow the real challenge data (challenge-data.md).
QSM_NUCLEI: dict[str, tuple[float, float, float, float]] = {
    "caudate": (45.0, 7.0, 0.40, 0.0),
    "putamen": (48.0, 7.0, 0.60, 0.0),
    "globus_pallidus": (125.0, 9.0, 0.60, 0.0),
    "thalamus": (-10.0, 4.0, 0.10, 0.0),
    "STN": (100.0, 9.0, 0.50, 1.5),
    "SN": (135.0, 9.0, 0.60, 6.0),
    "RN": (112.0, 9.0, 0.50, 3.0),
    "dentate": (105.0, 9.0, 0.50, 0.0),
}
#: NM model: tissue floor (a + b * T1 template), SN excess over the floor, depigmentation
NM_FLOOR = (5200.0, 1800.0)
NM_SN_EXCESS = 14500.0
NM_LOSS_PER_SEVERITY = 0.30  #: fraction of the most vulnerable SNc lost per unit of severity
NM_MASK_THRESHOLD = 0.6  #: pigment fraction below which a voxel leaves the NM mask


def draw_class_latents(
    label: int, rng: np.random.Generator, effect: float = 1.0
) -> dict[str, float]:
    """The class-dependent latents (``severity``, ``age``) of one subject."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (HC) or 1 (PD), got {label!r}")
    sign = 1.0 if label == 1 else -1.0
    severity = float(rng.normal(effect * SEVERITY_GAP * label, 1.0))
    age = float(rng.normal(AGE_MEAN + sign * effect * AGE_GAP / 2.0, AGE_SD))
    return {"severity": severity, "age": age}


def separation(effect: float = 1.0) -> float:
    """Mahalanobis distance between the classes in latent space."""
    return effect * math.hypot(SEVERITY_GAP, AGE_GAP / AGE_SD)


def oracle_accuracy(effect: float = 1.0) -> float:
    """Accuracy of the Bayes-optimal classifier on the latents (analytic, equal priors)."""
    return float(norm.cdf(separation(effect) / 2.0))


def oracle_log_odds(severity: np.ndarray, age: np.ndarray, effect: float = 1.0) -> np.ndarray:
    """log p(PD | latents) / p(HC | latents) under the generative model (equal priors)."""
    severity = np.asarray(severity, float)
    age = np.asarray(age, float)
    mu_s = effect * SEVERITY_GAP
    llr_s = -0.5 * ((severity - mu_s) ** 2 - severity**2)
    mu_pd = AGE_MEAN + effect * AGE_GAP / 2.0
    mu_hc = AGE_MEAN - effect * AGE_GAP / 2.0
    llr_a = -0.5 * ((age - mu_pd) ** 2 - (age - mu_hc) ** 2) / AGE_SD**2
    return llr_s + llr_a


def oracle_monte_carlo(effect: float = 1.0, n: int = 200_000, seed: int = 0) -> float:
    """The oracle's accuracy by simulation from the generative model (checks the analytic one)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    severity = rng.normal(effect * SEVERITY_GAP * labels, 1.0)
    age = rng.normal(AGE_MEAN + (2 * labels - 1) * effect * AGE_GAP / 2.0, AGE_SD)
    pred = oracle_log_odds(severity, age, effect) > 0
    return float(np.mean(pred == labels))
