"""Atlas-driven synthetic cohort in the PDCADxFoundation layout (``mrn phantom``).

Real MNI anatomy (nilearn's MNI152 template, CIT168 nuclei, aseg thalamus, a modelled dentate)
is warped per subject onto the challenge grid; NM, QSM and T1 intensities follow the real value
ranges, and PD effects come from latent variables whose class distributions overlap (see
``docs/phantom.md``).
"""

from mrn_engine.phantom.case import PhantomCase, make_phantom_case, write_phantom_case
from mrn_engine.phantom.cohort import generate_cohort
from mrn_engine.phantom.figure import plot_pd_hc
from mrn_engine.phantom.model import oracle_accuracy

__all__ = [
    "PhantomCase",
    "generate_cohort",
    "make_phantom_case",
    "oracle_accuracy",
    "plot_pd_hc",
    "write_phantom_case",
]
