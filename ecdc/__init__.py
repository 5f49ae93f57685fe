"""ecdc: a command-line neural audio codec (EnCodec) with a versioned .ecdc container.

Python API::

    import ecdc
    codec = ecdc.load_model("encodec_24khz")          # or a checkpoint path
    encoded = codec.encode(wav, sample_rate, bandwidth=6.0)   # wav: [channels, samples]
    data = encoded.to_bytes()                          # the .ecdc file
    wav, rate = codec.decode(ecdc.EncodedAudio.from_bytes(data))
"""

__version__ = "0.1.0"

from .codec import (  # noqa: E402
    Codec,
    EncodedAudio,
    compress,
    decompress,
    load_model,
    load_model_for,
)
from .convert import compress_file, decompress_file  # noqa: E402
from .errors import EcdcError  # noqa: E402

__all__ = [
    "Codec",
    "EcdcError",
    "EncodedAudio",
    "__version__",
    "compress",
    "compress_file",
    "decompress",
    "decompress_file",
    "load_model",
    "load_model_for",
]
