"""Property-based fuzzing of the .ecdc reader, part of the normal test run.

Random bytes, truncations, bit flips, and chunk-level damage (deleted, duplicated,
swapped, inserted chunks; garbled lengths) of valid version 1 and hand-built
version 0 files are read in normal and in salvage mode.  The reader must either
succeed or raise one of ecdc's own ``EcdcError`` subclasses, within a time limit.
Derandomized, so CI sees the same cases every run.  The coverage-guided
counterpart is fuzz/fuzz_container.py (atheris).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import struct
import sys
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecdc.bitpack import pack_codes, packed_size, unpack_codes
from ecdc.container import (
    MAX_CHUNK_CODES,
    MAX_DURATION_SECONDS,
    CodeChunk,
    EcdcHeader,
    EcdcReader,
    EcdcWriter,
    StereoMode,
    encode_chunk,
    encode_header,
    max_samples,
    write_ecdc,
)
from ecdc.errors import EcdcError, FormatError

# The reader's invariants and the CRC fixer, shared with the atheris target fuzz/fuzz_container.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
from container_checks import check_reads, fix_crcs  # noqa: E402

#: Wall-clock limit per example; parsing these small inputs takes milliseconds.
LIMIT_S = 5.0

_BASE = settings(
    derandomize=True,
    deadline=None,  # the SIGALRM limit below also catches a true hang, which a deadline cannot
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def fuzz(examples: int) -> settings:
    """Settings for one fuzz property: derandomized, ``examples`` cases."""
    return settings(_BASE, max_examples=examples)


class Hang(Exception):
    """The reader ran past LIMIT_S: treated as a hang (not an EcdcError, so the test fails)."""


@contextlib.contextmanager
def time_limit(seconds: float = LIMIT_S) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"the reader took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check(data: bytes) -> tuple[tuple[EcdcReader, list] | None, tuple[EcdcReader, list] | None]:
    """Read ``data`` both ways under the time limit and check what must hold between them."""
    with time_limit():
        return check_reads(data)


# --------------------------------------------------------------------------- valid files


@st.composite
def v1_files(draw: st.DrawFn) -> tuple[bytes, list[CodeChunk]]:
    mode = draw(st.sampled_from(list(StereoMode)))
    channels, orig = {
        StereoMode.MONO: (1, 1), StereoMode.JOINT: (2, 2),
        StereoMode.DOWNMIX: (1, 3), StereoMode.DUAL: (1, 2), StereoMode.SEPARATE: (1, 5),
    }[mode]
    hop = draw(st.sampled_from([1, 7, 320]))
    segmented = draw(st.booleans())
    seg_len = hop * draw(st.integers(1, 6)) if segmented else 0
    stride = draw(st.integers(1, seg_len)) if segmented else 0
    bits = draw(st.sampled_from([1, 3, 10, 16]))
    header = EcdcHeader(
        model_name=draw(st.sampled_from(["encodec_24khz", "x", "m\u00e9"])),
        weights_fingerprint=bytes(16), sample_rate=draw(st.sampled_from([1, 8000, 24000])),
        channels=channels, stereo_mode=mode, bandwidth=1.5, num_codebooks=draw(st.integers(1, 4)),
        bits_per_code=bits, hop_length=hop, segment_length=seg_len, segment_stride=stride,
        has_scale=draw(st.booleans()), num_samples=None, original_sample_rate=44100,
        original_channels=orig,
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    # A segmented chunk is one segment: at most ceil(segment_length / hop) frames.
    frames = draw(st.lists(st.integers(1, header.segment_frames if segmented else 12), max_size=6))
    chunks = [
        CodeChunk(rng.integers(0, 1 << bits, size=(header.streams, header.num_codebooks, n)),
                  float(np.float32(rng.uniform(0, 3))) if header.has_scale else None)
        for n in frames
    ]
    total = draw(st.integers(0, sum(frames) * hop))
    if draw(st.booleans()):
        header = EcdcHeader(**{**header.__dict__, "num_samples": total})
    return write_ecdc(header, chunks, total, original_samples=draw(st.none() | st.integers(0, 10**6))), chunks


@st.composite
def v0_files(draw: st.DrawFn) -> bytes:
    model = draw(st.sampled_from(["encodec_24khz", "encodec_48khz"]))
    length = draw(st.integers(0, 2 * 47520 + 500) if model == "encodec_48khz" else st.integers(0, 30000))
    n_q = draw(st.integers(1, 4))
    seg, stride = (48000, 47520) if model == "encodec_48khz" else (max(length, 1), max(length, 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    payload = b""
    for offset in range(0, length, stride):
        frames = -(-min(length - offset, seg) // 320)
        if model == "encodec_48khz":
            payload += struct.pack(">f", rng.uniform(0, 2))
        payload += pack_codes(rng.integers(0, 1024, size=(frames, n_q)), 10)
    meta = {"m": model, "al": length, "nc": n_q, "lm": False}
    return struct.pack(">4sBI", b"ECDC", 0, len(json.dumps(meta))) + json.dumps(meta).encode() + payload


def v1_spans(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(end of header, [(start, end) of each chunk]) of an undamaged v1 file."""
    (body_len,) = struct.unpack_from("<H", data, 6)
    pos = head = 8 + body_len + 4
    spans = []
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos + 1)
        spans.append((pos, pos + 9 + length))
        pos += 9 + length
    return head, spans


# --------------------------------------------------------------------------- the properties


@fuzz(1500)
@given(st.sampled_from([b"", b"E", b"ECDC", b"ECDC\x00", b"ECDC\x01", b"ECDC\x01\x00", b"ECDC\x02"]),
       st.binary(max_size=300), st.booleans())
def test_random_bytes(prefix: bytes, tail: bytes, crcs: bool) -> None:
    data = prefix + tail
    check(fix_crcs(data) if crcs else data)


# Byte-level damage, applied in order to a valid file.
byte_ops = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
        st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
        st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=20)),
        st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 40)),
        st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    ),
    min_size=1, max_size=4,
)


def apply_byte_ops(data: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(data)
    for op, where, arg in ops:
        if not out:
            break
        i = where % (len(out) + (op in ("insert", "truncate")))
        if op == "flip":
            out[i] ^= 1 << arg
        elif op == "set":
            out[i] = arg
        elif op == "insert":
            out[i:i] = arg
        elif op == "delete":
            del out[i:i + arg]
        else:
            del out[i:]
    return bytes(out)


@fuzz(1500)
@given(v1_files(), byte_ops, st.booleans())
def test_damaged_v1_files(case: tuple[bytes, list[CodeChunk]], ops: list[tuple], crcs: bool) -> None:
    data, chunks = case
    normal, salvaged = check(data)
    assert normal is not None and normal[1] == chunks  # the undamaged file reads back
    bad = apply_byte_ops(data, ops)
    check(fix_crcs(bad) if crcs else bad)


@fuzz(600)
@given(v0_files(), byte_ops)
def test_damaged_v0_files(data: bytes, ops: list[tuple]) -> None:
    normal, _ = check(data)
    assert normal is not None
    check(apply_byte_ops(data, ops))


chunk_ops = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), st.integers(0, 100), st.just(0)),
        st.tuples(st.just("dup"), st.integers(0, 100), st.just(0)),
        st.tuples(st.just("swap"), st.integers(0, 100), st.integers(0, 100)),
        st.tuples(st.just("garble_length"), st.integers(0, 100), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("unknown"), st.integers(0, 100), st.binary(max_size=30)),
    ),
    min_size=1, max_size=4,
)


@fuzz(800)
@given(v1_files(), chunk_ops)
def test_chunk_level_damage(case: tuple[bytes, list[CodeChunk]], ops: list[tuple]) -> None:
    data, _ = case
    head, spans = v1_spans(data)
    pieces = [data[s:e] for s, e in spans]  # the last one is the end marker
    for op, k, arg in ops:
        if not pieces:
            break
        k %= len(pieces)
        if op == "drop":
            del pieces[k]
        elif op == "dup":
            pieces.insert(k, pieces[k])
        elif op == "swap":
            j = arg % len(pieces)
            pieces[k], pieces[j] = pieces[j], pieces[k]
        elif op == "garble_length":
            p = bytearray(pieces[k])
            struct.pack_into("<I", p, 1, arg)
            pieces[k] = bytes(p)
        else:
            pieces.insert(k, encode_chunk(0x58, arg))
    check(data[:head] + b"".join(pieces))


@fuzz(400)
@given(v1_files(), st.data())
def test_salvage_finds_exactly_the_deleted_chunks(case: tuple[bytes, list[CodeChunk]],
                                                  data: st.DataObject) -> None:
    """Chunks deleted outright (end marker intact) become gaps at exactly their indices."""
    raw, chunks = case
    head, spans = v1_spans(raw)
    code_spans = spans[:-1]
    if not code_spans:
        return
    lost = sorted(data.draw(st.sets(st.integers(0, len(code_spans) - 1), max_size=len(code_spans))))
    kept = b"".join(raw[s:e] for i, (s, e) in enumerate(code_spans) if i not in lost)
    damaged = raw[:head] + kept + raw[spans[-1][0]:]
    assert check(damaged)[1] is not None
    # By default the silence is limited by the file's size, and most of these tiny files
    # lost most of theirs; without the limit every lost index is accounted for.
    reader = EcdcReader(io.BytesIO(damaged), salvage=True, max_silence=math.inf)
    items = list(reader)
    got = [i for i in items if isinstance(i, CodeChunk)]
    assert got == [c for i, c in enumerate(chunks) if i not in lost]
    assert [g.index for g in got] == [i for i in range(len(chunks)) if i not in lost]
    covered = {k for g in reader.gaps for k in range(g.first_chunk, g.first_chunk + g.n_chunks)}
    assert covered == set(lost)
    assert reader.total_samples is not None


@fuzz(500)
@given(st.integers(0, 18), st.integers(0, 3000), st.binary(max_size=800))
def test_unpack_codes_random(bits: int, count: int, packed: bytes) -> None:
    try:
        values = unpack_codes(packed, bits, count)
    except (EcdcError, ValueError):
        # ValueError: bits outside 1..16 (a caller bug); EcdcError: data too short.
        assert not 1 <= bits <= 16 or len(packed) < packed_size(count, bits)
        return
    assert values.shape == (count,) and values.dtype == np.int64
    assert ((values >= 0) & (values < (1 << bits))).all()
    need = packed_size(count, bits)
    again = pack_codes(values, bits)
    assert len(again) == need and again[:need - 1] == packed[:max(need - 1, 0)]


CORPUS = sorted((Path(__file__).resolve().parent.parent / "fuzz" / "corpus").glob("*"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_fuzz_corpus_replays(path: Path) -> None:
    """The atheris corpus (seeds, minimised findings, regressions) under the same checks."""
    data = path.read_bytes()
    check(data)
    check(fix_crcs(data))


def test_fuzz_corpus_is_small_and_has_valid_seeds() -> None:
    assert sum(p.stat().st_size for p in CORPUS) < 200_000
    seeds = [p for p in CORPUS if p.name.startswith(("v0_", "v1_"))]
    assert len(seeds) >= 5
    for p in seeds:
        assert check(p.read_bytes())[0] is not None, p.name


def test_time_limit_catches_a_hang() -> None:
    with pytest.raises(Hang):
        with time_limit(0.05):
            while True:
                pass



# --------------------------------------------------------------------------- hostile values, by hand


def mono_header(**kw: object) -> EcdcHeader:
    fields: dict = dict(
        model_name="encodec_24khz", weights_fingerprint=bytes(16), sample_rate=24000, channels=1,
        stereo_mode=StereoMode.MONO, bandwidth=1.5, num_codebooks=2, bits_per_code=10,
        hop_length=320, segment_length=0, segment_stride=0, has_scale=False, num_samples=None,
        original_sample_rate=24000, original_channels=1,
    )
    fields.update(kw)
    return EcdcHeader(**fields)


def with_num_samples(header_bytes: bytes, value: int) -> bytes:
    """A header with num_samples patched and its CRC fixed."""
    b = bytearray(header_bytes[:-4])
    struct.pack_into("<Q", b, 32, value)
    return bytes(b) + struct.pack("<I", zlib.crc32(b))


def test_absurd_sample_counts_are_format_errors() -> None:
    week = MAX_DURATION_SECONDS * 24000
    assert max_samples(24000) == week and max_samples(1) == 2**32
    mono_header(num_samples=week).validate()
    with pytest.raises(FormatError, match="days"):
        mono_header(num_samples=week + 1).validate()
    head = encode_header(mono_header())
    end = encode_chunk(0x45, struct.pack("<QI", 0, 0))
    assert EcdcReader(io.BytesIO(with_num_samples(head, 0) + end)).header.num_samples == 0
    for value in (week + 1, 2**63, 2**64 - 2):
        with pytest.raises(FormatError):
            EcdcReader(io.BytesIO(with_num_samples(head, value) + end))
        with pytest.raises(FormatError):
            EcdcReader(io.BytesIO(with_num_samples(head, value) + end), salvage=True)
    # The end marker's count is bounded the same way (here before its frame check).
    with pytest.raises(FormatError):
        list(EcdcReader(io.BytesIO(head + encode_chunk(0x45, struct.pack("<QI", week + 1, 0)))))
    # Version 0: Meta's "al" field.
    meta = json.dumps({"m": "encodec_24khz", "al": week + 1, "nc": 2, "lm": False}).encode()
    with pytest.raises(FormatError, match="out of range"):
        EcdcReader(io.BytesIO(struct.pack(">4sBI", b"ECDC", 0, len(meta)) + meta))


def test_writer_refuses_what_readers_would() -> None:
    w = EcdcWriter(io.BytesIO(), mono_header())
    w.write_chunk(CodeChunk(np.zeros((1, 2, 1), np.int64)))
    with pytest.raises(ValueError, match="format allows"):
        w.finish(max_samples(24000) + 1)
    narrow = mono_header(num_codebooks=64, bits_per_code=1)
    frames = MAX_CHUNK_CODES // 64 + 1
    with pytest.raises(ValueError, match="code limit"):
        EcdcWriter(io.BytesIO(), narrow).write_chunk(CodeChunk(np.zeros((1, 64, frames), np.uint8)))


def test_too_many_codes_in_one_chunk() -> None:
    narrow = mono_header(num_codebooks=64, bits_per_code=1)
    frames = MAX_CHUNK_CODES // 64 + 1  # 2 MiB of 1-bit codes, over 2**24 codes
    payload = struct.pack("<II", 0, frames) + bytes(packed_size(frames * 64, 1))
    data = encode_header(narrow) + encode_chunk(0x43, payload)
    with pytest.raises(FormatError, match="code limit"):
        list(EcdcReader(io.BytesIO(data)))
    reader = EcdcReader(io.BytesIO(data), salvage=True)
    assert list(reader) == [] and reader.damage


@pytest.mark.parametrize("original, kept", [
    (48000, True), (48001, True), (2**64 - 2, False), (10**9, False),
])
def test_implausible_original_length_is_treated_as_unknown(original: int, kept: bool) -> None:
    header = mono_header(original_sample_rate=48000)
    data = write_ecdc(header, [CodeChunk(np.zeros((1, 2, 75), np.int64))], 24000,
                      original_samples=original)
    for salvage in (False, True):
        reader = EcdcReader(io.BytesIO(data), salvage=salvage)
        list(reader)
        assert reader.total_samples == 24000
        assert reader.original_samples == (original if kept else None)


def test_v0_scale_must_be_finite() -> None:
    meta = json.dumps({"m": "encodec_48khz", "al": 320, "nc": 1, "lm": False}).encode()
    for scale in (float("nan"), float("inf"), -1.0):
        data = (struct.pack(">4sBI", b"ECDC", 0, len(meta)) + meta + struct.pack(">f", scale)
                + pack_codes(np.zeros(1, np.int64), 10))
        with pytest.raises(FormatError, match="invalid scale"):
            list(EcdcReader(io.BytesIO(data)))
