"""What must hold whenever the .ecdc reader reads anything, and the CRC fixer that gets there.

Shared by the atheris target (fuzz/fuzz_container.py) and the property-based tests
(tests/test_fuzz.py), so that both check the same invariants.  Imports ``ecdc.container``
only (no torch): the atheris target loads it without ``ecdc/__init__.py``, instrumented,
before importing this.
"""

from __future__ import annotations

import io
import zlib

from ecdc.container import CodeChunk, EcdcReader, Gap, salvage_silence_limit
from ecdc.container.tags import tag_problem
from ecdc.errors import EcdcError

#: A complete read: the reader (its header, damage, lengths) and everything it yielded.
Read = tuple[EcdcReader, list]


def read(data: bytes, salvage: bool) -> Read | None:
    """Read ``data`` fully; None if refused with an EcdcError.  Anything else propagates."""
    try:
        reader = EcdcReader(io.BytesIO(data), salvage=salvage)
        return reader, list(reader)
    except EcdcError:
        return None


def check_salvage(reader: EcdcReader, items: list, size: int) -> None:
    """Chunks and gaps tile the chunk indices in order; silence is bounded by the file's size."""
    h = reader.header
    expected = 0
    silence = 0
    span = 0  # samples the intact chunks can account for
    for item in items:
        if isinstance(item, Gap):
            assert item.first_chunk == expected, (item, expected)
            assert item.n_chunks >= 1 and item.n_frames >= 0 and item.num_samples >= 0, item
            expected += item.n_chunks
            silence += item.num_samples
        else:
            assert isinstance(item, CodeChunk)
            assert item.index == expected, ("a gap must precede an index jump", item.index, expected)
            assert item.codes.shape[:2] == (h.streams, h.num_codebooks)
            expected += 1
            span += max(item.num_frames * h.hop_length, h.segment_stride)
    # A hostile file must not be able to ask for more silence than its size supports, in
    # gaps or in padding to the length it states (SALVAGE_SILENCE_RATIO x what its bytes code).
    limit = salvage_silence_limit(h, size)
    assert silence <= limit, (silence, limit)
    if reader.salvaged_samples is not None:
        assert reader.salvaged_samples <= span + limit, (reader.salvaged_samples, span, limit)
    assert all(isinstance(d, str) and d and "\n" not in d for d in reader.damage), reader.damage


def check_tags(reader: EcdcReader) -> None:
    """Whatever tags a reader hands out are valid ones: bounded, UTF-8, no control characters."""
    assert isinstance(reader.tags, dict) and len(reader.tags) <= 32, reader.tags
    for key, value in reader.tags.items():
        assert tag_problem(key, value) is None, (key, value)


def check_reads(data: bytes) -> tuple[Read | None, Read | None]:
    """Read ``data`` normally and with salvage, check each and what must hold between them.

    Whatever the normal reader accepts, salvage reads identically and finds no damage.
    Returns (normal, salvaged), each None where that reader refused the file.
    """
    normal = read(data, salvage=False)
    salvaged = read(data, salvage=True)
    if salvaged is not None:
        check_salvage(*salvaged, len(data))
        check_tags(salvaged[0])
    if normal is not None:
        check_tags(normal[0])
        assert salvaged is not None, "salvage refused a file the normal reader accepts"
        n_reader, n_items = normal
        s_reader, s_items = salvaged
        assert n_items == s_items, "salvage read a valid file differently"
        assert s_reader.damage == [], s_reader.damage
        assert (n_reader.total_samples, n_reader.original_samples) == (
            s_reader.total_samples, s_reader.original_samples)
        assert n_reader.tags == s_reader.tags, "salvage read a valid file's tags differently"
    return normal, salvaged


def fix_crcs(data: bytes) -> bytes:
    """``data`` with every version 1 header and chunk CRC recomputed where the framing fits.

    Random mutations almost never keep a CRC valid, so without this the fuzzers
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
