"""EnCodec networks, with parameter names that load Meta's released weights unchanged.

``encodec`` (config and model) builds on ``seanet`` (encoder, decoder), ``quantizer`` (RVQ)
and ``modules`` (padded and weight-normed convs, LSTM); ``fastpaths`` holds the faster
inference formulations those layers may switch to, ``caching`` the caches of derived
weights, ``batching`` how segments are grouped into passes. ``streaming`` codes audio
block by block, with the window geometry of ``windows``.
"""

from .encodec import (
    ENCODEC_24KHZ,
    ENCODEC_48KHZ,
    EncodecConfig,
    EncodecModel,
    EncodedSegment,
    linear_overlap_add,
)
from .quantizer import ResidualVectorQuantizer
from .seanet import SEANetDecoder, SEANetEncoder

__all__ = [
    "ENCODEC_24KHZ",
    "ENCODEC_48KHZ",
    "EncodecConfig",
    "EncodecModel",
    "EncodedSegment",
    "ResidualVectorQuantizer",
    "SEANetDecoder",
    "SEANetEncoder",
    "linear_overlap_add",
]
