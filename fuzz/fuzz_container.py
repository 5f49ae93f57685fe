#!/usr/bin/env python3
"""Coverage-guided fuzzing of the .ecdc reader and the bit unpacker with atheris.

atheris is a development tool, not a dependency of ecdc: ``pip install atheris``.
See fuzz/README.md for how to run it.  Each input is read by ``EcdcReader`` in
normal and in salvage mode and fed to ``unpack_codes``; anything other than an
``EcdcError`` (or a broken invariant, raised as AssertionError) is a crash.
"""

from __future__ import annotations

import io
import sys
import types
import zlib
from pathlib import Path

import atheris

# Load ecdc.container and ecdc.bitpack without ecdc/__init__.py, which imports torch:
# the container must not need it, and instrumenting torch would be slow and pointless.
_ROOT = Path(__file__).resolve().parent.parent
_pkg = types.ModuleType("ecdc")
_pkg.__path__ = [str(_ROOT / "ecdc")]  # type: ignore[attr-defined]
sys.modules.setdefault("ecdc", _pkg)

with atheris.instrument_imports(include=["ecdc"]):
    from ecdc import bitpack, container
    from ecdc.errors import EcdcError


def _read(data: bytes, salvage: bool) -> tuple[container.EcdcReader, list] | None:
    """Read ``data`` fully; None if the reader refused it with an EcdcError."""
    try:
        reader = container.EcdcReader(io.BytesIO(data), salvage=salvage)
        return reader, list(reader)
    except EcdcError:
        return None


def _check_salvage(reader: container.EcdcReader, items: list, size: int) -> None:
    """Invariants of a salvage read: chunks and gaps tile the chunk indices in order."""
    h = reader.header
    expected = 0
    silence = 0
    span = 0  # samples the intact chunks can account for
    for item in items:
        if isinstance(item, container.Gap):
            assert item.first_chunk == expected, (item, expected)
            assert item.n_chunks >= 1 and item.n_frames >= 0 and item.num_samples >= 0, item
            expected += item.n_chunks
            silence += item.num_samples
        else:
            assert isinstance(item, container.CodeChunk)
            assert item.index is not None and item.index >= expected, (item.index, expected)
            assert item.index == expected or h.version == 0, "a gap must precede an index jump"
            assert item.codes.shape[:2] == (h.streams, h.num_codebooks)
            expected = item.index + 1
            span += max(item.num_frames * h.hop_length, h.segment_stride)
    # A hostile file must not be able to ask for more silence than its size supports, in
    # gaps or in padding to the length it states (SALVAGE_SILENCE_RATIO x what its bytes code).
    limit = container.salvage_silence_limit(h, size)
    assert silence <= limit, (silence, limit)
    if reader.salvaged_samples is not None:
        assert reader.salvaged_samples <= span + limit, (reader.salvaged_samples, span, limit)
    assert all(isinstance(d, str) and "\n" not in d for d in reader.damage)


def _fix_crcs(data: bytes) -> bytes:
    """``data`` with every version 1 header and chunk CRC recomputed where the framing fits.

    Random mutations almost never keep a CRC valid, so without this the fuzzer
    would rarely get past the checksums to the checks behind them.
    """
    if data[:5] != b"ECDC\x01" or len(data) < 8:
        return data
    out = bytearray(data)
    end = 8 + int.from_bytes(out[6:8], "little")
    if end + 4 > len(out):
        return data
    out[end:end + 4] = zlib.crc32(out[:end]).to_bytes(4, "little")
    pos = end + 4
    while pos + 5 <= len(out):
        end = pos + 5 + int.from_bytes(out[pos + 1:pos + 5], "little")
        if end + 4 > len(out):
            break
        out[end:end + 4] = zlib.crc32(out[pos:end]).to_bytes(4, "little")
        pos = end + 4
    return bytes(out)


def _check_reader(data: bytes) -> None:
    normal = _read(data, salvage=False)
    salvaged = _read(data, salvage=True)
    if salvaged is not None:
        _check_salvage(*salvaged, len(data))
    if normal is not None:
        # Whatever the normal reader accepts, salvage reads identically and finds no damage.
        assert salvaged is not None, "salvage refused a file the normal reader accepts"
        n_reader, n_items = normal
        s_reader, s_items = salvaged
        assert n_items == s_items, "salvage read a valid file differently"
        assert s_reader.damage == [], s_reader.damage
        assert (n_reader.total_samples, n_reader.original_samples) == (
            s_reader.total_samples, s_reader.original_samples)



def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    _check_reader(data)
    fixed = _fix_crcs(data)
    if fixed != data:
        _check_reader(fixed)

    # unpack_codes: bits and count from the first bytes, the rest is the packed data.
    if len(data) >= 3:
        bits = data[0] % 18  # 0 and 17 are invalid on purpose
        count = int.from_bytes(data[1:3], "little")
        packed = data[3:]
        try:
            values = bitpack.unpack_codes(packed, bits, count)
        except (EcdcError, ValueError):
            return
        assert values.shape == (count,) and (values >= 0).all() and (values < (1 << bits)).all()
        need = bitpack.packed_size(count, bits)
        again = bitpack.pack_codes(values, bits)
        assert len(again) == need
        # pack(unpack(x)) == x, except the unused bits of the last byte, which pack zeroes.
        if need:
            spare = need * 8 - count * bits
            mask = (0xFF >> spare) if spare else 0xFF
            assert again[:-1] == packed[:need - 1] and again[-1] == packed[need - 1] & mask


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
