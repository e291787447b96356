"""Simulated scanner sites: how one site's NM and QSM differ from another's (issue 13).

A site changes only how the anatomy is imaged, never the subject: the latents, the nuclei and
the oracle are the same whatever the site. Per site:

* NM ``gain`` and ``offset``: the raw value scale (``NM = gain * signal + offset``: other
  receive chains, DICOM rescale slope/intercept);
* ``bias``: RMS of the smooth multiplicative NM bias field (coil sensitivity);
* ``nm_noise``: factor on the Rician noise SD (field strength, voxel size, averages);
* ``nm_contrast``: factor on the SN's NM hyperintensity over tissue (MT preparation, TR);
* ``qsm_noise``: factor on the QSM noise SD; ``qsm_unit``: ``"ppb"`` (as the challenge data)
  or ``"ppm"`` (written values / 1000).

Each case of a site keeps the generator's per-case draws (scale, noise, contrast, bias) on top.
Site ``A`` reproduces the generator as it was before sites existed, byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mrn_engine.errors import InputDataError


@dataclass(frozen=True)
class Site:
    """How one scanner images the phantom anatomy."""

    name: str
    gain: float = 1.0
    offset: float = 0.0
    bias: float = 0.08
    nm_noise: float = 1.0
    nm_contrast: float = 1.0
    qsm_noise: float = 1.0
    qsm_unit: str = "ppb"

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return asdict(self)


#: the built-in sites; ``A`` = the original generator
SITES: dict[str, Site] = {
    "A": Site("A"),
    "B": Site(
        "B", gain=0.6, offset=2000.0, bias=0.18, nm_noise=1.5, nm_contrast=0.8, qsm_noise=1.4
    ),
    "C": Site("C", gain=2.5, offset=0.0, bias=0.12, nm_noise=0.7, nm_contrast=1.2, qsm_unit="ppm"),
    "D": Site(
        "D", gain=0.35, offset=500.0, bias=0.25, nm_noise=1.2, nm_contrast=0.9, qsm_noise=0.8
    ),
}


def parse_sites(text: str | list[str] | tuple[str, ...]) -> list[Site]:
    """``"A"`` or ``"A,B,C"`` (or a list of names) -> sites, in order; clear error if unknown."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise InputDataError("--site: give at least one site name")
    unknown = [n for n in names if n not in SITES]
    if unknown:
        raise InputDataError(
            f"--site: unknown site(s) {', '.join(unknown)}; choose from {', '.join(SITES)}"
        )
    if len(set(names)) != len(names):
        raise InputDataError(f"--site: site named twice in {','.join(names)}")
    return [SITES[n] for n in names]
