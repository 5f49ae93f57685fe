"""EnCodec networks, with parameter names that load Meta's released weights unchanged."""

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
