"""Speed/quality settings of nnU-Net mask prediction in the mask-free diagnosis path.

``SegInferenceSettings`` is what ``mrn predict --seg-mirroring/--seg-tile-step/--seg-localize``
set and what :class:`~mrn_engine.segmentation.NNUNetSegmenter` runs with. The defaults are the
fastest setting measured in ``docs/performance.md`` (mask-free diagnosis; its Dice cost needs
trained models to measure).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mrn_engine.errors import ConfigError


@dataclass(frozen=True)
class SegInferenceSettings:
    """How nnU-Net predicts the NM/QSM masks of a case without mask files.

    Attributes
    ----------
    use_mirroring
        nnU-Net's test-time mirroring (each tile also predicted flipped along the model's
        allowed axes: 4x the network calls for our trainer's two axes).
    tile_step_size
        Sliding-window step as a fraction of the patch (nnU-Net's ``tile_step_size``): 0.5 =
        tiles overlap by half (nnU-Net's default), 1.0 = no overlap.
    localize
        First a coarse pass (same network, no overlap, no mirroring, first fold) over the whole
        volume finds the nuclei; the full-setting sliding window then runs only over the tiles
        that touch the nuclei's box plus ``margin_patches``; everything outside is background.
    margin_patches
        Margin added on every side of the coarse box, in patch sizes per axis.
    coarse_tile_step_size
        Tile step of the coarse pass.
    """

    use_mirroring: bool = False
    tile_step_size: float = 1.0
    localize: bool = True
    margin_patches: float = 0.5
    coarse_tile_step_size: float = 1.0

    def __post_init__(self) -> None:
        for name in ("tile_step_size", "coarse_tile_step_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.1 <= float(value) <= 1.0:
                raise ConfigError(f"segmentation {name} = {value!r}: expected a number in [0.1, 1]")
        if not isinstance(self.margin_patches, (int, float)) or not 0 <= self.margin_patches <= 4:
            raise ConfigError(
                f"segmentation margin_patches = {self.margin_patches!r}: expected 0 to 4 patches"
            )
        for name in ("use_mirroring", "localize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"segmentation {name} = {getattr(self, name)!r}: expected a bool")

    def to_dict(self) -> dict:
        """The settings as a JSON-ready mapping (run metadata)."""
        return asdict(self)


#: nnU-Net's own defaults (overlap 0.5, mirroring, whole volume): the quality reference
NNUNET_DEFAULT = SegInferenceSettings(use_mirroring=True, tile_step_size=0.5, localize=False)

#: settings compared by ``mrn bench seg``: {mirror|nomirror}-STEP-{whole|local}, reference first
BENCH_SETTINGS = (
    "mirror-0.5-whole",
    "nomirror-0.5-whole",
    "mirror-0.5-local",
    "nomirror-0.5-local",
    "nomirror-0.75-local",
    "nomirror-1.0-whole",
    "nomirror-1.0-local",
)
