"""The ``.ecdc`` container: format version 1 (read/write) and Meta's version 0 (read).

docs/FORMAT.md is the normative, byte-exact description; this module is one
implementation of it.  In short, a version 1 stream is::

    header   "ECDC" u8 major=1, u8 minor, u16 body_len, body, u32 crc32
    chunk*   u8 type, u32 payload_len, payload, u32 crc32
    end      a chunk of type 'E' carrying the sample count and chunk count

Design goals, and why:

* Streamable: a writer never seeks, so ``ecdc encode - > pipe`` works.  The
  header may say "sample count unknown"; the end chunk is authoritative.
* Robust: every chunk has its own CRC32 and a sequence number, the end chunk
  carries the number of code chunks, so corruption, truncation and dropped
  chunks are each reported as such instead of decoding garbage.
* Hostile-input safe: every length read from a file is bounded before it is
  used to read or allocate, so a 20-byte file cannot request gigabytes.
* Extensible: the header carries its own length (minor versions append
  fields), unknown chunk types are skipped, and a newer major version is
  refused with a message that says to upgrade.

Salvage API (``ecdc decompress --salvage``)::

    reader = EcdcReader(f, salvage=True)   # a damaged *header* still raises FormatError
    for item in reader:
        if isinstance(item, Gap):          # chunks that could not be recovered
            ...                            # silence: item.start_sample, item.num_samples
        else:                              # an intact CodeChunk; item.index is its chunk_index
            ...
    reader.damage          # list[str], one line per problem, e.g. "code chunk 5
                           # (4.95-5.94 s): CRC mismatch (code chunk at byte 1234),
                           # replaced by silence"; empty for an undamaged file
    reader.gaps            # list[Gap], the gaps yielded
    reader.total_samples   # the end marker's sample count if it survived, else None
    reader.salvaged_samples  # the length the evidence supports (the end marker's, when
                           # its silence is allowed), else None: keep what was recovered

Salvage never raises for damage after the header.  At a chunk that does not
parse (bad CRC, garbled length, truncation, garbage) it scans forward for the
next byte offset where a code chunk or end marker parses with a valid CRC, and
uses ``chunk_index`` to tell how many chunks were lost.  Gaps are sized as in
:class:`Gap`: unsegmented chunks all hold the same number of frames but the
last, segmented ones are one segment each, and the end marker sizes a gap at
the end.  Silence is only put where an intact chunk after the loss proves
it: a later chunk index, or the end marker.  A truncated end is reported, not
filled to the header's ``num_samples`` (an 81-byte header can claim a week).
And the silence in all stays within a limit proportional to the file's size
(:func:`salvage_silence_limit`, or ``max_silence``): where a gap would
exceed it, recovery stops there with a damage line.  Duplicated or
out-of-order chunks (an index already passed) are dropped; an index
implausibly far ahead (more than a week of audio) is ignored.  Decoders
should trim or pad the result to ``salvaged_samples`` when it is set (else
trim to ``total_samples`` or ``header.num_samples``, never pad), and produce a
gap's silence in blocks.  The scan is linear in the file size and holds at
most one chunk (16 MiB) plus 64 KiB in memory; after a resync it may have read
past the end marker of a non-seekable stream.  Version 0 files have no
checksums: salvage recovers the intact start of a truncated one (the rest is
reported) and turns a segment with an invalid scale into a Gap.

This module deliberately imports only numpy and the standard library.
"""

from __future__ import annotations

import enum
import io
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from .bitpack import MAX_BITS, pack_codes, packed_size, unpack_codes
from .errors import (
    ChecksumError,
    FormatError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)
from .streams import write_all

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FORMAT_MINOR",
    "READABLE_VERSIONS",
    "CHUNK_CODES",
    "CHUNK_END",
    "MAX_CHUNK_PAYLOAD",
    "MAX_CHUNK_CODES",
    "MAX_DURATION_SECONDS",
    "MAX_SCALE",
    "SALVAGE_SILENCE_RATIO",
    "UNKNOWN_SAMPLES",
    "max_samples",
    "salvage_silence_limit",
    "StereoMode",
    "EcdcHeader",
    "CodeChunk",
    "Gap",
    "EcdcWriter",
    "EcdcReader",
    "encode_header",
    "encode_chunk",
    "write_ecdc",
    "read_ecdc",
]

# --------------------------------------------------------------------------- constants

MAGIC = b"ECDC"
#: Major format version written by this module.
FORMAT_VERSION = 1
#: Minor format version written by this module.
FORMAT_MINOR = 0
#: Major versions this module can read.
READABLE_VERSIONS = (0, 1)

#: Chunk type of a code chunk (ASCII 'C').
CHUNK_CODES = 0x43
#: Chunk type of the end marker (ASCII 'E').
CHUNK_END = 0x45

#: Largest chunk payload a reader accepts or a writer produces (16 MiB).
MAX_CHUNK_PAYLOAD = 16 * 1024 * 1024
#: ``num_samples`` value meaning "unknown, see the end chunk".
UNKNOWN_SAMPLES = 2**64 - 1

MAX_SAMPLE_RATE = 1_000_000
#: The input rates ecdc encodes (``ecdc.audio.check_sample_rate``); the original rate is
#: what a decoder writes by default, so a header may not claim one ecdc would not accept.
MIN_ORIGINAL_SAMPLE_RATE = 1000
MAX_MODEL_CHANNELS = 16
#: libsndfile's limit (SF_MAX_CHANNELS): no input ecdc reads has more, so no output needs more.
MAX_ORIGINAL_CHANNELS = 1024
MAX_CODEBOOKS = 64
MAX_HOP_LENGTH = 1 << 16
MAX_SEGMENT_LENGTH = 1 << 24
MAX_NAME_BYTES = 255
#: Longest audio a header or end marker may claim, in seconds (one week).  Nobody codes
#: a week into one stream, so more is damage or an attack; the bound also keeps a
#: salvaging decoder from being told to produce years of silence.
MAX_DURATION_SECONDS = 7 * 24 * 3600
#: Floor of the sample-count bound, for sample rates so low that a week is fewer samples.
_MIN_SAMPLE_BOUND = 1 << 32
#: Most codes (frames x streams x codebooks) one code chunk may hold.  With 1-bit codes
#: a 16 MiB payload would otherwise unpack to 2**27 int64 values (1 GiB).
MAX_CHUNK_CODES = 1 << 24

_FLAG_SCALE = 0x01
_KNOWN_FLAGS = _FLAG_SCALE

# Header prefix: magic, major, minor, body length.
_PREFIX = struct.Struct("<4sBBH")
# Fixed part of the version 1.0 header body (file offsets 8..63).
_BODY = struct.Struct("<IIIIII Q 16s H BBBBBB")  # struct ignores the spaces
_CRC = struct.Struct("<I")
_CHUNK_HEAD = struct.Struct("<BI")
_CODE_HEAD = struct.Struct("<II")
_SCALE = struct.Struct("<f")
_END = struct.Struct("<QI")
# Optional field at offset 12 of the end chunk: the input's length at its original rate.
_END_ORIGINAL = struct.Struct("<Q")

# Largest payload a v0 JSON header may have; Meta writes ~60 bytes.
_V0_MAX_JSON = 64 * 1024
_V0_PREFIX_LEN = struct.Struct(">I")
_V0_SCALE = struct.Struct(">f")

# Reads from the file object are split into pieces of at most this size, so a
# lying length never causes a large allocation before EOF is seen.
_READ_PIECE = 1 << 20

#: Largest scale a code chunk may carry.  A scale is the RMS of a segment of finite
#: float32 audio, computed in float32: above 2**64 its square overflows, so no encoder
#: writes more, and a decoder multiplying by more could overflow to inf.
MAX_SCALE = 2.0 ** 64

#: By default salvage fills at most this many times the audio that the bytes of the file
#: could code (at the header's bits per frame) with silence, so that the output stays
#: proportional to the input: a gap has to be backed by the file's size, not only by a
#: number in it.  8 still fills a file that lost 7/8 of its chunks outright (a real
#: file also spends bytes on framing); ``EcdcReader(max_silence=...)`` sets another limit.
SALVAGE_SILENCE_RATIO = 8


def salvage_silence_limit(header: "EcdcHeader", nbytes: int) -> int:
    """Samples of silence salvage fills in by default for a file of ``nbytes`` bytes.

    ``SALVAGE_SILENCE_RATIO`` times the samples that ``nbytes`` bytes of codes hold.
    """
    bits_per_frame = header.streams * header.num_codebooks * header.bits_per_code
    return SALVAGE_SILENCE_RATIO * 8 * max(int(nbytes), 0) * header.hop_length // bits_per_frame


def _valid_scale(scale: float) -> bool:
    """A scale a decoder can apply: finite, 0..MAX_SCALE (NaN fails every comparison)."""
    return 0.0 <= scale <= MAX_SCALE


def max_samples(sample_rate: int) -> int:
    """Largest sample count a file at ``sample_rate`` may claim (one week, at least 2**32)."""
    return max(MAX_DURATION_SECONDS * int(sample_rate), _MIN_SAMPLE_BOUND)


class StereoMode(enum.IntEnum):
    """How the input's channels map onto what the model codes."""

    MONO = 0  #: single-channel input, single-channel model
    JOINT = 1  #: the model codes all channels together (e.g. the stereo 48 kHz model)
    DOWNMIX = 2  #: multi-channel input mixed to mono for a mono model
    DUAL = 3  #: each of 2 channels coded separately through a mono model (2 code streams)


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class EcdcHeader:
    """Everything a decoder needs to know before the first chunk.

    ``bandwidth`` is in kbps (stored in the file as whole bits per second).
    ``num_samples`` is at the model's sample rate; None means the writer was
    streaming and the end chunk carries the count.  Decoders must not
    preallocate from ``num_samples`` (a hostile file can claim anything); the
    reader checks it against the end chunk and the frames actually present.
    """

    model_name: str
    weights_fingerprint: bytes
    sample_rate: int
    channels: int
    stereo_mode: StereoMode
    bandwidth: float
    num_codebooks: int
    bits_per_code: int
    hop_length: int
    segment_length: int
    segment_stride: int
    has_scale: bool
    num_samples: int | None
    original_sample_rate: int
    original_channels: int
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Normalise harmless representation differences so equality works.
        if isinstance(self.weights_fingerprint, (bytearray, memoryview)):
            object.__setattr__(self, "weights_fingerprint", bytes(self.weights_fingerprint))
        if not isinstance(self.stereo_mode, StereoMode) and isinstance(self.stereo_mode, int):
            try:
                object.__setattr__(self, "stereo_mode", StereoMode(self.stereo_mode))
            except ValueError:
                pass  # validate() reports it

    @property
    def frame_rate(self) -> float:
        """Code frames per second (``sample_rate / hop_length``)."""
        return self.sample_rate / self.hop_length

    @property
    def streams(self) -> int:
        """Independent code streams per frame: 2 for DUAL, else 1."""
        return 2 if self.stereo_mode == StereoMode.DUAL else 1

    @property
    def segmented(self) -> bool:
        """True if the model codes fixed-length overlapping segments (one per code chunk)."""
        return self.segment_length != 0

    @property
    def segment_frames(self) -> int:
        """Most frames a code chunk of a segmented model holds: one whole segment's."""
        return -(-self.segment_length // self.hop_length)

    @property
    def bandwidth_bps(self) -> int:
        """The bandwidth as stored in the file: whole bits per second."""
        return int(round(self.bandwidth * 1000))

    def validate(self) -> None:
        """Raise FormatError unless every field is in the range docs/FORMAT.md allows."""
        def bad(msg: str) -> FormatError:
            return FormatError(f"invalid .ecdc header: {msg}")

        def is_int(v: object) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not isinstance(self.model_name, str):
            raise bad("model_name must be a string")
        try:
            name_bytes = self.model_name.encode("utf-8")
        except UnicodeEncodeError:
            raise bad("model_name is not encodable as UTF-8") from None
        if not 1 <= len(name_bytes) <= MAX_NAME_BYTES:
            raise bad(f"model_name must be 1..{MAX_NAME_BYTES} UTF-8 bytes, got {len(name_bytes)}")
        if not self.model_name.isprintable():
            raise bad("model_name contains control characters")
        if not isinstance(self.weights_fingerprint, bytes) or len(self.weights_fingerprint) != 16:
            raise bad("weights_fingerprint must be exactly 16 bytes")
        for field, lo, hi in (
            ("sample_rate", 1, MAX_SAMPLE_RATE),
            ("channels", 1, MAX_MODEL_CHANNELS),
            ("num_codebooks", 1, MAX_CODEBOOKS),
            ("bits_per_code", 1, MAX_BITS),
            ("hop_length", 1, MAX_HOP_LENGTH),
            ("segment_length", 0, MAX_SEGMENT_LENGTH),
            ("segment_stride", 0, MAX_SEGMENT_LENGTH),
            ("original_sample_rate", MIN_ORIGINAL_SAMPLE_RATE, MAX_SAMPLE_RATE),
            ("original_channels", 1, MAX_ORIGINAL_CHANNELS),
        ):
            value = getattr(self, field)
            if not is_int(value) or not lo <= value <= hi:
                raise bad(f"{field} must be an integer in {lo}..{hi}, got {value!r}")
        if (self.segment_length == 0) != (self.segment_stride == 0):
            raise bad("segment_length and segment_stride must both be 0 (unsegmented) or both > 0")
        if self.segment_stride > self.segment_length:
            raise bad(
                f"segment_stride {self.segment_stride} exceeds segment_length {self.segment_length}"
            )
        if not isinstance(self.stereo_mode, StereoMode):
            raise bad(f"stereo_mode must be one of {[m.value for m in StereoMode]}, "
                      f"got {self.stereo_mode!r}")
        mode, ch, orig = self.stereo_mode, self.channels, self.original_channels
        if mode == StereoMode.MONO and not (ch == 1 and orig == 1):
            raise bad(f"MONO needs channels == original_channels == 1, got {ch} and {orig}")
        if mode == StereoMode.JOINT and ch < 2:
            raise bad(f"JOINT needs a multi-channel model, got channels={ch}")
        if mode == StereoMode.DOWNMIX and not (ch == 1 and orig >= 2):
            raise bad(f"DOWNMIX needs channels == 1 and original_channels >= 2, got {ch} and {orig}")
        if mode == StereoMode.DUAL and not (ch == 1 and orig >= 2):
            raise bad(f"DUAL needs channels == 1 and original_channels >= 2, got {ch} and {orig}")
        if isinstance(self.bandwidth, bool) or not isinstance(self.bandwidth, (int, float)):
            raise bad(f"bandwidth must be a number of kbps, got {self.bandwidth!r}")
        if not math.isfinite(self.bandwidth) or not 1 <= self.bandwidth_bps <= 0xFFFFFFFF:
            raise bad(f"bandwidth must be in 0.001..4294967.295 kbps, got {self.bandwidth!r}")
        if not isinstance(self.has_scale, (bool, np.bool_)):
            raise bad("has_scale must be a bool")
        if self.num_samples is not None and (
            not is_int(self.num_samples) or not 0 <= self.num_samples < UNKNOWN_SAMPLES
        ):
            raise bad(f"num_samples must be None or an integer in 0..2**64-2, got {self.num_samples!r}")
        if self.num_samples is not None and self.num_samples > max_samples(self.sample_rate):
            raise bad(
                f"num_samples {self.num_samples} is more than {MAX_DURATION_SECONDS // 86400} days "
                f"at {self.sample_rate} Hz"
            )
        if self.version not in READABLE_VERSIONS:
            raise bad(f"version must be one of {READABLE_VERSIONS}, got {self.version!r}")


def encode_header(header: EcdcHeader) -> bytes:
    """Serialise ``header`` as a version 1.0 header (prefix, body and CRC32)."""
    header.validate()
    name = header.model_name.encode("utf-8")
    body = _BODY.pack(
        header.sample_rate,
        header.hop_length,
        header.segment_length,
        header.segment_stride,
        header.bandwidth_bps,
        header.original_sample_rate,
        UNKNOWN_SAMPLES if header.num_samples is None else header.num_samples,
        header.weights_fingerprint,
        header.original_channels,
        header.channels,
        int(header.stereo_mode),
        header.num_codebooks,
        header.bits_per_code,
        _FLAG_SCALE if header.has_scale else 0,
        len(name),
    ) + name
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, FORMAT_MINOR, len(body)) + body
    return head + _CRC.pack(zlib.crc32(head))


def _decode_body(body: bytes) -> EcdcHeader:
    """Parse a version 1 header body; trailing bytes (later minor versions) are ignored."""
    if len(body) < _BODY.size:
        raise FormatError(
            f"corrupt .ecdc header: body is {len(body)} bytes, version 1 needs at least {_BODY.size}"
        )
    (sample_rate, hop, seg_len, seg_stride, bps, orig_sr, num_samples, fingerprint,
     orig_ch, channels, mode, n_q, bits, flags, name_len) = _BODY.unpack_from(body)
    if _BODY.size + name_len > len(body):
        raise FormatError(
            f"corrupt .ecdc header: model name of {name_len} bytes overruns the {len(body)}-byte header"
        )
    if flags & ~_KNOWN_FLAGS:
        raise UnsupportedFeatureError(
            f"this .ecdc file sets header flags 0x{flags:02x} that this ecdc does not know; upgrade ecdc"
        )
    try:
        name = body[_BODY.size:_BODY.size + name_len].decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("corrupt .ecdc header: model name is not valid UTF-8") from None
    try:
        stereo = StereoMode(mode)
    except ValueError:
        raise FormatError(f"corrupt .ecdc header: unknown stereo mode {mode}") from None
    header = EcdcHeader(
        model_name=name,
        weights_fingerprint=fingerprint,
        sample_rate=sample_rate,
        channels=channels,
        stereo_mode=stereo,
        bandwidth=bps / 1000,
        num_codebooks=n_q,
        bits_per_code=bits,
        hop_length=hop,
        segment_length=seg_len,
        segment_stride=seg_stride,
        has_scale=bool(flags & _FLAG_SCALE),
        num_samples=None if num_samples == UNKNOWN_SAMPLES else num_samples,
        original_sample_rate=orig_sr,
        original_channels=orig_ch,
        version=1,
    )
    header.validate()
    return header


# --------------------------------------------------------------------------- chunks


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
    head = _CHUNK_HEAD.pack(chunk_type, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + bytes(payload) + _CRC.pack(crc)


def _expected_code_bytes(header: EcdcHeader, n_frames: int) -> int:
    return packed_size(n_frames * header.streams * header.num_codebooks, header.bits_per_code)


def _chunk_start_seconds(header: EcdcHeader, index: int, frames_before: int) -> float:
    """Where the audio of code chunk ``index`` starts, for error messages."""
    if header.segmented:
        return index * header.segment_stride / header.sample_rate
    return frames_before * header.hop_length / header.sample_rate


# --------------------------------------------------------------------------- writer


class EcdcWriter:
    """Streams a version 1 file to any writable binary file object; never seeks.

    The header is written by the constructor, each :meth:`write_chunk` writes
    one code chunk, and :meth:`finish` writes the end marker (without which
    readers report the file as truncated).
    """

    def __init__(self, fileobj: BinaryIO, header: EcdcHeader) -> None:
        header.validate()
        self._f = fileobj
        self.header = header
        self.chunks_written = 0
        self.frames_written = 0
        self._finished = False
        self._write(encode_header(header))

    def _write(self, data: bytes) -> None:
        write_all(self._f, data)

    def write_chunk(self, chunk: CodeChunk) -> None:
        """Append one code chunk; raises ValueError if it does not match the header."""
        if self._finished:
            raise ValueError("EcdcWriter.write_chunk called after finish()")
        h = self.header
        codes = np.asarray(chunk.codes)
        want = (h.streams, h.num_codebooks)
        if codes.ndim != 3 or codes.shape[:2] != want:
            raise ValueError(
                f"codes must have shape [streams={want[0]}, num_codebooks={want[1]}, frames], "
                f"got {codes.shape}"
            )
        n_frames = codes.shape[2]
        if not 1 <= n_frames <= 0xFFFFFFFF:
            raise ValueError(f"a code chunk must hold at least one frame, got {n_frames}")
        if h.has_scale:
            if chunk.scale is None:
                raise ValueError("this header has has_scale=True: every chunk needs a scale")
            scale = float(chunk.scale)
            if not _valid_scale(scale):
                raise ValueError(f"scale must be a finite float in 0..2**64, got {chunk.scale!r}")
            scale_bytes = _SCALE.pack(scale)
        else:
            if chunk.scale is not None:
                raise ValueError("this header has has_scale=False: chunks must not carry a scale")
            scale_bytes = b""
        size = _CODE_HEAD.size + len(scale_bytes) + _expected_code_bytes(h, n_frames)
        if size > MAX_CHUNK_PAYLOAD:
            raise ValueError(
                f"a chunk of {n_frames} frames needs {size} bytes, over the "
                f"{MAX_CHUNK_PAYLOAD}-byte limit; write fewer frames per chunk"
            )
        if codes.size > MAX_CHUNK_CODES:
            raise ValueError(
                f"a chunk of {n_frames} frames holds {codes.size} codes, over the "
                f"{MAX_CHUNK_CODES}-code limit; write fewer frames per chunk"
            )
        if h.segmented and n_frames > h.segment_frames:
            raise ValueError(
                f"a segmented model's code chunk is one segment, at most {h.segment_frames} "
                f"frames; got {n_frames}"
            )
        # File order is frame, stream, codebook.
        packed = pack_codes(np.ascontiguousarray(codes.transpose(2, 0, 1)), h.bits_per_code)
        payload = _CODE_HEAD.pack(self.chunks_written, n_frames) + scale_bytes + packed
        self._write(encode_chunk(CHUNK_CODES, payload))
        self.chunks_written += 1
        self.frames_written += n_frames

    def finish(self, total_samples: int, original_samples: int | None = None) -> None:
        """Write the end marker with the authoritative sample count (at the model's rate).

        ``original_samples`` is the input's length at ``original_sample_rate``, so a
        decoder can give back exactly as many samples as went in (resampling alone is
        off by one now and then); None writes "unknown".
        """
        if self._finished:
            raise ValueError("EcdcWriter.finish called twice")
        h = self.header
        if isinstance(total_samples, bool) or not isinstance(total_samples, (int, np.integer)):
            raise ValueError(f"total_samples must be an integer, got {total_samples!r}")
        total = int(total_samples)
        if total < 0:
            raise ValueError(f"total_samples must be >= 0, got {total}")
        if h.num_samples is not None and total != h.num_samples:
            raise ValueError(f"total_samples {total} contradicts the header's num_samples {h.num_samples}")
        if total > max_samples(h.sample_rate):
            raise ValueError(f"total_samples {total} is more than the format allows at {h.sample_rate} Hz")
        if total > self.frames_written * h.hop_length:
            raise ValueError(
                f"total_samples {total} exceeds the {self.frames_written} frames written "
                f"({self.frames_written * h.hop_length} samples)"
            )
        if original_samples is None:
            original = UNKNOWN_SAMPLES
        elif isinstance(original_samples, bool) or not isinstance(original_samples, (int, np.integer)) \
                or not 0 <= int(original_samples) < UNKNOWN_SAMPLES:
            raise ValueError(f"original_samples must be a non-negative integer, got {original_samples!r}")
        else:
            original = int(original_samples)
        payload = _END.pack(total, self.chunks_written) + _END_ORIGINAL.pack(original)
        self._write(encode_chunk(CHUNK_END, payload))
        self._finished = True
        flush = getattr(self._f, "flush", None)
        if flush is not None:
            flush()


# --------------------------------------------------------------------------- v0 (Meta)


@dataclass(frozen=True)
class _V0Model:
    sample_rate: int
    channels: int
    stereo_mode: StereoMode
    hop_length: int
    segment_length: int
    segment_stride: int
    has_scale: bool
    bits_per_code: int
    max_codebooks: int


# Meta's encodec 0.1.1 models; their parameters are fixed by the model code.
_V0_MODELS = {
    "encodec_24khz": _V0Model(24000, 1, StereoMode.MONO, 320, 0, 0, False, 10, 32),
    "encodec_48khz": _V0Model(48000, 2, StereoMode.JOINT, 320, 48000, 47520, True, 10, 16),
}

# Unsegmented v0 files hold all frames in one bit stream; we hand them out in
# pieces of this many frames (a multiple of 8, so pieces start on byte
# boundaries) to keep memory bounded, like version 1's ~1 s chunks.
_V0_PIECE_FRAMES = 80


# --------------------------------------------------------------------------- reader


# Salvage: the resynchronising scan only stops at these chunk types (an unknown
# type carries optional data, so stepping over one loses nothing).
_RESYNC_TYPES = re.compile(b"[CE]")
# Bytes read at a time while scanning for the next intact chunk.
_SCAN_PIECE = 1 << 16
# The scan checks a candidate's CRC only while it has credit: a start allowance
# plus this much per byte it has moved past.  Without it a hostile file with a
# plausible chunk header every few bytes, each claiming 16 MiB, would make the
# scan quadratic; with it the work is linear in the file size.
_SCAN_CREDIT_PER_BYTE = 16
_SCAN_CREDIT_START = 2 * (MAX_CHUNK_PAYLOAD + 9)
# Per-segment frame counts are summed exactly for up to this many short segments.
_MAX_EXACT_TAIL = 4096
# Stream events the salvager may look ahead to size a gap at the start of a file.
_MAX_PEEK = 64
# How every gap's description ends.
_FILLED = ", replaced by silence"


class EcdcReader:
    """Reads a version 0 or 1 stream incrementally from a binary file object.

    The constructor reads and validates the header (available as
    :attr:`header`); iterating yields :class:`CodeChunk` objects.  Only
    ``read`` is called on the file object, so pipes work.  After iteration
    :attr:`total_samples` holds the authoritative sample count.  Problems are
    reported as FormatError subclasses: TruncatedError, ChecksumError,
    UnsupportedVersionError, UnsupportedFeatureError.

    With ``salvage=True`` a damaged stream is recovered instead of refused:
    iteration yields intact :class:`CodeChunk` objects and :class:`Gap` markers
    in order, :attr:`damage` describes what was lost (see the module docstring).
    A damaged header is still a FormatError.  ``max_silence`` (seconds) is the
    most silence salvage puts in place of lost audio; None (the default) is
    :func:`salvage_silence_limit` of the file's size, so output stays
    proportional to input; ``math.inf`` allows what the format allows.
    """

    header: EcdcHeader
    total_samples: int | None
    original_samples: int | None

    def __init__(self, fileobj: BinaryIO, salvage: bool = False,
                 max_silence: float | None = None) -> None:
        self._f = fileobj
        self._pos = 0
        self.salvage = bool(salvage)
        if max_silence is not None and not max_silence >= 0:
            raise ValueError(f"max_silence must be a number of seconds >= 0, got {max_silence!r}")
        self.max_silence = max_silence
        self.total_samples = None
        self.original_samples = None
        #: Salvage mode: the length (at the model's rate) the evidence says the recovered
        #: audio has, gaps and end included: the end marker's count when it survived and
        #: the silence it implies is allowed.  None: keep what was recovered, trimmed to
        #: ``total_samples`` or ``header.num_samples`` when known; never padded to them.
        self.salvaged_samples: int | None = None
        self._silence = 0  # samples of silence handed out so far (gaps and end padding)
        self._size: int | None = None  # bytes in the stream, where the file can tell
        self.chunks_read = 0
        #: Code chunk count from the end marker (None until it is read, or if it was lost).
        self.chunks_expected: int | None = None
        #: Salvage mode: one line per problem found, in stream order.
        self.damage: list[str] = []
        #: Salvage mode: every Gap yielded so far.
        self.gaps: list[Gap] = []
        start = self._read_upto(5)
        if not start:
            raise TruncatedError("input is empty, not an .ecdc stream")
        if start[:4] != MAGIC[:len(start[:4])]:
            raise FormatError("not an .ecdc stream (the file does not start with 'ECDC')")
        if len(start) < 5:
            raise TruncatedError(f".ecdc stream truncated after {len(start)} bytes, inside its header")
        major = start[4]
        if major == 0:
            self.header = self._read_v0_header()
            self._iter: Iterator = self._iter_v0()
        elif major == 1:
            self.header = self._read_v1_header(start)
            self._iter = self._iter_v1_salvage() if self.salvage else self._iter_v1()
        else:
            raise UnsupportedVersionError(
                f"this file uses .ecdc format version {major}; this ecdc reads versions "
                f"{' and '.join(map(str, READABLE_VERSIONS))}; upgrade ecdc to read it"
            )

    # -- low-level reading

    def _read_upto(self, n: int) -> bytes:
        """Read up to ``n`` bytes, fewer only at EOF, in bounded pieces."""
        parts = []
        got = 0
        while got < n:
            piece = self._f.read(min(n - got, _READ_PIECE))
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        data = b"".join(parts)
        self._pos += len(data)
        return data

    def _read_exactly(self, n: int, what: str) -> bytes:
        start = self._pos
        data = self._read_upto(n)
        if len(data) < n:
            raise TruncatedError(
                f".ecdc stream truncated in {what}: {n} bytes needed from byte {start}, "
                f"only {len(data)} left"
            )
        return data

    # -- version 1

    def _read_v1_header(self, start: bytes) -> EcdcHeader:
        rest = self._read_exactly(_PREFIX.size - len(start), "header")
        prefix = start + rest
        _, _, _minor, body_len = _PREFIX.unpack(prefix)
        body = self._read_exactly(body_len, "header")
        (crc,) = _CRC.unpack(self._read_exactly(_CRC.size, "header checksum"))
        if zlib.crc32(body, zlib.crc32(prefix)) != crc:
            raise ChecksumError(".ecdc header is corrupted (CRC32 mismatch)")
        return _decode_body(body)

    def _describe(self, ctype: int, offset: int, frames_before: int) -> str:
        if ctype == CHUNK_CODES:
            t = _chunk_start_seconds(self.header, self.chunks_read, frames_before)
            return f"code chunk {self.chunks_read} (audio from {t:.2f} s, byte {offset})"
        if ctype == CHUNK_END:
            return f"end marker (byte {offset})"
        return f"chunk of type 0x{ctype:02x} (byte {offset}, after {self.chunks_read} code chunks)"

    def _code_head(self, payload: bytes, what: str) -> tuple[int, int]:
        """(chunk_index, n_frames) of a code chunk payload, or FormatError if too short."""
        scale_size = _SCALE.size if self.header.has_scale else 0
        if len(payload) < _CODE_HEAD.size + scale_size:
            raise FormatError(f"corrupt .ecdc stream: {what} is too short ({len(payload)} bytes)")
        index, n_frames = _CODE_HEAD.unpack_from(payload)
        return index, n_frames

    def _code_chunk(self, payload: bytes, index: int, n_frames: int, what: str) -> CodeChunk:
        """Decode a CRC-checked code chunk payload; every size is checked before unpacking."""
        h = self.header
        scale_size = _SCALE.size if h.has_scale else 0
        length = len(payload)
        if n_frames < 1:
            raise FormatError(f"corrupt .ecdc stream: {what} holds no frames")
        expected = _CODE_HEAD.size + scale_size + _expected_code_bytes(h, n_frames)
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
            (scale,) = _SCALE.unpack_from(payload, _CODE_HEAD.size)
            if not _valid_scale(scale):
                raise FormatError(f"corrupt .ecdc stream: {what} has invalid scale {scale!r} "
                                  f"(a scale is finite, 0..2**64)")
        codes = unpack_codes(memoryview(payload)[_CODE_HEAD.size + scale_size:], h.bits_per_code, n_codes)
        codes = codes.reshape(n_frames, h.streams, h.num_codebooks).transpose(1, 2, 0)
        return CodeChunk(np.ascontiguousarray(codes), scale, index)

    def _plausible_original(self, total: int, original: int | None) -> int | None:
        """``original_samples``, or None if it is far beyond what ``total`` allows.

        The value is informational (never a reason to refuse a file), but a
        decoder pads its output to it, so an absurd value must not get through.
        """
        if original is None:
            return None
        h = self.header
        limit = 2 * (total + 1) * h.original_sample_rate + h.original_sample_rate * h.sample_rate
        return original if original * h.sample_rate <= limit else None

    def _iter_v1(self) -> Iterator[CodeChunk]:
        h = self.header
        frames = 0
        while True:
            offset = self._pos
            head = self._read_upto(_CHUNK_HEAD.size)
            if len(head) < _CHUNK_HEAD.size:
                t = _chunk_start_seconds(h, self.chunks_read, frames)
                raise TruncatedError(
                    f".ecdc stream truncated: it ends at byte {offset + len(head)} without an end "
                    f"marker, after {self.chunks_read} code chunks ({t:.2f} s of audio)"
                )
            ctype, length = _CHUNK_HEAD.unpack(head)
            what = self._describe(ctype, offset, frames)
            if length > MAX_CHUNK_PAYLOAD:
                raise FormatError(
                    f"corrupt .ecdc stream: {what} claims {length} bytes, more than the "
                    f"{MAX_CHUNK_PAYLOAD}-byte limit"
                )
            payload = self._read_exactly(length, what)
            (crc,) = _CRC.unpack(self._read_exactly(_CRC.size, f"checksum of {what}"))
            if zlib.crc32(payload, zlib.crc32(head)) != crc:
                raise ChecksumError(f".ecdc stream is corrupted: CRC32 mismatch in {what}")

            if ctype == CHUNK_CODES:
                index, n_frames = self._code_head(payload, what)
                if index != self.chunks_read:
                    raise FormatError(
                        f"corrupt .ecdc stream: {what} is numbered {index}; "
                        f"code chunks are missing, duplicated or out of order"
                    )
                chunk = self._code_chunk(payload, index, n_frames, what)
                self.chunks_read += 1
                frames += n_frames
                yield chunk
            elif ctype == CHUNK_END:
                if length < _END.size:
                    raise FormatError(f"corrupt .ecdc stream: {what} is too short ({length} bytes)")
                total, count = _END.unpack_from(payload)
                if count != self.chunks_read:
                    raise FormatError(
                        f"corrupt .ecdc stream: the end marker counts {count} code chunks but "
                        f"{self.chunks_read} were read; code chunks are missing"
                    )
                if h.num_samples is not None and total != h.num_samples:
                    raise FormatError(
                        f"corrupt .ecdc stream: the end marker says {total} samples but the "
                        f"header says {h.num_samples}"
                    )
                if total > max_samples(h.sample_rate):
                    raise FormatError(
                        f"corrupt .ecdc stream: the end marker says {total} samples, more than "
                        f"{MAX_DURATION_SECONDS // 86400} days at {h.sample_rate} Hz"
                    )
                if total > frames * h.hop_length:
                    raise FormatError(
                        f"corrupt .ecdc stream: the end marker says {total} samples but the "
                        f"{frames} frames present cover at most {frames * h.hop_length}"
                    )
                original = None
                if length >= _END.size + _END_ORIGINAL.size:
                    (original,) = _END_ORIGINAL.unpack_from(payload, _END.size)
                    original = None if original == UNKNOWN_SAMPLES else original
                self.original_samples = self._plausible_original(total, original)
                self.chunks_expected = count
                self.total_samples = total
                return
            # Any other type: skipped (after its CRC was checked), as the spec requires.

    # -- salvage (version 1): stage 1, a resynchronising chunk scanner

    def _s_init(self) -> None:
        self._sbuf = bytearray()  # bytes of the stream from absolute offset _sbase on
        self._sbase = self._pos
        self._seof = False
        self._scredit = _SCAN_CREDIT_START

    def _s_end(self) -> int:
        return self._sbase + len(self._sbuf)

    def _s_fill(self, end: int, exact: bool) -> bool:
        """Make the stream up to absolute offset ``end`` available; False if it ends first.

        ``exact`` reads no further than asked, so an undamaged stream is never
        read past its end marker; the scan reads ahead in pieces.
        """
        have = self._s_end()
        while have < end and not self._seof:
            want = end - have if exact else max(end - have, _SCAN_PIECE)
            data = self._read_upto(want)
            if len(data) < want:
                self._seof = True
            self._sbuf += data
            have += len(data)
        return have >= end

    def _s_drop(self, pos: int) -> None:
        """Forget the bytes before ``pos``; moving past them earns scan credit."""
        n = min(pos - self._sbase, len(self._sbuf))
        if n > 0:
            del self._sbuf[:n]
            self._sbase += n
            self._scredit += _SCAN_CREDIT_PER_BYTE * n

    def _s_try(self, q: int, scanning: bool) -> tuple[tuple | None, str]:
        """Parse the chunk at absolute offset ``q``: (event, "") or (None, what is wrong).

        Cheap checks (length limits, a code chunk's length against its frame
        count) come before the payload is read and its CRC checked.
        """
        h = self.header
        exact = not scanning
        scale_size = _SCALE.size if h.has_scale else 0
        off = q - self._sbase
        if not self._s_fill(q + _CHUNK_HEAD.size, exact):
            return None, "truncated chunk header"
        ctype, length = _CHUNK_HEAD.unpack_from(self._sbuf, off)
        if length > MAX_CHUNK_PAYLOAD:
            return None, f"invalid length field ({length} bytes)"
        n_frames = 0
        if ctype == CHUNK_CODES:
            if length < _CODE_HEAD.size + scale_size:
                return None, f"invalid length field ({length} bytes)"
            if not self._s_fill(q + _CHUNK_HEAD.size + _CODE_HEAD.size, exact):
                return None, "truncated"
            _, n_frames = _CODE_HEAD.unpack_from(self._sbuf, off + _CHUNK_HEAD.size)
            if (n_frames < 1 or n_frames * h.streams * h.num_codebooks > MAX_CHUNK_CODES
                    or length != _CODE_HEAD.size + scale_size + _expected_code_bytes(h, n_frames)):
                return None, f"length field ({length} bytes) does not fit its {n_frames} frames"
            if h.segmented and n_frames > h.segment_frames:
                return None, f"{n_frames} frames, more than one segment holds ({h.segment_frames})"
        elif ctype == CHUNK_END:
            if length < _END.size:
                return None, f"invalid length field ({length} bytes)"
        elif scanning:
            return None, "not a resynchronisation point"
        size = _CHUNK_HEAD.size + length + _CRC.size
        if scanning:
            if size > self._scredit:
                return None, "scan budget exhausted"
            self._scredit -= size
        if not self._s_fill(q + size, exact):
            return None, f"truncated ({length}-byte payload, {max(self._s_end() - q - 5, 0)} bytes present)"
        raw = bytes(self._sbuf[off:off + size])
        (crc,) = _CRC.unpack_from(raw, size - _CRC.size)
        if zlib.crc32(memoryview(raw)[:size - _CRC.size]) != crc:
            return None, "CRC mismatch"
        payload = raw[_CHUNK_HEAD.size:_CHUNK_HEAD.size + length]
        if ctype == CHUNK_CODES:
            index, _ = _CODE_HEAD.unpack_from(payload)
            try:
                chunk = self._code_chunk(payload, index, n_frames, f"the chunk at byte {q}")
            except FormatError as exc:
                return None, str(exc).replace("corrupt .ecdc stream: ", "")
            return ("chunk", q, q + size, chunk), ""
        if ctype == CHUNK_END:
            total, count = _END.unpack_from(payload)
            original = None
            if length >= _END.size + _END_ORIGINAL.size:
                (original,) = _END_ORIGINAL.unpack_from(payload, _END.size)
                original = None if original == UNKNOWN_SAMPLES else original
            return ("end", q, q + size, total, count, original), ""
        return ("other", q, q + size), ""

    def _s_scan(self, start: int) -> tuple[tuple | None, int]:
        """Find the first intact code chunk or end marker at or after ``start``.

        Returns (its event, its offset), or (None, end of stream).
        """
        pos = start
        while True:
            self._s_drop(pos)
            m = _RESYNC_TYPES.search(self._sbuf, pos - self._sbase)
            if m is None:
                pos = self._s_end()
                self._s_drop(pos)
                if not self._s_fill(pos + 1, exact=False):
                    return None, pos
                continue
            q = self._sbase + m.start()
            event, _ = self._s_try(q, scanning=True)
            if event is not None:
                return event, q
            pos = q + 1

    def _s_unread(self) -> None:
        """Give back bytes read ahead past the end marker, where the file can seek."""
        extra = len(self._sbuf)
        self._sbuf = bytearray()
        if not extra:
            return
        try:
            if self._f.seekable():
                self._f.seek(-extra, io.SEEK_CUR)
                self._pos -= extra
        except (AttributeError, OSError, ValueError):
            pass

    def _v1_events(self) -> Iterator[tuple]:
        """Stage 1 of salvage: the stream as events, resynchronising after damage.

        Events: ("chunk", start, end, CodeChunk), ("end", start, end, total,
        count, original), ("other", start, end), ("skip", start, end, reason)
        for unreadable bytes, and finally ("eof", offset) unless "end" came.
        """
        self._s_init()
        pos = self._sbase
        names = {CHUNK_CODES: "code chunk", CHUNK_END: "end marker"}
        while True:
            if not self._s_fill(pos + 1, exact=True):
                yield ("eof", pos)
                return
            event, problem = self._s_try(pos, scanning=False)
            if event is None:
                ctype = self._sbuf[pos - self._sbase]
                name = names.get(ctype, f"chunk of unknown type 0x{ctype:02x}")
                event, resume = self._s_scan(pos + 1)
                yield ("skip", pos, resume, f"{problem} ({name} at byte {pos})")
                if event is None:
                    yield ("eof", resume)
                    return
            pos = event[2]
            self._s_drop(pos)
            if event[0] == "end":
                self._s_unread()  # before yielding: the consumer stops at the end marker
                yield event
                return
            yield event

    # -- salvage: stage 2, gap accounting

    def _segment_frames(self, first: int, n: int, total: int | None) -> tuple[int, bool]:
        """Frames in segments ``first .. first+n-1``: (count, exact)."""
        h = self.header
        hop, seg, stride = h.hop_length, h.segment_length, h.segment_stride
        full = -(-seg // hop)
        if total is None:
            return n * full, False
        last_full = (total - seg) // stride if total >= seg else -1
        count = max(0, min(first + n - 1, last_full) - first + 1) * full
        tail = range(max(first, last_full + 1), first + n)
        if len(tail) > _MAX_EXACT_TAIL:
            return n * full, False
        for k in tail:
            rest = total - k * stride
            if rest > 0:
                count += -(-min(rest, seg) // hop)
        return count, True

    def _make_gap(self, first: int, n: int, n_frames: int, start_frame: int, start_sample: int,
                  num_samples: int, exact: bool, why: str) -> Gap:
        h = self.header
        label = f"code chunk {first}" if n == 1 else f"code chunks {first}-{first + n - 1}"
        if h.version == 0:
            label = label.replace("code chunk", "piece")
        t0 = start_sample / h.sample_rate
        t1 = (start_sample + num_samples) / h.sample_rate
        text = f"{label} ({t0:.2f}-{t1:.2f} s): {why}{_FILLED}"
        return Gap(first, n, n_frames, start_frame, start_sample, num_samples, h.sample_rate,
                   exact, text)

    def _emit(self, gap: Gap) -> Iterator[Gap]:
        self.gaps.append(gap)
        self.damage.append(gap.description)
        self._silence += gap.num_samples
        yield gap

    def _stream_size(self) -> int | None:
        """Bytes in the whole stream where the file object can tell (a file), else None."""
        try:
            if not self._f.seekable():
                return None
            here = self._f.tell()
            end = self._f.seek(0, io.SEEK_END)
            self._f.seek(here)
        except (AttributeError, OSError, ValueError):
            return None
        return self._pos + max(end - here, 0)

    def _silence_limit(self, pos: int) -> int | None:
        """Most samples of silence salvage hands out in all, ``pos`` bytes into the stream."""
        if self.max_silence is None:
            return salvage_silence_limit(self.header, max(pos, self._size or 0))
        if math.isinf(self.max_silence):
            return None  # only the format's own bounds (a week per gap)
        return int(self.max_silence * self.header.sample_rate)

    def _allows(self, silence: int, pos: int) -> bool:
        """Whether ``silence`` more samples of it stay within the limit at byte ``pos``."""
        limit = self._silence_limit(pos)
        return limit is None or self._silence + silence <= limit

    def _limit_note(self, silence: int, pos: int) -> str:
        """Why ``silence`` samples in all are too many, for a damage line."""
        rate = self.header.sample_rate
        limit = self._silence_limit(pos) or 0
        if self.max_silence is None:
            size = max(pos, self._size or 0)
            whose = f"salvage fills for a file of {size} bytes (--max-silence allows more)"
        else:
            whose = "--max-silence allows"
        return f"{silence / rate:.2f} s of silence in all, more than the {limit / rate:.2f} s {whose}"

    def _unfilled_end(self, total: int, covered: int, source: str) -> str:
        """The damage line for an end that is lost and not replaced by silence."""
        rate = self.header.sample_rate
        return (f"the {source} says the audio is {total / rate:.2f} s long, but only the first "
                f"{covered / rate:.2f} s were recovered; the last {(total - covered) / rate:.2f} s "
                f"are lost and not replaced by silence")

    @staticmethod
    def _why(pending: list[tuple[int, int, str]], sizes: bool = False) -> str:
        """What went wrong in the skipped stretches ``pending``, in a few words."""
        if not pending:
            return "missing from the file"
        reasons = [f"{reason}, {end - start} bytes skipped" if sizes else reason
                   for start, end, reason in pending[:3]]
        more = f"; and {len(pending) - 3} more damaged spots" if len(pending) > 3 else ""
        return "; ".join(reasons) + more

    def _iter_v1_salvage(self) -> Iterator[CodeChunk | Gap]:
        h = self.header
        hop, rate = h.hop_length, h.sample_rate
        known = h.num_samples
        fallback_unit = max(1, -(-rate // hop))  # the writer's ~1 s of frames per chunk
        events = self._v1_events()
        ahead: list[tuple] = []

        def pull() -> tuple:
            return ahead.pop(0) if ahead else next(events)

        def peek_next_chunk_or_end() -> tuple | None:
            """The next "chunk", "end" or "eof" event, left in the queue."""
            for i in range(_MAX_PEEK):
                if i == len(ahead):
                    ahead.append(next(events))
                if ahead[i][0] in ("chunk", "end", "eof"):
                    return ahead[i]
            return None

        expected = 0  # chunk_index of the next code chunk
        frames = 0  # frames accounted for so far, intact plus estimated gaps
        covered = 0  # first sample after the audio yielded so far (chunks and gaps)
        self._size = self._stream_size()
        unit: int | None = None  # frames in every code chunk but the last (unsegmented)
        prev: int | None = None  # frames in the last intact chunk
        pending: list[tuple[int, int, str]] = []

        # An index jump is believed only if the audio up to that chunk fits in a week.  (Not
        # the header's length: the format lets a writer put more frames than that needs.)
        max_index = max_samples(rate) // h.segment_stride + 1 if h.segmented else 0
        max_frames = max_samples(rate) // hop + 1

        def gap_before(i: int, n: int) -> Gap | None:
            """The Gap for chunks expected..i-1, or None if index i is implausible."""
            nonlocal unit
            lost = i - expected
            why = self._why(pending)
            if h.segmented:
                if i > max_index:
                    return None
                count, exact = self._segment_frames(expected, lost, known)
                return self._make_gap(expected, lost, count, frames, expected * h.segment_stride,
                                      lost * h.segment_stride, exact, why)
            exact = False
            if unit is None and prev is not None:
                unit = prev  # the chunk before the gap was not the last one
            if unit is not None:
                count = lost * unit
            else:
                # A gap at the very start: is chunk i the last one?
                nxt = peek_next_chunk_or_end()
                if nxt is not None and nxt[0] == "chunk" and nxt[3].index > i:
                    unit = n
                    count = lost * n
                elif (nxt is not None and nxt[0] == "end" and nxt[4] == i + 1
                      and nxt[3] <= max_samples(rate)):
                    count, exact = max(-(-nxt[3] // hop) - n, 0), True
                elif known is not None:
                    count = max(-(-known // hop) - n, lost * max(n, fallback_unit))
                else:
                    count = lost * max(n, fallback_unit)
            if frames + count + n > max_frames:
                return None
            return self._make_gap(expected, lost, count, frames, frames * hop, count * hop, exact, why)

        def trailing_gap(total: int, n_chunks: int) -> Gap | None:
            """The Gap for the chunks after the last intact one, from the end marker."""
            why = self._why(pending)
            if h.segmented:
                lost = n_chunks - expected
                if lost <= 0:
                    return None
                start = expected * h.segment_stride
                count, exact = self._segment_frames(expected, lost, total)
                return self._make_gap(expected, lost, count, frames, start, max(total - start, 0),
                                      exact, why)
            count = -(-total // hop) - frames
            lost = n_chunks - expected
            if lost <= 0:
                return None
            count = max(count, 0)
            return self._make_gap(expected, lost, count, frames, frames * hop, count * hop, True, why)

        def skipped_note() -> None:
            if pending:
                self.damage.append(f"{self._why(pending, sizes=True)}; no audio lost")

        while True:
            ev = pull()
            kind = ev[0]
            if kind == "skip":
                pending.append((ev[1], ev[2], ev[3]))
            elif kind == "chunk":
                chunk = ev[3]
                i, n = chunk.index, chunk.num_frames
                if i < expected:
                    self.damage.append(
                        f"code chunk {i} at byte {ev[1]} repeats an earlier chunk index "
                        f"(duplicated or out of order); ignored"
                    )
                    continue
                if i > expected:
                    gap = gap_before(i, n)
                    if gap is None:
                        self.damage.append(
                            f"a code chunk at byte {ev[1]} claims index {i}, implausibly far after "
                            f"chunk {expected - 1}; ignored"
                        )
                        continue
                    if not self._allows(gap.num_samples, ev[2]):
                        # The index proves the loss but a file this small cannot have held
                        # that much audio; filling it is what a hostile file would want.
                        self.damage.append(
                            f"{gap.description.removesuffix(_FILLED)}; filling it "
                            f"would take {self._limit_note(self._silence + gap.num_samples, ev[2])}; "
                            f"recovery stops at byte {ev[1]}"
                        )
                        return
                    frames += gap.n_frames
                    covered = max(covered, gap.end_sample)
                    yield from self._emit(gap)
                else:
                    skipped_note()
                pending = []
                if unit is None and prev is not None:
                    unit = prev
                prev = n
                frames += n
                covered = max(covered, i * h.segment_stride + n * hop if h.segmented else frames * hop)
                expected = i + 1
                self.chunks_read += 1
                yield chunk
            elif kind == "end":
                _, start, _, total, count, original = ev
                if total > max_samples(rate):
                    self.damage.append(
                        f"the end marker at byte {start} claims {total} samples, more than the "
                        f"format allows; ignored"
                    )
                    ev = ("eof", ev[2])
                    kind = "eof"
                else:
                    if known is not None and total != known:
                        self.damage.append(
                            f"the end marker says {total} samples but the header says {known}"
                        )
                    if count < expected:
                        self.damage.append(
                            f"the end marker counts {count} code chunks but chunk {expected - 1} was read"
                        )
                    gap = trailing_gap(total, count)
                    end = max(covered, gap.end_sample) if gap is not None else covered
                    extra = (gap.num_samples if gap is not None else 0) + max(total - end, 0)
                    self.chunks_expected = count
                    self.total_samples = total
                    if extra and not self._allows(extra, ev[2]):
                        # The end marker proves the length, but not that the file is big
                        # enough for that much silence: report the loss, do not fill it.
                        skipped_note()
                        self.damage.append(
                            f"{self._unfilled_end(total, covered, 'end marker')}; filling them would take "
                            f"{self._limit_note(self._silence + extra, ev[2])}"
                        )
                        return
                    if gap is not None:
                        frames += gap.n_frames
                        yield from self._emit(gap)
                    else:
                        skipped_note()
                    if not h.segmented and frames * hop < total:
                        self.damage.append(
                            f"the recovered audio covers {frames * hop} samples but the end marker "
                            f"says {total}; the end is padded with silence"
                        )
                    self._silence += max(total - end, 0)
                    self.salvaged_samples = total
                    self.original_samples = self._plausible_original(total, original)
                    return
            if kind == "eof":
                pos = ev[1]
                why = f": {self._why(pending, sizes=True)}" if pending else ""
                self.damage.append(
                    f"the file ends at byte {pos} without an intact end marker (truncated){why}"
                )
                # Nothing intact after the loss says how long it was: the header's length is
                # only a claim (81 bytes can claim a week), so the end is not filled in.
                if known is None:
                    self.damage.append(
                        "the header does not give the length (streamed file), so how much audio "
                        "was lost at the end is unknown"
                    )
                elif known > covered:
                    self.damage.append(self._unfilled_end(known, covered, "header"))
                return

    # -- version 0 (Meta)

    def _read_v0_header(self) -> EcdcHeader:
        (json_len,) = _V0_PREFIX_LEN.unpack(self._read_exactly(4, "version 0 header"))
        if not 1 <= json_len <= _V0_MAX_JSON:
            raise FormatError(
                f"corrupt version 0 .ecdc header: JSON length {json_len} is outside 1..{_V0_MAX_JSON}"
            )
        raw = self._read_exactly(json_len, "version 0 JSON header")
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise FormatError("corrupt version 0 .ecdc header: invalid JSON") from None
        if not isinstance(meta, dict):
            raise FormatError("corrupt version 0 .ecdc header: JSON is not an object")

        def field(key: str, kind: type) -> object:
            value = meta.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise FormatError(
                    f"corrupt version 0 .ecdc header: field {key!r} missing or not {kind.__name__}"
                )
            return value

        name = field("m", str)
        length = field("al", int)
        n_q = field("nc", int)
        use_lm = field("lm", bool)
        model = _V0_MODELS.get(name)  # type: ignore[arg-type]
        if model is None:
            raise FormatError(
                f"version 0 .ecdc file names unknown model {name!r}; "
                f"known: {', '.join(sorted(_V0_MODELS))}"
            )
        if use_lm:
            raise UnsupportedFeatureError(
                "this .ecdc file was written with Meta's language-model entropy coding (--lm), "
                "which ecdc does not support; re-encode without --lm"
            )
        if not 0 <= length <= max_samples(model.sample_rate):  # type: ignore[operator]
            raise FormatError(f"corrupt version 0 .ecdc header: audio length {length} out of range")
        if not 1 <= n_q <= model.max_codebooks:  # type: ignore[operator]
            raise FormatError(
                f"corrupt version 0 .ecdc header: {n_q} codebooks, {name} has 1..{model.max_codebooks}"
            )
        frame_rate = model.sample_rate / model.hop_length
        header = EcdcHeader(
            model_name=name,  # type: ignore[arg-type]
            weights_fingerprint=bytes(16),
            sample_rate=model.sample_rate,
            channels=model.channels,
            stereo_mode=model.stereo_mode,
            bandwidth=n_q * model.bits_per_code * frame_rate / 1000,  # type: ignore[operator]
            num_codebooks=n_q,  # type: ignore[arg-type]
            bits_per_code=model.bits_per_code,
            hop_length=model.hop_length,
            segment_length=model.segment_length,
            segment_stride=model.segment_stride,
            has_scale=model.has_scale,
            num_samples=length,  # type: ignore[arg-type]
            original_sample_rate=model.sample_rate,
            original_channels=model.channels,
            version=0,
        )
        header.validate()
        return header

    def _v0_segments(self) -> Iterator[tuple[int, int]]:
        """(n_frames, start_sample) of each segment, with exact integer arithmetic."""
        h = self.header
        total = h.num_samples or 0
        hop = h.hop_length
        if not h.segmented:
            if total:
                yield -(-total // hop), 0
            return
        for offset in range(0, total, h.segment_stride):
            seg_len = min(total - offset, h.segment_length)
            yield -(-seg_len // hop), offset

    def _v0_lost(self, segment: int, first_frame: int, exc: TruncatedError) -> None:
        """Salvage of a truncated version 0 file: the end is reported as lost, not filled.

        Only the header gives the length, and a 60-byte header can claim a week: with no
        intact data after the loss, nothing proves it (as for version 1, section 12).
        """
        h = self.header
        total = h.num_samples or 0
        self.damage.append(f"the file ends at byte {self._pos} (truncated): {exc}")
        if h.segmented:  # up to the end of the last intact segment
            covered = min((segment - 1) * h.segment_stride + h.segment_length, total) if segment else 0
        else:
            covered = first_frame * h.hop_length
        if total > covered:
            self.damage.append(self._unfilled_end(total, covered, "header"))

    def _iter_v0(self) -> Iterator[CodeChunk | Gap]:
        h = self.header
        n_q, bits = h.num_codebooks, h.bits_per_code
        total = h.num_samples or 0
        frames = 0
        index = 0  # segment number (segmented) or piece number (unsegmented)
        for segment, (n_frames, start) in enumerate(self._v0_segments()):
            t = start / h.sample_rate
            what = f"segment {index} (audio from {t:.2f} s)"
            scale = None
            bad_scale = False
            try:
                if h.has_scale:
                    (scale,) = _V0_SCALE.unpack(self._read_exactly(_V0_SCALE.size, f"scale of {what}"))
            except TruncatedError as exc:
                if not self.salvage:
                    raise
                self._v0_lost(segment, 0, exc)
                return
            if scale is not None and not _valid_scale(scale):
                if not self.salvage:
                    raise FormatError(f"corrupt version 0 .ecdc file: {what} has invalid scale {scale!r}")
                bad_scale = True
            # A segment's codes are one bit stream flushed at its end; unsegmented
            # files are split into byte-aligned pieces to bound memory.
            piece = n_frames if h.segmented else _V0_PIECE_FRAMES
            for first in range(0, n_frames, piece):
                m = min(piece, n_frames - first)
                try:
                    data = self._read_exactly(packed_size(m * n_q, bits), f"codes of {what}")
                except TruncatedError as exc:
                    if not self.salvage:
                        raise
                    self._v0_lost(segment, first, exc)
                    return
                if bad_scale:  # only segmented models carry a scale: one piece per segment
                    gap = self._make_gap(index, 1, m, frames, start, min(h.segment_stride, total - start),
                                         True, f"invalid scale {scale!r}")
                    yield from self._emit(gap)
                else:
                    codes = unpack_codes(data, bits, m * n_q).reshape(m, 1, n_q).transpose(1, 2, 0)
                    self.chunks_read += 1
                    yield CodeChunk(np.ascontiguousarray(codes), scale, index)
                index += 1
                frames += m
        self.total_samples = h.num_samples
        self.original_samples = h.num_samples
        if self.salvage:  # every segment was read: its gaps are backed by the bytes read
            self.salvaged_samples = h.num_samples

    # -- iteration

    def __iter__(self) -> Iterator:
        """Yield code chunks in order (and Gap markers when salvaging); consumed once."""
        return self._iter


# --------------------------------------------------------------------------- conveniences


def write_ecdc(header: EcdcHeader, chunks: Iterable[CodeChunk], total_samples: int,
               original_samples: int | None = None) -> bytes:
    """Serialise a whole version 1 file to bytes."""
    buf = io.BytesIO()
    writer = EcdcWriter(buf, header)
    for chunk in chunks:
        writer.write_chunk(chunk)
    writer.finish(total_samples, original_samples)
    return buf.getvalue()


def read_ecdc(data: bytes) -> tuple[EcdcHeader, list[CodeChunk], int]:
    """Parse a whole version 0 or 1 file from bytes: (header, chunks, total_samples)."""
    reader = EcdcReader(io.BytesIO(data))
    chunks = list(reader)
    total = reader.total_samples
    if total is None:  # pragma: no cover - iteration either sets it or raises
        raise TruncatedError(".ecdc stream ended without an end marker")
    return reader.header, chunks, total
