"""ecdc: a command-line neural audio codec (EnCodec) with a versioned .ecdc container.

Python API::

    import ecdc
    codec = ecdc.load_model("encodec_24khz")          # or a checkpoint path
    encoded = codec.encode(wav, sample_rate, bandwidth=6.0)   # wav: [channels, samples]
    data = encoded.to_bytes()                          # the .ecdc file
    wav, rate = codec.decode(ecdc.EncodedAudio.from_bytes(data))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import EcdcError

__version__ = "0.1.0"

#: The public names and the modules they live in, imported on first use: the command line
#: imports this package, and ``ecdc --version`` must not pay for torch (see :func:`__getattr__`).
_LAZY = {
    "Codec": "codec", "compress": "codec", "decompress": "codec", "load_model": "codec",
    "load_model_for": "codec", "EncodedAudio": "container", "compress_file": "convert",
    "decompress_file": "convert", "TokenDataset": "dataset", "iter_dataset": "dataset",
}

if TYPE_CHECKING:
    from .codec import Codec, compress, decompress, load_model, load_model_for
    from .container import EncodedAudio
    from .convert import compress_file, decompress_file
    from .dataset import TokenDataset, iter_dataset

__all__ = [
    "Codec",
    "EcdcError",
    "EncodedAudio",
    "TokenDataset",
    "__version__",
    "compress",
    "compress_file",
    "decompress",
    "decompress_file",
    "iter_dataset",
    "load_model",
    "load_model_for",
]


def __getattr__(name: str) -> Any:
    """The public API's names, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
