"""Salvage mode of the .ecdc reader: recover the intact chunks of a damaged file.

No model is needed: files are written with random codes through EcdcWriter,
damaged in known ways, and the salvaged stream is compared with a clean read.
"""

from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest

from ecdc.bitpack import pack_codes
from ecdc.container import (
    CHUNK_CODES,
    CHUNK_END,
    CodeChunk,
    EcdcHeader,
    EcdcReader,
    Gap,
    StereoMode,
    encode_chunk,
    encode_header,
    read_ecdc,
    write_ecdc,
)
from ecdc.errors import ChecksumError, FormatError

HOP = 320
UNIT = 75  # frames per chunk: ceil(24000 / 320), as the codec's writer does
FRAMES = [UNIT] * 9 + [40]  # 10 code chunks, the last one short
TOTAL = sum(FRAMES) * HOP - 123


def mono_header(num_samples: int | None = None) -> EcdcHeader:
    return EcdcHeader(
        model_name="encodec_24khz", weights_fingerprint=bytes(range(16)), sample_rate=24000,
        channels=1, stereo_mode=StereoMode.MONO, bandwidth=1.5, num_codebooks=2, bits_per_code=10,
        hop_length=HOP, segment_length=0, segment_stride=0, has_scale=False,
        num_samples=num_samples, original_sample_rate=44100, original_channels=1,
    )


def seg_header(num_samples: int | None = None) -> EcdcHeader:
    return EcdcHeader(
        model_name="encodec_48khz", weights_fingerprint=bytes(16), sample_rate=48000, channels=2,
        stereo_mode=StereoMode.JOINT, bandwidth=3.0, num_codebooks=2, bits_per_code=10,
        hop_length=HOP, segment_length=48000, segment_stride=47520, has_scale=True,
        num_samples=num_samples, original_sample_rate=48000, original_channels=2,
    )


def random_chunks(header: EcdcHeader, frames: list[int], seed: int = 0) -> list[CodeChunk]:
    rng = np.random.default_rng(seed)
    return [
        CodeChunk(rng.integers(0, 1024, size=(header.streams, header.num_codebooks, n)),
                  float(np.float32(rng.uniform(0.1, 2))) if header.has_scale else None)
        for n in frames
    ]


def mono_file(known: bool = False) -> tuple[list[CodeChunk], bytes]:
    header = mono_header(TOTAL if known else None)
    chunks = random_chunks(header, FRAMES)
    return chunks, write_ecdc(header, chunks, TOTAL, original_samples=TOTAL * 44100 // 24000)


SEG_TOTAL = 4 * 47520 + 30000  # 5 segments, the last one 30000 + 480 samples
SEG_FRAMES = [150] * 4 + [-(-(SEG_TOTAL - 4 * 47520) // HOP)]


def seg_file(known: bool = True) -> tuple[list[CodeChunk], bytes]:
    header = seg_header(SEG_TOTAL if known else None)
    chunks = random_chunks(header, SEG_FRAMES, seed=3)
    return chunks, write_ecdc(header, chunks, SEG_TOTAL)


def spans(data: bytes) -> list[tuple[int, int, int]]:
    """(type, start, end) of each chunk of an undamaged version 1 file."""
    (body_len,) = struct.unpack_from("<H", data, 6)
    pos = 8 + body_len + 4
    out = []
    while pos < len(data):
        ctype, length = struct.unpack_from("<BI", data, pos)
        out.append((ctype, pos, pos + 9 + length))
        pos += 9 + length
    return out


def salvage(data: bytes) -> tuple[EcdcReader, list]:
    reader = EcdcReader(io.BytesIO(data), salvage=True)
    return reader, list(reader)


def split(items: list) -> tuple[list[CodeChunk], list[Gap]]:
    return [i for i in items if isinstance(i, CodeChunk)], [i for i in items if isinstance(i, Gap)]


def check_gap(gap: Gap, first: int, n: int, n_frames: int, start_frame: int) -> None:
    assert (gap.first_chunk, gap.n_chunks, gap.n_frames) == (first, n, n_frames)
    assert gap.start_frame == start_frame
    assert gap.start_sample == start_frame * HOP and gap.num_samples == n_frames * HOP
    assert gap.start_seconds == pytest.approx(start_frame * HOP / 24000)
    assert gap.duration_seconds == pytest.approx(n_frames * HOP / 24000)


# --------------------------------------------------------------------------- damage to one chunk


def flip_payload(data: bytes, start: int, end: int) -> bytes:
    bad = bytearray(data)
    bad[start + 30] ^= 0x10
    return bytes(bad)


def flip_crc(data: bytes, start: int, end: int) -> bytes:
    bad = bytearray(data)
    bad[end - 2] ^= 0x01
    return bytes(bad)


def huge_length(data: bytes, start: int, end: int) -> bytes:
    bad = bytearray(data)
    struct.pack_into("<I", bad, start + 1, 0xFFFF0000)
    return bytes(bad)


def plausible_length(data: bytes, start: int, end: int) -> bytes:
    # A length that still fits in the file but not the frame count: the reader must
    # not trust it to find the next chunk.
    bad = bytearray(data)
    struct.pack_into("<I", bad, start + 1, 60)
    return bytes(bad)


def delete(data: bytes, start: int, end: int) -> bytes:
    return data[:start] + data[end:]


DAMAGE = {
    "flipped payload byte": (flip_payload, "CRC mismatch"),
    "flipped CRC byte": (flip_crc, "CRC mismatch"),
    "huge length field": (huge_length, "invalid length"),
    "wrong length field": (plausible_length, "length field (60 bytes) does not fit"),
    "chunk deleted": (delete, "missing"),
}


@pytest.mark.parametrize("known", [False, True], ids=["streamed", "known-length"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_middle_chunk_damage_becomes_one_gap(damage: str, known: bool) -> None:
    chunks, data = mono_file(known)
    corrupt, reason = DAMAGE[damage]
    _, start, end = spans(data)[5]
    bad = corrupt(data, start, end)
    if damage != "chunk deleted":
        with pytest.raises(FormatError):
            read_ecdc(bad)  # the normal reader still refuses it

    reader, items = salvage(bad)
    got, gaps = split(items)
    assert got == chunks[:5] + chunks[6:]
    assert [c.index for c in got] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert items[5] is gaps[0] and len(gaps) == 1
    check_gap(gaps[0], first=5, n=1, n_frames=UNIT, start_frame=5 * UNIT)
    assert reader.gaps == gaps
    assert reader.total_samples == TOTAL
    assert reader.original_samples == TOTAL * 44100 // 24000
    assert reader.chunks_read == 9 and reader.chunks_expected == 10
    assert len(reader.damage) == 1
    text = reader.damage[0]
    assert text == gaps[0].description
    assert text.startswith("code chunk 5 (5.00-6.00 s): ") and text.endswith("replaced by silence")
    assert reason in text


def test_clean_file_salvages_identically() -> None:
    for known in (False, True):
        chunks, data = mono_file(known)
        reader, items = salvage(data)
        assert items == chunks and reader.damage == [] and reader.gaps == []
        assert reader.total_samples == TOTAL and reader.chunks_expected == 10
    chunks, data = seg_file()
    reader, items = salvage(data)
    assert items == chunks and reader.damage == []


def test_gap_at_the_start_is_sized_from_the_next_chunk() -> None:
    chunks, data = mono_file()
    for n_lost in (1, 3):
        bad = data
        for _, start, end in reversed(spans(data)[:n_lost]):
            bad = flip_payload(bad, start, end)
        reader, items = salvage(bad)
        got, (gap,) = split(items)
        assert items[0] is gap and got == chunks[n_lost:]
        check_gap(gap, first=0, n=n_lost, n_frames=n_lost * UNIT, start_frame=0)


def test_everything_but_the_last_chunk_lost_is_sized_from_the_end_marker() -> None:
    chunks, data = mono_file()
    s = spans(data)
    bad = data[:s[0][1]] + data[s[9][1]:]
    reader, items = salvage(bad)
    (gap, last) = items
    assert last == chunks[9]
    # The only intact chunk is the short last one; the end marker's length sizes the gap.
    check_gap(gap, first=0, n=9, n_frames=-(-TOTAL // HOP) - 40, start_frame=0)
    assert gap.exact


def test_several_damaged_spots() -> None:
    chunks, data = mono_file()
    s = spans(data)
    bad = flip_payload(data, s[7][1], s[7][2])
    bad = huge_length(bad, s[2][1], s[2][2])
    reader, items = salvage(bad)
    got, gaps = split(items)
    assert got == [c for i, c in enumerate(chunks) if i not in (2, 7)]
    check_gap(gaps[0], first=2, n=1, n_frames=UNIT, start_frame=2 * UNIT)
    check_gap(gaps[1], first=7, n=1, n_frames=UNIT, start_frame=7 * UNIT)
    assert [type(i).__name__ for i in items].index("Gap") == 2
    assert len(reader.damage) == 2


def test_consecutive_damaged_chunks_are_one_gap() -> None:
    chunks, data = mono_file()
    s = spans(data)
    bad = data
    for k in (6, 5, 4):
        bad = flip_payload(bad, s[k][1], s[k][2])
    reader, items = salvage(bad)
    got, (gap,) = split(items)
    assert got == chunks[:4] + chunks[7:]
    check_gap(gap, first=4, n=3, n_frames=3 * UNIT, start_frame=4 * UNIT)
    assert reader.damage[0].startswith("code chunks 4-6 (4.00-7.00 s): CRC mismatch")


def test_zeroed_stretch_across_chunks() -> None:
    # A run of zero bytes from the middle of chunk 3 to the middle of chunk 6.
    chunks, data = mono_file()
    s = spans(data)
    a, b = s[3][1] + 50, s[6][1] + 40
    bad = data[:a] + bytes(b - a) + data[b:]
    reader, items = salvage(bad)
    got, (gap,) = split(items)
    assert got == chunks[:3] + chunks[7:]
    check_gap(gap, first=3, n=4, n_frames=4 * UNIT, start_frame=3 * UNIT)


def test_truncation_with_known_length_is_reported_not_filled() -> None:
    # The header's length is only a claim: with nothing intact after the loss, the end
    # is reported as lost and not filled with silence (test_claims.py: a week of it).
    chunks, data = mono_file(known=True)
    s = spans(data)
    for cut, n_intact in ((s[7][1] + 20, 7), (s[9][1] + 5, 9), (s[-1][1], 10), (s[7][1], 7)):
        reader, items = salvage(data[:cut])
        assert items == chunks[:n_intact] and reader.gaps == []
        assert reader.total_samples is None and reader.salvaged_samples is None
        assert any("without an intact end marker (truncated)" in d for d in reader.damage)
        unfilled = [d for d in reader.damage if "not replaced by silence" in d]
        if n_intact == 10:
            assert unfilled == []  # only the end marker is missing: nothing lost
            continue
        lost = (TOTAL - n_intact * UNIT * HOP) / 24000
        assert len(unfilled) == 1 and f"the last {lost:.2f} s are lost" in unfilled[0]


def test_truncation_of_a_streamed_file_reports_unknown_loss() -> None:
    chunks, data = mono_file(known=False)
    s = spans(data)
    reader, items = salvage(data[:s[7][1] + 20])
    assert items == chunks[:7]
    assert reader.total_samples is None and reader.gaps == []
    assert any("unknown" in d for d in reader.damage)


def test_damaged_end_marker() -> None:
    chunks, data = mono_file()
    s = spans(data)
    bad = flip_crc(data, s[-1][1], s[-1][2])
    reader, items = salvage(bad)
    assert items == chunks
    assert reader.total_samples is None and reader.chunks_expected is None
    assert any("end marker" in d and "CRC mismatch" in d for d in reader.damage)


def test_lost_last_chunk_is_sized_from_the_end_marker() -> None:
    chunks, data = mono_file()
    _, start, end = spans(data)[9]
    reader, items = salvage(delete(data, start, end))
    got, (gap,) = split(items)
    assert got == chunks[:9]
    check_gap(gap, first=9, n=1, n_frames=40, start_frame=9 * UNIT)
    assert gap.exact and reader.total_samples == TOTAL


def test_garbage_between_chunks_loses_nothing() -> None:
    chunks, data = mono_file()
    _, start, _ = spans(data)[4]
    bad = data[:start] + b"\x00garbage C\x00\x00\x00\x00E" + data[start:]
    reader, items = salvage(bad)
    assert items == chunks and reader.gaps == []
    assert len(reader.damage) == 1 and "no audio lost" in reader.damage[0]


def test_duplicated_and_swapped_chunks() -> None:
    chunks, data = mono_file()
    s = spans(data)
    dup = data[:s[4][2]] + data[s[4][1]:s[4][2]] + data[s[4][2]:]
    reader, items = salvage(dup)
    assert items == chunks
    assert len(reader.damage) == 1 and "code chunk 4" in reader.damage[0] and "ignored" in reader.damage[0]
    # Swapped 3 and 4: 4 arrives first (3 becomes a gap), then 3 is too late.
    swapped = data[:s[3][1]] + data[s[4][1]:s[4][2]] + data[s[3][1]:s[3][2]] + data[s[5][1]:]
    reader, items = salvage(swapped)
    got, (gap,) = split(items)
    assert got == chunks[:3] + chunks[4:]
    check_gap(gap, first=3, n=1, n_frames=UNIT, start_frame=3 * UNIT)


def test_unknown_chunks_are_still_skipped() -> None:
    chunks, data = mono_file()
    s = spans(data)
    extra = encode_chunk(0x58, b"optional future data")
    spliced = data[:s[2][1]] + extra + data[s[2][1]:]
    reader, items = salvage(spliced)
    assert items == chunks and reader.damage == []
    # A damaged unknown chunk costs nothing either.
    bad = bytearray(spliced)
    bad[s[2][1] + 8] ^= 1
    reader, items = salvage(bytes(bad))
    assert items == chunks and "no audio lost" in reader.damage[0]


def test_damaged_header_is_still_an_error() -> None:
    _, data = mono_file()
    bad = bytearray(data)
    bad[20] ^= 1
    with pytest.raises(ChecksumError):
        EcdcReader(io.BytesIO(bytes(bad)), salvage=True)
    with pytest.raises(FormatError):
        EcdcReader(io.BytesIO(data[:30]), salvage=True)


# --------------------------------------------------------------------------- segmented models


@pytest.mark.parametrize("lost", [0, 2, 4])
def test_segmented_gap_is_one_segment(lost: int) -> None:
    chunks, data = seg_file()
    _, start, end = spans(data)[lost]
    reader, items = salvage(flip_payload(data, start, end))
    got, (gap,) = split(items)
    assert got == chunks[:lost] + chunks[lost + 1:]
    assert (gap.first_chunk, gap.n_chunks, gap.n_frames) == (lost, 1, SEG_FRAMES[lost])
    assert gap.exact
    assert gap.start_sample == lost * 47520
    assert gap.num_samples == (47520 if lost < 4 else SEG_TOTAL - 4 * 47520)


def test_segmented_truncation_with_known_length() -> None:
    chunks, data = seg_file(known=True)
    s = spans(data)
    reader, items = salvage(data[:s[2][1] + 17])
    assert items == chunks[:2] and reader.gaps == [] and reader.salvaged_samples is None
    # Two segments recovered, up to the end of the second: 47520 + 48000 samples.
    lost = (SEG_TOTAL - 47520 - 48000) / 48000
    assert any(f"the last {lost:.2f} s are lost and not replaced" in d for d in reader.damage)


# --------------------------------------------------------------------------- streams and limits


class Pipe(io.RawIOBase):
    """Non-seekable, returns at most a few bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), 5, len(self._data) - self._pos)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def test_salvage_through_a_pipe() -> None:
    chunks, data = mono_file()
    _, start, end = spans(data)[5]
    reader = EcdcReader(Pipe(flip_payload(data, start, end)), salvage=True)
    got, gaps = split(list(reader))
    assert got == chunks[:5] + chunks[6:] and len(gaps) == 1


def test_bytes_after_the_end_marker_are_left_in_a_seekable_file() -> None:
    chunks, data = mono_file()
    _, start, end = spans(data)[5]
    f = io.BytesIO(flip_payload(data, start, end) + b"next stream")
    list(EcdcReader(f, salvage=True))
    assert f.read() == b"next stream"
    f = io.BytesIO(data + b"next stream")  # undamaged: no read-ahead at all
    list(EcdcReader(f, salvage=True))
    assert f.read() == b"next stream"


def crafted(header: EcdcHeader, parts: list[bytes]) -> bytes:
    return encode_header(header) + b"".join(parts)


def code_payload(index: int, codes: np.ndarray) -> bytes:
    return struct.pack("<II", index, codes.shape[-1]) + pack_codes(codes.transpose(2, 0, 1), 10)


def test_implausible_index_jump_is_ignored() -> None:
    header = mono_header()
    codes = np.zeros((1, 2, UNIT), dtype=np.int64)
    parts = [
        encode_chunk(CHUNK_CODES, code_payload(0, codes)),
        encode_chunk(CHUNK_CODES, code_payload(0xFFFFFFF0, codes)),  # CRC-valid, absurd index
        encode_chunk(CHUNK_CODES, code_payload(1, codes)),
        encode_chunk(CHUNK_END, struct.pack("<QI", 2 * UNIT * HOP, 2)),
    ]
    reader, items = salvage(crafted(header, parts))
    assert [i.index for i in items] == [0, 1]
    assert any("implausibly far" in d for d in reader.damage)
    # A week of audio is the most a gap may claim without a known length.
    week_chunks = 7 * 24 * 3600 * 24000 // (UNIT * HOP)
    parts[1] = encode_chunk(CHUNK_CODES, code_payload(week_chunks + 5, codes))
    reader, items = salvage(crafted(header, parts))
    assert [i.index for i in items] == [0, 1]
    parts[1] = encode_chunk(CHUNK_CODES, code_payload(1000, codes))
    # Plausible, but 999 s of silence from a 500-byte file: only if the caller allows it.
    reader, items = salvage(crafted(header, parts))
    assert [i.index for i in items] == [0] and any("recovery stops" in d for d in reader.damage)
    reader = EcdcReader(io.BytesIO(crafted(header, parts)), salvage=True, max_silence=float("inf"))
    got, (gap,) = split(list(reader))
    assert [c.index for c in got] == [0, 1000] and gap.n_chunks == 999


def test_absurd_end_marker_is_ignored() -> None:
    header = mono_header()
    codes = np.zeros((1, 2, 3), dtype=np.int64)
    parts = [encode_chunk(CHUNK_CODES, code_payload(0, codes)),
             encode_chunk(CHUNK_END, struct.pack("<QI", 2**63, 2**31))]
    reader, items = salvage(crafted(header, parts))
    assert len(items) == 1 and reader.total_samples is None
    assert sum(g.num_samples for g in reader.gaps) == 0


def test_hostile_candidates_scan_in_linear_time() -> None:
    # Every 13 bytes a plausible code chunk header claiming ~1 MiB, with enough bytes
    # behind it that each CRC would have to be computed: quadratic without the budget.
    header = mono_header()
    n_frames = 400_000  # 2 codebooks x 10 bits: 1_000_000 packed bytes
    length = 8 + 1_000_000
    cand = struct.pack("<BIII", CHUNK_CODES, length, 0, n_frames)
    blob = cand * (2_500_000 // len(cand))
    data = encode_header(header) + b"\xff" + blob  # \xff: the first chunk is damaged
    t0 = time.perf_counter()
    reader, items = salvage(data)
    assert time.perf_counter() - t0 < 20
    assert items == [] and reader.damage


# --------------------------------------------------------------------------- version 0


def v0_file(model: str, length: int, n_q: int = 2) -> tuple[bytes, list[CodeChunk]]:
    rng = np.random.default_rng(5)
    seg, stride, scaled = (48000, 47520, True) if model == "encodec_48khz" else (length, length, False)
    payload, chunks = b"", []
    for offset in range(0, length, stride):
        frames = -(-min(length - offset, seg) // HOP)
        codes = rng.integers(0, 1024, size=(1, n_q, frames))
        if scaled:
            payload += struct.pack(">f", 0.5)
        payload += pack_codes(codes[0].T, 10)
        chunks.append(CodeChunk(codes, 0.5 if scaled else None))
    meta = json.dumps({"m": model, "al": length, "nc": n_q, "lm": False}).encode()
    return struct.pack(">4sBI", b"ECDC", 0, len(meta)) + meta + payload, chunks


def test_v0_truncation_salvage() -> None:
    length = 3 * 47520 + 1000
    data, chunks = v0_file("encodec_48khz", length)
    header_len = 9 + int.from_bytes(data[5:9], "big")
    seg_bytes = 4 + -(-150 * 2 * 10 // 8)
    reader, items = salvage(data[:header_len + 2 * seg_bytes + 10])
    # The intact segments; the rest is reported, not filled (only the header claims it).
    assert items == chunks[:2] and reader.gaps == []
    assert reader.total_samples is None and reader.salvaged_samples is None
    lost = (length - 47520 - 48000) / 48000
    assert any(f"the last {lost:.2f} s are lost and not replaced" in d for d in reader.damage)
    # Unsegmented (24 kHz): handed out in 80-frame pieces; the rest is reported.
    data, (whole,) = v0_file("encodec_24khz", 72000)  # 225 frames: pieces of 80, 80, 65
    header_len = 9 + int.from_bytes(data[5:9], "big")
    reader, items = salvage(data[:header_len + 2 * 200 + 7])  # 80 frames x 2 x 10 bits = 200 bytes
    got, gaps = split(items)
    assert len(got) == 2 and gaps == []
    np.testing.assert_array_equal(np.concatenate([c.codes for c in got], axis=2), whole.codes[..., :160])
    lost = (72000 - 160 * HOP) / 24000
    assert any(f"the last {lost:.2f} s are lost and not replaced" in d for d in reader.damage)


def test_v0_invalid_scale() -> None:
    data, chunks = v0_file("encodec_48khz", 2 * 47520 + 10)
    header_len = 9 + int.from_bytes(data[5:9], "big")
    seg_bytes = 4 + -(-150 * 2 * 10 // 8)
    bad = bytearray(data)
    bad[header_len + seg_bytes:header_len + seg_bytes + 4] = struct.pack(">f", float("nan"))
    with pytest.raises(FormatError, match="invalid scale"):
        read_ecdc(bytes(bad))
    reader, items = salvage(bytes(bad))
    got, (gap,) = split(items)
    assert got == [chunks[0], chunks[2]] and items[1] is gap
    assert (gap.first_chunk, gap.n_chunks, gap.start_sample, gap.num_samples) == (1, 1, 47520, 47520)

