"""Features for private models: fixed extractors (no privacy cost) and private statistics."""

from dptorch.features.channel_norm import ChannelNorm, private_channel_norm
from dptorch.features.scattering import Scattering2D

__all__ = ["ChannelNorm", "Scattering2D", "private_channel_norm"]
