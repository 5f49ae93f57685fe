"""Dense LSB-first bit packing of codebook indices.

EnCodec codes are 10-bit integers; storing them in whole bytes would waste 37.5 %
of every file, so both Meta's format version 0 and our version 1 pack them
densely.  The bit order is the one Meta's ``BitPacker`` produces, so one
implementation serves both formats:

* value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream;
* bit ``k`` of the stream is bit ``k % 8`` (LSB = 0) of byte ``k // 8``;
* within a value, its least significant bit comes first;
* the final partial byte is padded with zero bits.

Everything is vectorised with numpy and processed in fixed-size blocks, so
packing millions of codes takes milliseconds and bounded extra memory.  This
module deliberately does not import torch.
"""

from __future__ import annotations

import operator

import numpy as np

from .errors import TruncatedError

__all__ = ["MAX_BITS", "packed_size", "pack_codes", "unpack_codes"]

#: Widest code supported; 16 keeps every value inside one little-endian uint16.
MAX_BITS = 16

# Values per block.  A multiple of 8, so every block starts on a byte boundary
# whatever the width; 2**18 values keep the temporary bit arrays at ~4 MiB.
_BLOCK = 1 << 18


def _check_bits(bits: int) -> int:
    """Return ``bits`` as an int, raising ValueError unless it is in 1..16."""
    if isinstance(bits, bool):
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    try:
        b = operator.index(bits)
    except TypeError:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}") from None
    if not 1 <= b <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {b}")
    return b


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits: ``ceil(count*bits/8)``."""
    b = _check_bits(bits)
    n = operator.index(count)
    if n < 0:
        raise ValueError(f"count must be >= 0, got {n}")
    return (n * b + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers densely, ``bits`` bits each, LSB-first.

    ``codes`` may have any shape; it is flattened in C order.  The result is
    exactly ``ceil(codes.size * bits / 8)`` bytes.  Raises ValueError if
    ``bits`` is not in 1..16, if ``codes`` is not an integer array, or if a
    value is negative or does not fit in ``bits`` bits (silently masking would
    corrupt the stream).
    """
    b = _check_bits(bits)
    arr = np.asarray(codes)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"codes must be an integer array, got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    n = flat.size
    if n == 0:
        return b""
    lo = int(flat.min())
    hi = int(flat.max())
    if lo < 0 or hi >= (1 << b):
        bad = lo if lo < 0 else hi
        raise ValueError(f"code value {bad} does not fit in {b} unsigned bits (0..{(1 << b) - 1})")

    out = bytearray()
    for start in range(0, n, _BLOCK):
        block = flat[start:start + _BLOCK].astype("<u2")
        # (m, 16) matrix of bits, least significant first, then keep the low `b`.
        bitmat = np.unpackbits(block.view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")
        # packbits pads the final partial byte with zeros, as the format requires.
        out += np.packbits(bitmat[:, :b].reshape(-1), bitorder="little").tobytes()
    return bytes(out)


def unpack_codes(data: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: read ``count`` values of ``bits`` bits.

    Returns a 1-D ``int64`` array, the dtype torch wants for codebook lookups,
    so callers need no further conversion.  Only the first
    ``ceil(count*bits/8)`` bytes of ``data`` are used; callers that need the
    length to match exactly (the container does) check it themselves.  Raises
    TruncatedError if ``data`` is too short, ValueError for a bad ``bits`` or
    negative ``count``.
    """
    b = _check_bits(bits)
    n = operator.index(count)
    if n < 0:
        raise ValueError(f"count must be >= 0, got {n}")
    need = (n * b + 7) // 8
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < need:
        raise TruncatedError(
            f"packed codes are truncated: {n} codes of {b} bits need {need} bytes, got {raw.size}"
        )
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    weights = (1 << np.arange(b, dtype=np.int64))
    for start in range(0, n, _BLOCK):
        m = min(_BLOCK, n - start)
        byte0 = start * b // 8  # exact: start is a multiple of 8
        nbytes = (m * b + 7) // 8
        bitvec = np.unpackbits(raw[byte0:byte0 + nbytes], bitorder="little", count=m * b)
        bitmat = bitvec.reshape(m, b)
        out[start:start + m] = bitmat @ weights
    return out
