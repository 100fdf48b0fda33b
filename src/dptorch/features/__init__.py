"""Fixed, data-independent feature extractors: applying them costs no privacy."""

from dptorch.features.scattering import Scattering2D

__all__ = ["Scattering2D"]
