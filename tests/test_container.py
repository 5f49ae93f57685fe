"""Tests for ecdc.container: the version 1 format, Meta's version 0, and hostile input."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecdc import container
from ecdc.bitpack import pack_codes
from ecdc.container import (
    CHUNK_CODES,
    CHUNK_END,
    MAX_CHUNK_PAYLOAD,
    CodeChunk,
    EcdcHeader,
    EcdcReader,
    EcdcWriter,
    StereoMode,
    encode_chunk,
    encode_header,
    read_ecdc,
    write_ecdc,
)
from ecdc.errors import (
    ChecksumError,
    EcdcError,
    FormatError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)

# --------------------------------------------------------------------------- helpers


def make_header(**overrides: object) -> EcdcHeader:
    fields: dict = dict(
        model_name="encodec_48khz",
        weights_fingerprint=bytes(range(16)),
        sample_rate=48000,
        channels=2,
        stereo_mode=StereoMode.JOINT,
        bandwidth=3.0,
        num_codebooks=2,
        bits_per_code=10,
        hop_length=320,
        segment_length=48000,
        segment_stride=47520,
        has_scale=True,
        num_samples=None,
        original_sample_rate=44100,
        original_channels=2,
    )
    fields.update(overrides)
    return EcdcHeader(**fields)


def random_chunks(header: EcdcHeader, frames: list[int], seed: int = 0) -> list[CodeChunk]:
    rng = np.random.default_rng(seed)
    out = []
    for n in frames:
        codes = rng.integers(0, 1 << header.bits_per_code, size=(header.streams, header.num_codebooks, n))
        scale = float(np.float32(rng.uniform(0.001, 2.0))) if header.has_scale else None
        out.append(CodeChunk(codes, scale))
    return out


def small_file() -> tuple[EcdcHeader, list[CodeChunk], int, bytes]:
    header = make_header()
    chunks = random_chunks(header, [5, 3, 2])
    total = 9 * 320
    return header, chunks, total, write_ecdc(header, chunks, total)


def chunk_spans(data: bytes) -> list[tuple[int, int, int]]:
    """(type, start, end) of each chunk of a version 1 file, parsed independently of the reader."""
    (body_len,) = struct.unpack_from("<H", data, 6)
    pos = 8 + body_len + 4
    spans = []
    while pos < len(data):
        ctype, length = struct.unpack_from("<BI", data, pos)
        end = pos + 5 + length + 4
        spans.append((ctype, pos, end))
        pos = end
    return spans


class NonSeekable(io.RawIOBase):
    """A pipe-like file object: seek/tell raise, reads return a few bytes at a time."""

    def __init__(self, data: bytes = b"", max_read: int = 7) -> None:
        self._data = data
        self._pos = 0
        self._max = max_read
        self.written = bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *args: object) -> int:
        raise OSError("not seekable")

    def tell(self) -> int:
        raise OSError("not seekable")

    def read(self, n: int = -1) -> bytes:
        n = self._max if n < 0 else min(n, self._max)
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def write(self, b: bytes) -> int:  # type: ignore[override]
        n = min(len(b), 5)  # partial writes, as raw file objects may do
        self.written += bytes(b[:n])
        return n


# --------------------------------------------------------------------------- strategies


@st.composite
def headers(draw: st.DrawFn) -> EcdcHeader:
    mode = draw(st.sampled_from(list(StereoMode)))
    if mode == StereoMode.MONO:
        channels, orig = 1, 1
    elif mode == StereoMode.JOINT:
        channels, orig = draw(st.integers(2, 16)), draw(st.integers(1, 1024))
    elif mode == StereoMode.DOWNMIX:
        channels, orig = 1, draw(st.integers(2, 1024))
    else:
        channels, orig = 1, 2
    segmented = draw(st.booleans())
    seg_len = draw(st.integers(1, 1 << 24)) if segmented else 0
    stride = draw(st.integers(1, seg_len)) if segmented else 0
    name = draw(st.text(st.characters(codec="utf-8", categories=("L", "N", "P")), min_size=1,
                        max_size=60))
    return EcdcHeader(
        model_name=name,
        weights_fingerprint=draw(st.binary(min_size=16, max_size=16)),
        sample_rate=draw(st.integers(1, 1_000_000)),
        channels=channels,
        stereo_mode=mode,
        bandwidth=draw(st.integers(1, 2**32 - 1)) / 1000,
        num_codebooks=draw(st.integers(1, 64)),
        bits_per_code=draw(st.integers(1, 16)),
        hop_length=draw(st.integers(1, 1 << 16)),
        segment_length=seg_len,
        segment_stride=stride,
        has_scale=draw(st.booleans()),
        num_samples=draw(st.none() | st.integers(0, 2**64 - 2)),
        original_sample_rate=draw(st.integers(1000, 1_000_000)),
        original_channels=orig,
    )


@st.composite
def files(draw: st.DrawFn) -> tuple[EcdcHeader, list[CodeChunk], int]:
    header = draw(headers())
    # A segmented chunk is one segment: at most ceil(segment_length / hop) frames.
    most = min(12, header.segment_frames) if header.segmented else 12
    frames = draw(st.lists(st.integers(1, most), max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    chunks = []
    for n in frames:
        codes = rng.integers(0, 1 << header.bits_per_code,
                             size=(header.streams, header.num_codebooks, n))
        scale = draw(st.floats(0, 1e6, width=32)) if header.has_scale else None
        chunks.append(CodeChunk(codes, scale))
    total = draw(st.integers(0, sum(frames) * header.hop_length))
    header = dataclasses.replace(header, num_samples=draw(st.sampled_from([None, total])))
    return header, chunks, total


# --------------------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files())
def test_round_trip(case: tuple[EcdcHeader, list[CodeChunk], int]) -> None:
    header, chunks, total = case
    data = write_ecdc(header, chunks, total)
    got_header, got_chunks, got_total = read_ecdc(data)
    assert got_header == header
    assert got_header.version == 1
    assert got_total == total
    assert got_chunks == chunks
    for chunk in got_chunks:
        assert chunk.codes.dtype == np.int64
        assert chunk.codes.shape[:2] == (header.streams, header.num_codebooks)
    assert len(data) == len(encode_header(header)) + sum(
        5 + 8 + (4 if header.has_scale else 0)
        + math.ceil(c.codes.size * header.bits_per_code / 8) + 4
        for c in chunks
    ) + 5 + 20 + 4


def test_dual_two_streams_layout() -> None:
    header = make_header(
        model_name="encodec_24khz", sample_rate=24000, channels=1, stereo_mode=StereoMode.DUAL,
        segment_length=0, segment_stride=0, has_scale=False, original_channels=2,
        bits_per_code=4, num_codebooks=3,
    )
    assert header.streams == 2
    assert header.frame_rate == 75.0
    codes = np.arange(2 * 3 * 2).reshape(2, 3, 2) % 16  # [stream, codebook, frame]
    data = write_ecdc(header, [CodeChunk(codes)], 640)
    _, chunks, _ = read_ecdc(data)
    np.testing.assert_array_equal(chunks[0].codes, codes)
    # In the file the order is frame, stream, codebook.
    spans = chunk_spans(data)
    _, start, end = spans[0]
    packed = data[start + 5 + 8:end - 4]
    assert packed == pack_codes(codes.transpose(2, 0, 1), 4)


def test_header_derived_fields() -> None:
    h = make_header()
    assert h.frame_rate == 150.0
    assert h.streams == 1
    assert h.segmented
    assert h.bandwidth_bps == 3000


def test_fixed_header_offsets() -> None:
    h = make_header(num_samples=12345)
    data = encode_header(h)
    assert data[:4] == b"ECDC" and data[4] == 1 and data[5] == 0
    body_len = struct.unpack_from("<H", data, 6)[0]
    assert body_len == 56 + len(b"encodec_48khz") and len(data) == 8 + body_len + 4
    assert struct.unpack_from("<IIIIIIQ", data, 8) == (48000, 320, 48000, 47520, 3000, 44100, 12345)
    assert data[40:56] == bytes(range(16))
    assert struct.unpack_from("<HBBBBBB", data, 56) == (2, 2, 1, 2, 10, 1, 13)
    assert data[64:77] == b"encodec_48khz"
    assert struct.unpack_from("<I", data, 77)[0] == zlib.crc32(data[:77])


# --------------------------------------------------------------------------- streaming


def test_streaming_through_non_seekable_objects() -> None:
    header, chunks, total, expected = small_file()
    sink = NonSeekable()
    writer = EcdcWriter(sink, header)
    for c in chunks:
        writer.write_chunk(c)
    writer.finish(total)
    assert bytes(sink.written) == expected
    reader = EcdcReader(NonSeekable(expected, max_read=3))
    assert reader.header == header
    assert reader.total_samples is None
    assert list(reader) == chunks
    assert reader.total_samples == total


def test_streaming_through_an_os_pipe() -> None:
    header, chunks, total, _ = small_file()
    r, w = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(w, "wb", buffering=0) as f:
                writer = EcdcWriter(f, header)
                for c in chunks:
                    writer.write_chunk(c)
                writer.finish(total)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=produce)
    t.start()
    with os.fdopen(r, "rb", buffering=0) as f:
        reader = EcdcReader(f)
        got = list(reader)
    t.join()
    assert not errors
    assert got == chunks and reader.total_samples == total


def test_reader_stops_at_end_marker() -> None:
    _, chunks, total, data = small_file()
    f = io.BytesIO(data + b"trailing bytes")
    reader = EcdcReader(f)
    assert list(reader) == chunks
    assert f.read() == b"trailing bytes"


def test_empty_stream() -> None:
    header = make_header(num_samples=0)
    data = write_ecdc(header, [], 0)
    h, chunks, total = read_ecdc(data)
    assert h == header and chunks == [] and total == 0


# --------------------------------------------------------------------------- damage


def test_truncation_at_every_offset() -> None:
    *_, data = small_file()
    for i in range(len(data)):
        with pytest.raises(TruncatedError):
            read_ecdc(data[:i])


def test_truncation_message_mentions_missing_end_marker() -> None:
    *_, data = small_file()
    end_start = chunk_spans(data)[-1][1]
    with pytest.raises(TruncatedError, match="without an end marker"):
        read_ecdc(data[:end_start])


def test_flipped_byte_in_chunk_is_a_checksum_error_naming_it() -> None:
    _, chunks, _, data = small_file()
    spans = chunk_spans(data)
    _, start, end = spans[1]
    bad = bytearray(data)
    bad[start + 20] ^= 0x40
    reader = EcdcReader(io.BytesIO(bytes(bad)))
    it = iter(reader)
    assert next(it) == chunks[0]
    with pytest.raises(ChecksumError, match=r"code chunk 1 \(audio from 0\.99 s"):
        next(it)


def test_flipped_byte_in_header_is_a_checksum_error() -> None:
    *_, data = small_file()
    bad = bytearray(data)
    bad[30] ^= 1
    with pytest.raises(ChecksumError, match="header"):
        read_ecdc(bytes(bad))


def test_every_single_byte_flip_is_detected() -> None:
    *_, data = small_file()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0xA5
        with pytest.raises(FormatError):
            read_ecdc(bytes(bad))


def test_dropped_middle_chunk_is_detected() -> None:
    *_, data = small_file()
    _, s, e = chunk_spans(data)[1]
    with pytest.raises(FormatError, match="missing"):
        read_ecdc(data[:s] + data[e:])


def test_dropped_last_chunk_is_detected() -> None:
    *_, data = small_file()
    _, s, e = chunk_spans(data)[2]
    with pytest.raises(FormatError, match="end marker counts 3 code chunks but 2"):
        read_ecdc(data[:s] + data[e:])


def test_swapped_chunks_are_detected() -> None:
    *_, data = small_file()
    spans = chunk_spans(data)
    a, b = spans[0], spans[1]
    swapped = data[:a[1]] + data[b[1]:b[2]] + data[a[1]:a[2]] + data[b[2]:]
    with pytest.raises(FormatError, match="out of order"):
        read_ecdc(swapped)


def test_end_marker_must_agree_with_header_and_frames() -> None:
    header = make_header(num_samples=1000)
    chunks = random_chunks(header, [4])
    head = encode_header(header)
    body = head + b"".join(
        encode_chunk(CHUNK_CODES, struct.pack("<IIf", 0, 4, c.scale)
                     + pack_codes(c.codes.transpose(2, 0, 1), 10))
        for c in chunks
    )
    with pytest.raises(FormatError, match="header says 1000"):
        read_ecdc(body + encode_chunk(CHUNK_END, struct.pack("<QI", 999, 1)))
    header2 = make_header()
    head2 = encode_header(header2)
    body2 = head2 + body[len(head):]
    with pytest.raises(FormatError, match="cover at most 1280"):
        read_ecdc(body2 + encode_chunk(CHUNK_END, struct.pack("<QI", 1281, 1)))
    assert read_ecdc(body2 + encode_chunk(CHUNK_END, struct.pack("<QI", 1280, 1)))[2] == 1280


# --------------------------------------------------------------------------- versioning


def rebuild_header(data: bytes, major: int | None = None, minor: int | None = None,
                   extra: bytes = b"", flags: int | None = None) -> bytes:
    """Re-emit the header of ``data`` with changed version bytes / appended fields and a valid CRC."""
    (body_len,) = struct.unpack_from("<H", data, 6)
    body = bytearray(data[8:8 + body_len])
    if flags is not None:
        body[62 - 8] = flags
    body += extra
    prefix = struct.pack("<4sBBH", b"ECDC", data[4] if major is None else major,
                         data[5] if minor is None else minor, len(body))
    head = prefix + bytes(body)
    return head + struct.pack("<I", zlib.crc32(head)) + data[8 + body_len + 4:]


@pytest.mark.parametrize("major", [2, 7, 255])
def test_newer_major_version_is_refused_clearly(major: int) -> None:
    *_, data = small_file()
    newer = rebuild_header(data, major=major)
    with pytest.raises(UnsupportedVersionError) as info:
        EcdcReader(io.BytesIO(newer))
    msg = str(info.value)
    assert f"version {major}" in msg and "versions 0 and 1" in msg and "upgrade ecdc" in msg
    # Refused from the first 5 bytes alone, whatever follows.
    with pytest.raises(UnsupportedVersionError):
        EcdcReader(io.BytesIO(b"ECDC" + bytes([major])))


def test_newer_minor_version_with_appended_header_fields_is_read() -> None:
    header, chunks, total, data = small_file()
    # Version 1.1's channel mask (0: the default layout) comes first, then the unknown fields.
    newer = rebuild_header(data, minor=9, extra=bytes(4) + b"future fields \x00\x01\x02")
    assert read_ecdc(newer) == (header, chunks, total)


def test_unknown_header_flag_is_refused() -> None:
    *_, data = small_file()
    with pytest.raises(UnsupportedFeatureError, match="flags"):
        read_ecdc(rebuild_header(data, flags=0x05))  # bit 1 (0x02) is version 1.1's SEPARATE


def test_unknown_chunk_types_are_skipped() -> None:
    header, chunks, total, data = small_file()
    spans = chunk_spans(data)
    extra1 = encode_chunk(0x58, b"an ancillary chunk from the future")
    extra2 = encode_chunk(0x00, b"")
    _, s1, _ = spans[1]
    _, s_end, _ = spans[-1]
    spliced = data[:s1] + extra1 + data[s1:s_end] + extra2 + data[s_end:]
    assert read_ecdc(spliced) == (header, chunks, total)
    # Their CRC is still checked.
    bad = bytearray(spliced)
    bad[s1 + 10] ^= 1
    with pytest.raises(ChecksumError, match="type 0x58"):
        read_ecdc(bytes(bad))


def test_end_marker_may_grow_in_minor_versions() -> None:
    header, chunks, total, data = small_file()
    _, s_end, _ = chunk_spans(data)[-1]
    longer = data[:s_end] + encode_chunk(CHUNK_END, struct.pack("<QI", total, 3) + b"more")
    assert read_ecdc(longer) == (header, chunks, total)


# --------------------------------------------------------------------------- hostile input


def test_not_ecdc() -> None:
    with pytest.raises(FormatError, match="not an .ecdc"):
        read_ecdc(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    with pytest.raises(FormatError, match="not an .ecdc"):
        read_ecdc(b"ab")
    with pytest.raises(TruncatedError, match="empty"):
        read_ecdc(b"")


def test_hostile_lengths_fail_fast() -> None:
    cases = [
        # v0 JSON length 4 GiB in a 20-byte file.
        b"ECDC\x00\xff\xff\xff\xff" + b"{" * 11,
        # v1 header body length 65535.
        b"ECDC\x01\x00\xff\xff" + bytes(12),
        # v1 header body shorter than version 1 needs (CRC valid).
        (lambda h: h + struct.pack("<I", zlib.crc32(h)))(b"ECDC\x01\x00\x04\x00abcd"),
    ]
    header = make_header()
    head = encode_header(header)
    # Chunk claiming 4 GiB of payload.
    cases.append(head + struct.pack("<BI", CHUNK_CODES, 0xFFFFFFFF) + bytes(8))
    # Chunk claiming the maximum size with nothing behind it.
    cases.append(head + struct.pack("<BI", CHUNK_CODES, MAX_CHUNK_PAYLOAD) + bytes(8))
    # Code chunk claiming 2**32-1 frames with a 12-byte payload (CRC valid).
    cases.append(head + encode_chunk(CHUNK_CODES, struct.pack("<IIf", 0, 0xFFFFFFFF, 1.0)))
    # Code chunk claiming zero frames.
    cases.append(head + encode_chunk(CHUNK_CODES, struct.pack("<IIf", 0, 0, 1.0)))
    # End marker claiming 2**64-2 samples with no frames.
    cases.append(head + encode_chunk(CHUNK_END, struct.pack("<QI", 2**64 - 2, 0)))
    # v0 24 kHz with an absurd audio length and almost no data.
    cases.append(v0_bytes("encodec_24khz", 2**62, 4, b"\x00" * 8))
    cases.append(v0_bytes("encodec_24khz", 2**64, 4, b""))
    cases.append(v0_bytes("encodec_48khz", 2**62, 4, b"\x00" * 8))
    for data in cases:
        t0 = time.perf_counter()
        with pytest.raises(FormatError):
            read_ecdc(data)
        assert time.perf_counter() - t0 < 1.0


def test_invalid_header_fields_in_file_are_format_errors() -> None:
    header = make_header()
    good = encode_header(header)

    def patched(offset: int, fmt: str, value: int) -> bytes:
        b = bytearray(good[:-4])
        struct.pack_into(fmt, b, offset, value)
        return bytes(b) + struct.pack("<I", zlib.crc32(b))

    for offset, fmt, value in [
        (8, "<I", 0),  # sample_rate
        (12, "<I", 0),  # hop_length
        (20, "<I", 48001),  # stride > segment_length
        (24, "<I", 0),  # bandwidth
        (58, "<B", 0),  # channels
        (59, "<B", 9),  # stereo mode
        (60, "<B", 65),  # num_codebooks
        (61, "<B", 17),  # bits_per_code
        (63, "<B", 200),  # name overruns header
    ]:
        with pytest.raises(FormatError):
            read_ecdc(patched(offset, fmt, value))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"ECDC\x00", b"ECDC\x01"]), st.binary(max_size=200))
def test_garbage_only_raises_format_errors(prefix: bytes, tail: bytes) -> None:
    try:
        read_ecdc(prefix + tail)
    except FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_corruption_only_raises_format_errors(data: st.DataObject) -> None:
    *_, good = small_file()
    bad = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(bad) - 1))
        bad[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(bad)))
    try:
        read_ecdc(bytes(bad[:cut]))
    except FormatError:
        pass


# --------------------------------------------------------------------------- writer errors


def test_writer_rejects_bad_chunks() -> None:
    header = make_header()
    w = EcdcWriter(io.BytesIO(), header)
    good = np.zeros((1, 2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        w.write_chunk(CodeChunk(np.zeros((2, 2, 3), dtype=np.int64), 1.0))
    with pytest.raises(ValueError, match="shape"):
        w.write_chunk(CodeChunk(np.zeros((2, 3), dtype=np.int64), 1.0))
    with pytest.raises(ValueError, match="at least one frame"):
        w.write_chunk(CodeChunk(np.zeros((1, 2, 0), dtype=np.int64), 1.0))
    with pytest.raises(ValueError, match="needs a scale"):
        w.write_chunk(CodeChunk(good))
    with pytest.raises(ValueError, match="scale"):
        w.write_chunk(CodeChunk(good, float("nan")))
    with pytest.raises(ValueError, match="does not fit"):
        w.write_chunk(CodeChunk(good + 1024, 1.0))
    w.write_chunk(CodeChunk(good, 1.0))
    with pytest.raises(ValueError, match="exceeds"):
        w.finish(3 * 320 + 1)
    w.finish(3 * 320)
    with pytest.raises(ValueError):
        w.write_chunk(CodeChunk(good, 1.0))
    with pytest.raises(ValueError):
        w.finish(0)

    unscaled = EcdcWriter(io.BytesIO(), make_header(has_scale=False, num_samples=5))
    with pytest.raises(ValueError, match="must not carry a scale"):
        unscaled.write_chunk(CodeChunk(good, 1.0))
    unscaled.write_chunk(CodeChunk(good))
    with pytest.raises(ValueError, match="contradicts"):
        unscaled.finish(6)

    big = EcdcWriter(io.BytesIO(), make_header(num_codebooks=64, bits_per_code=16))
    with pytest.raises(ValueError, match="limit"):
        big.write_chunk(CodeChunk(np.zeros((1, 64, 140_000), dtype=np.uint16), 1.0))


@pytest.mark.parametrize("overrides", [
    dict(model_name=""),
    dict(model_name="x" * 256),
    dict(model_name="bad\nname"),
    dict(weights_fingerprint=b"short"),
    dict(sample_rate=0),
    dict(channels=1),  # JOINT needs >= 2
    dict(stereo_mode=StereoMode.MONO),  # MONO needs 1 channel
    dict(stereo_mode=7),
    dict(bandwidth=0.0),
    dict(bandwidth=float("inf")),
    dict(num_codebooks=0),
    dict(num_codebooks=65),
    dict(bits_per_code=17),
    dict(hop_length=0),
    dict(segment_length=0),
    dict(segment_stride=48001),
    dict(num_samples=-1),
    dict(num_samples=2**64 - 1),
    dict(original_channels=0),
    dict(version=2),
    dict(channels=1, stereo_mode=StereoMode.DUAL, original_channels=1),
    dict(channels=1, stereo_mode=StereoMode.DOWNMIX, original_channels=1),
])
def test_invalid_headers_are_refused(overrides: dict) -> None:
    header = make_header(**overrides)
    with pytest.raises(FormatError):
        header.validate()
    with pytest.raises(FormatError):
        EcdcWriter(io.BytesIO(), header)


# --------------------------------------------------------------------------- version 0 (Meta)

V0_LAYOUT = {
    # name: (sample_rate, segment_length, segment_stride, has_scale)
    "encodec_24khz": (24000, None, None, False),
    "encodec_48khz": (48000, 48000, 47520, True),
}


def v0_pack(values: list[int], bits: int = 10) -> bytes:
    """Meta's v0 packing, LSB first, flushed to a byte at the end."""
    acc = nbits = 0
    out = bytearray()
    for v in values:
        acc |= v << nbits
        nbits += bits
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc)
    return bytes(out)


def v0_bytes(model: str, length: int, n_q: int, payload: bytes, lm: bool = False) -> bytes:
    meta = json.dumps({"m": model, "al": length, "nc": n_q, "lm": lm}).encode()
    return struct.pack("!4sBI", b"ECDC", 0, len(meta)) + meta + payload


def v0_file(model: str, length: int, n_q: int, seed: int = 0
            ) -> tuple[bytes, list[tuple[np.ndarray, float | None]]]:
    """A tiny v0 writer: returns the bytes and each segment's (codes[n_q, frames], scale)."""
    rng = np.random.default_rng(seed)
    sr, seg_len, stride, has_scale = V0_LAYOUT[model]
    seg_len = seg_len or length
    stride = stride or max(length, 1)
    segments = []
    payload = b""
    for offset in range(0, length, stride):
        this_len = min(length - offset, seg_len)
        frames = -(-this_len // 320)
        codes = rng.integers(0, 1024, size=(n_q, frames))
        scale = float(np.float32(rng.uniform(0.01, 1))) if has_scale else None
        if has_scale:
            payload += struct.pack("!f", scale)
        payload += v0_pack(codes.T.reshape(-1).tolist())  # frame, then codebook
        segments.append((codes, scale))
    return v0_bytes(model, length, n_q, payload), segments


@pytest.mark.parametrize("length", [6720, 1, 320, 321, 47520, 48000, 48001, 2 * 48000 + 1234])
def test_v0_48khz(length: int) -> None:
    data, segments = v0_file("encodec_48khz", length, 4)
    header, chunks, total = read_ecdc(data)
    assert header.version == 0
    assert header.model_name == "encodec_48khz"
    assert header.weights_fingerprint == bytes(16)
    assert (header.sample_rate, header.channels, header.stereo_mode) == (48000, 2, StereoMode.JOINT)
    assert (header.segment_length, header.segment_stride, header.has_scale) == (48000, 47520, True)
    assert (header.hop_length, header.bits_per_code, header.num_codebooks) == (320, 10, 4)
    assert header.bandwidth == 6.0 and header.frame_rate == 150.0
    assert header.num_samples == total == length
    assert (header.original_sample_rate, header.original_channels) == (48000, 2)
    header.validate()
    assert len(chunks) == len(segments) == len(range(0, length, 47520))
    for chunk, (codes, scale) in zip(chunks, segments):
        assert chunk.scale == scale
        np.testing.assert_array_equal(chunk.codes, codes[None])


def test_v0_48khz_6720_frame_count_is_exact() -> None:
    # Meta's float arithmetic gives ceil(6720 / 48000 * 150) == 22; the truth is 21.
    assert math.ceil(6720 / 48000 * 150) == 22
    data, _ = v0_file("encodec_48khz", 6720, 2)
    _, chunks, _ = read_ecdc(data)
    assert chunks[0].num_frames == 21


@pytest.mark.parametrize("length", [6720, 1, 319, 320, 24000, 24000 * 2 + 7, 0])
@pytest.mark.parametrize("n_q", [2, 3, 32])
def test_v0_24khz(length: int, n_q: int) -> None:
    data, segments = v0_file("encodec_24khz", length, n_q)
    header, chunks, total = read_ecdc(data)
    assert header.version == 0
    assert (header.sample_rate, header.channels, header.stereo_mode) == (24000, 1, StereoMode.MONO)
    assert (header.segment_length, header.segment_stride, header.has_scale) == (0, 0, False)
    assert header.bandwidth == n_q * 0.75 and header.frame_rate == 75.0
    assert total == length
    assert all(c.scale is None and c.codes.shape[:2] == (1, n_q) for c in chunks)
    # The single segment is handed out as ~1 s pieces.
    assert all(c.num_frames <= 80 for c in chunks)
    if length == 0:
        assert chunks == [] and segments == []
        return
    (codes, _), = segments
    np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks], axis=2), codes[None])


def test_v0_truncation_at_every_offset() -> None:
    for model, length in [("encodec_48khz", 48000 + 640), ("encodec_24khz", 24000 * 2)]:
        data, _ = v0_file(model, length, 2)
        read_ecdc(data)
        for i in range(len(data)):
            with pytest.raises(TruncatedError):
                read_ecdc(data[:i])


def test_v0_lm_is_unsupported() -> None:
    data = v0_bytes("encodec_24khz", 320, 2, b"\x00" * 10, lm=True)
    with pytest.raises(UnsupportedFeatureError, match=r"--lm.*re-encode without --lm"):
        read_ecdc(data)


@pytest.mark.parametrize("meta", [
    {"m": "encodec_96khz", "al": 10, "nc": 2, "lm": False},
    {"m": "encodec_24khz", "al": 10, "nc": 33, "lm": False},
    {"m": "encodec_48khz", "al": 10, "nc": 17, "lm": False},
    {"m": "encodec_24khz", "al": 10, "nc": 0, "lm": False},
    {"m": "encodec_24khz", "al": -1, "nc": 2, "lm": False},
    {"m": "encodec_24khz", "al": 1.5, "nc": 2, "lm": False},
    {"m": "encodec_24khz", "al": True, "nc": 2, "lm": False},
    {"m": "encodec_24khz", "al": 10, "nc": 2},
    {"m": 5, "al": 10, "nc": 2, "lm": False},
    [1, 2, 3],
])
def test_v0_bad_metadata(meta: object) -> None:
    raw = json.dumps(meta).encode()
    with pytest.raises(FormatError):
        read_ecdc(struct.pack("!4sBI", b"ECDC", 0, len(raw)) + raw + bytes(100))


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[" * 50000, b""])
def test_v0_bad_json(raw: bytes) -> None:
    with pytest.raises(FormatError):
        read_ecdc(struct.pack("!4sBI", b"ECDC", 0, len(raw)) + raw)


def _meta_binary_module() -> object | None:
    """Meta's encodec/binary.py (stdlib-only), loaded without importing the torch-heavy package."""
    spec = importlib.util.find_spec("encodec")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "binary.py"
    if not path.exists():
        return None
    mspec = importlib.util.spec_from_file_location("_meta_encodec_binary", path)
    module = importlib.util.module_from_spec(mspec)  # type: ignore[arg-type]
    mspec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_v0_packing_matches_metas_bitpacker() -> None:
    binary = _meta_binary_module()
    if binary is None:
        pytest.skip("Meta's encodec package is not installed")
    rng = np.random.default_rng(1)
    for bits in (1, 3, 10, 15, 16):
        values = rng.integers(0, 1 << bits, size=101).tolist()
        buf = io.BytesIO()
        packer = binary.BitPacker(bits, buf)  # type: ignore[attr-defined]
        for v in values:
            packer.push(v)
        packer.flush()
        assert buf.getvalue() == pack_codes(np.array(values), bits) == v0_pack(values, bits)


def test_errors_are_ecdc_errors() -> None:
    # The CLI catches EcdcError; every container failure must derive from it.
    for cls in (FormatError, TruncatedError, ChecksumError, UnsupportedVersionError,
                UnsupportedFeatureError):
        assert issubclass(cls, EcdcError)


def test_module_does_not_import_torch() -> None:
    import ast
    for mod in (container, __import__("ecdc.bitpack", fromlist=["x"])):
        tree = ast.parse(Path(mod.__file__).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "torch" not in names


def test_format_doc_example_is_what_the_writer_produces() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md").read_text()
    dump = doc.split("## 11. Example", 1)[1].split("```", 2)[1]
    data = bytes.fromhex("".join(line[10:58] for line in dump.strip().splitlines()))
    header = EcdcHeader(
        "encodec_24khz", bytes.fromhex("00112233445566778899aabbccddeeff"), 24000, 1,
        StereoMode.MONO, 1.5, 2, 10, 320, 0, 0, False, None, 44100, 1,
    )
    codes = np.array([[[1, 1023, 7], [2, 512, 0]]])
    buf = io.BytesIO()
    writer = EcdcWriter(buf, header)
    writer.write_chunk(CodeChunk(codes))
    writer.finish(800, original_samples=1470)
    assert buf.getvalue() == data
    assert len(data) == 135
    reader = EcdcReader(io.BytesIO(data))
    list(reader)
    assert (reader.total_samples, reader.original_samples) == (800, 1470)
    assert zlib.crc32(b"123456789") == 0xCBF43926


def test_container_package_and_what_it_imports_know_nothing_of_torch() -> None:
    """Every module the container package reaches through ecdc-local imports is torch-free."""
    import ast
    root = Path(container.__file__).resolve().parent.parent  # the ecdc package directory
    todo = [Path(container.__file__).resolve().parent / name
            for name in sorted(p.name for p in (root / "container").glob("*.py"))]
    seen: set = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "torch" for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "torch", path
                if node.level:  # a relative import inside ecdc: follow it
                    base = path.parent
                    for _ in range(node.level - 1):
                        base = base.parent
                    target = base.joinpath(*(node.module or "").split(".")) if node.module else base
                    for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                        if candidate.exists():
                            todo.append(candidate)
    assert any(p.name == "reader.py" for p in seen) and any(p.name == "bitpack.py" for p in seen)
