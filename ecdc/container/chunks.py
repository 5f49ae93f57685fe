"""Chunks (docs/FORMAT.md, sections 4-6): framing, code chunks, the end marker, and Gap.

Every chunk is ``u8 type, u32 payload_len, payload, u32 crc32``.  The payloads are
decoded here, once, for the strict reader and for salvage alike, with every size
checked before anything is unpacked or allocated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..bitpack import packed_size, unpack_codes
from ..errors import FormatError
from .header import CRC, UNKNOWN_SAMPLES, EcdcHeader

#: Chunk type of a code chunk (ASCII 'C').
CHUNK_CODES = 0x43
#: Chunk type of the end marker (ASCII 'E').
CHUNK_END = 0x45

#: Largest chunk payload a reader accepts or a writer produces (16 MiB).
MAX_CHUNK_PAYLOAD = 16 * 1024 * 1024
#: Most codes (frames x streams x codebooks) one code chunk may hold.  With 1-bit codes
#: a 16 MiB payload would otherwise unpack to 2**27 int64 values (1 GiB).
MAX_CHUNK_CODES = 1 << 24

#: Largest scale a code chunk may carry.  A scale is the RMS of a segment of finite
#: float32 audio, computed in float32: above 2**64 its square overflows, so no encoder
#: writes more, and a decoder multiplying by more could overflow to inf.
MAX_SCALE = 2.0 ** 64

#: Chunk type and payload length, before every payload.
CHUNK_HEAD = struct.Struct("<BI")
#: A code chunk's payload starts with its chunk_index and frame count...
CODE_HEAD = struct.Struct("<II")
#: ... then, if the header says so, its scale.
SCALE = struct.Struct("<f")
# The end marker's payload: total samples and code chunk count...
_END = struct.Struct("<QI")
# ... then, optionally (offset 12), the input's length at its original rate.
_END_ORIGINAL = struct.Struct("<Q")
#: Shortest valid end marker payload.
END_MIN_SIZE = _END.size


def valid_scale(scale: float) -> bool:
    """A scale a decoder can apply: finite, 0..MAX_SCALE (NaN fails every comparison)."""
    return 0.0 <= scale <= MAX_SCALE


@dataclass(eq=False)
class CodeChunk:
    """One code chunk: ``codes[stream, codebook, frame]`` plus an optional scale.

    For segmented models a chunk is one segment (decoded independently, then
    overlap-added); otherwise chunks are consecutive runs of frames.
    """

    codes: np.ndarray
    scale: float | None = None
    #: The chunk's ``chunk_index`` when it was read from a file (None when built in memory).
    #: Not part of equality: it is where the chunk came from, not what it holds.
    index: int | None = None

    @property
    def num_frames(self) -> int:
        """Frames in this chunk (the last axis of ``codes``)."""
        return int(self.codes.shape[-1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CodeChunk):
            return NotImplemented
        return (
            self.scale == other.scale
            and self.codes.shape == other.codes.shape
            and bool(np.array_equal(self.codes, other.codes))
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Gap:
    """Code chunks a salvaging reader could not recover; a decoder puts silence there.

    Yielded by ``EcdcReader(..., salvage=True)`` in stream order, between the
    intact :class:`CodeChunk` objects.  Positions are at the model's sample rate.

    * ``first_chunk``, ``n_chunks``: the ``chunk_index`` values lost.
    * ``start_frame``: code frames in all chunks before the gap (intact or lost).
    * ``n_frames``: code frames lost (an estimate unless ``exact``).  For
      unsegmented models every chunk but the last holds the same number of
      frames, so lost chunks x that number; a trailing gap is sized from the
      total length when the end marker or the header gives it.
    * ``start_sample``, ``num_samples``: where the silence goes and how long it
      is.  Unsegmented: ``start_frame * hop`` and ``n_frames * hop``.
      Segmented: from the first lost segment's start (``first_chunk *
      segment_stride``) to the next intact segment's start.
    * ``description``: one human-readable line, also in ``reader.damage``.
    """

    first_chunk: int
    n_chunks: int
    n_frames: int
    start_frame: int
    start_sample: int
    num_samples: int
    sample_rate: int
    exact: bool
    description: str

    @property
    def start_seconds(self) -> float:
        """Where the gap starts, in seconds."""
        return self.start_sample / self.sample_rate

    @property
    def duration_seconds(self) -> float:
        """How long the gap is, in seconds."""
        return self.num_samples / self.sample_rate

    @property
    def end_sample(self) -> int:
        """First sample after the gap."""
        return self.start_sample + self.num_samples


def encode_chunk(chunk_type: int, payload: bytes) -> bytes:
    """Frame ``payload`` as a chunk: type, length, payload, CRC32 of all three."""
    if not 0 <= chunk_type <= 0xFF:
        raise ValueError(f"chunk type must be 0..255, got {chunk_type}")
    if len(payload) > MAX_CHUNK_PAYLOAD:
        raise ValueError(
            f"chunk payload of {len(payload)} bytes exceeds the {MAX_CHUNK_PAYLOAD}-byte limit"
        )
    head = CHUNK_HEAD.pack(chunk_type, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + bytes(payload) + CRC.pack(crc)


def expected_code_bytes(header: EcdcHeader, n_frames: int) -> int:
    """Bytes the packed codes of ``n_frames`` frames take (the payload after index and scale)."""
    return packed_size(n_frames * header.streams * header.num_codebooks, header.bits_per_code)


def chunk_start_seconds(header: EcdcHeader, index: int, frames_before: int) -> float:
    """Where the audio of code chunk ``index`` starts, for error messages."""
    if header.segmented:
        return index * header.segment_stride / header.sample_rate
    return frames_before * header.hop_length / header.sample_rate


# --------------------------------------------------------------------------- code chunks


def code_head(header: EcdcHeader, payload: bytes, what: str) -> tuple[int, int]:
    """(chunk_index, n_frames) of a code chunk payload, or FormatError if too short."""
    scale_size = SCALE.size if header.has_scale else 0
    if len(payload) < CODE_HEAD.size + scale_size:
        raise FormatError(f"corrupt .ecdc stream: {what} is too short ({len(payload)} bytes)")
    index, n_frames = CODE_HEAD.unpack_from(payload)
    return index, n_frames


def decode_code_chunk(header: EcdcHeader, payload: bytes, index: int, n_frames: int,
                      what: str) -> CodeChunk:
    """Decode a CRC-checked code chunk payload; every size is checked before unpacking."""
    h = header
    scale_size = SCALE.size if h.has_scale else 0
    length = len(payload)
    if n_frames < 1:
        raise FormatError(f"corrupt .ecdc stream: {what} holds no frames")
    expected = CODE_HEAD.size + scale_size + expected_code_bytes(h, n_frames)
    if length != expected:
        raise FormatError(
            f"corrupt .ecdc stream: {what} is {length} bytes, but {n_frames} frames "
            f"need {expected}"
        )
    n_codes = n_frames * h.streams * h.num_codebooks
    if n_codes > MAX_CHUNK_CODES:
        raise FormatError(
            f"corrupt .ecdc stream: {what} holds {n_codes} codes, more than the "
            f"{MAX_CHUNK_CODES}-code limit"
        )
    if h.segmented and n_frames > h.segment_frames:
        # One chunk is one segment, decoded in one pass: more frames would make the
        # decoder's activations as large as the chunk (gigabytes from a few KB).
        raise FormatError(
            f"corrupt .ecdc stream: {what} holds {n_frames} frames, but a code chunk is one "
            f"segment of {h.segment_length} samples, at most {h.segment_frames} frames"
        )
    scale = None
    if h.has_scale:
        (scale,) = SCALE.unpack_from(payload, CODE_HEAD.size)
        if not valid_scale(scale):
            raise FormatError(f"corrupt .ecdc stream: {what} has invalid scale {scale!r} "
                              f"(a scale is finite, 0..2**64)")
    # A view, not a copy: unpack_codes reads any buffer (np.frombuffer), though ecdc.bitpack
    # annotates ``data`` as bytes.
    codes = unpack_codes(memoryview(payload)[CODE_HEAD.size + scale_size:],
                         h.bits_per_code, n_codes)
    codes = codes.reshape(n_frames, h.streams, h.num_codebooks).transpose(1, 2, 0)
    return CodeChunk(np.ascontiguousarray(codes), scale, index)


# --------------------------------------------------------------------------- the end marker


class EndMarker(NamedTuple):
    """The end marker's payload: the authoritative length and code chunk count."""

    #: Samples in the stream, at the model's sample rate.
    total: int
    #: Code chunks written before it.
    chunk_count: int
    #: The input's length at its original rate; None if unknown or absent (a 12-byte marker).
    original: int | None


def encode_end(total: int, count: int, original: int) -> bytes:
    """The end marker's payload (``original`` is UNKNOWN_SAMPLES when unknown)."""
    return _END.pack(total, count) + _END_ORIGINAL.pack(original)


def parse_end(payload: bytes, what: str) -> EndMarker:
    """Read an end marker's payload; bytes after its known fields (later minors) are ignored.

    Raises FormatError if it is shorter than ``END_MIN_SIZE``; the range checks are the
    reader's, as strict reading and salvage treat an out-of-range count differently.
    """
    if len(payload) < _END.size:
        raise FormatError(f"corrupt .ecdc stream: {what} is too short ({len(payload)} bytes)")
    total, count = _END.unpack_from(payload)
    original = None
    if len(payload) >= _END.size + _END_ORIGINAL.size:
        (original,) = _END_ORIGINAL.unpack_from(payload, _END.size)
        original = None if original == UNKNOWN_SAMPLES else original
    return EndMarker(total, count, original)


def plausible_original(header: EcdcHeader, total: int, original: int | None) -> int | None:
    """``original_samples``, or None if it is far beyond what ``total`` allows.

    The value is informational (never a reason to refuse a file), but a
    decoder pads its output to it, so an absurd value must not get through.
    """
    if original is None:
        return None
    h = header
    limit = 2 * (total + 1) * h.original_sample_rate + h.original_sample_rate * h.sample_rate
    return original if original * h.sample_rate <= limit else None
