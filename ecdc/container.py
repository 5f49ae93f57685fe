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

This module deliberately imports only numpy and the standard library.
"""

from __future__ import annotations

import enum
import io
import json
import math
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

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FORMAT_MINOR",
    "READABLE_VERSIONS",
    "CHUNK_CODES",
    "CHUNK_END",
    "MAX_CHUNK_PAYLOAD",
    "UNKNOWN_SAMPLES",
    "StereoMode",
    "EcdcHeader",
    "CodeChunk",
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
MAX_MODEL_CHANNELS = 16
MAX_ORIGINAL_CHANNELS = 1024
MAX_CODEBOOKS = 64
MAX_HOP_LENGTH = 1 << 16
MAX_SEGMENT_LENGTH = 1 << 24
MAX_NAME_BYTES = 255

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

_F32_MAX = float(np.finfo(np.float32).max)


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
            ("original_sample_rate", 1, MAX_SAMPLE_RATE),
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
        # Raw (unbuffered) file objects may write only part of the data.
        view = memoryview(data)
        while view:
            n = self._f.write(view)
            if n is None:
                return
            view = view[n:]

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
            if not (math.isfinite(scale) and 0.0 <= scale <= _F32_MAX):
                raise ValueError(f"scale must be a finite float32 >= 0, got {chunk.scale!r}")
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


class EcdcReader:
    """Reads a version 0 or 1 stream incrementally from a binary file object.

    The constructor reads and validates the header (available as
    :attr:`header`); iterating yields :class:`CodeChunk` objects.  Only
    ``read`` is called on the file object, so pipes work.  After iteration
    :attr:`total_samples` holds the authoritative sample count.  Problems are
    reported as FormatError subclasses: TruncatedError, ChecksumError,
    UnsupportedVersionError, UnsupportedFeatureError.
    """

    header: EcdcHeader
    total_samples: int | None
    original_samples: int | None

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self._pos = 0
        self.total_samples = None
        self.original_samples = None
        self.chunks_read = 0
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
            self._iter = self._iter_v0()
        elif major == 1:
            self.header = self._read_v1_header(start)
            self._iter = self._iter_v1()
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

    def _iter_v1(self) -> Iterator[CodeChunk]:
        h = self.header
        frames = 0
        scale_size = _SCALE.size if h.has_scale else 0
        n_codes_per_frame = h.streams * h.num_codebooks
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
                if length < _CODE_HEAD.size + scale_size:
                    raise FormatError(f"corrupt .ecdc stream: {what} is too short ({length} bytes)")
                index, n_frames = _CODE_HEAD.unpack_from(payload)
                if index != self.chunks_read:
                    raise FormatError(
                        f"corrupt .ecdc stream: {what} is numbered {index}; "
                        f"code chunks are missing, duplicated or out of order"
                    )
                if n_frames < 1:
                    raise FormatError(f"corrupt .ecdc stream: {what} holds no frames")
                expected = _CODE_HEAD.size + scale_size + _expected_code_bytes(h, n_frames)
                if length != expected:
                    raise FormatError(
                        f"corrupt .ecdc stream: {what} is {length} bytes, but {n_frames} frames "
                        f"need {expected}"
                    )
                scale = None
                if h.has_scale:
                    (scale,) = _SCALE.unpack_from(payload, _CODE_HEAD.size)
                    if not (math.isfinite(scale) and scale >= 0.0):
                        raise FormatError(f"corrupt .ecdc stream: {what} has invalid scale {scale!r}")
                codes = unpack_codes(
                    memoryview(payload)[_CODE_HEAD.size + scale_size:],
                    h.bits_per_code,
                    n_frames * n_codes_per_frame,
                )
                codes = codes.reshape(n_frames, h.streams, h.num_codebooks).transpose(1, 2, 0)
                self.chunks_read += 1
                frames += n_frames
                yield CodeChunk(np.ascontiguousarray(codes), scale)
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
                if total > frames * h.hop_length:
                    raise FormatError(
                        f"corrupt .ecdc stream: the end marker says {total} samples but the "
                        f"{frames} frames present cover at most {frames * h.hop_length}"
                    )
                if length >= _END.size + _END_ORIGINAL.size:
                    (original,) = _END_ORIGINAL.unpack_from(payload, _END.size)
                    self.original_samples = None if original == UNKNOWN_SAMPLES else original
                self.total_samples = total
                return
            # Any other type: skipped (after its CRC was checked), as the spec requires.

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
        if not 0 <= length < 2**63:  # type: ignore[operator]
            raise FormatError(f"corrupt version 0 .ecdc header: audio length {length} out of range")
        if not 1 <= n_q <= model.max_codebooks:  # type: ignore[operator]
            raise FormatError(
                f"corrupt version 0 .ecdc header: {n_q} codebooks, {name} has 1..{model.max_codebooks}"
            )
        frame_rate = model.sample_rate / model.hop_length
        return EcdcHeader(
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

    def _iter_v0(self) -> Iterator[CodeChunk]:
        h = self.header
        n_q, bits = h.num_codebooks, h.bits_per_code
        for n_frames, start in self._v0_segments():
            t = start / h.sample_rate
            what = f"segment {self.chunks_read} (audio from {t:.2f} s)"
            scale = None
            if h.has_scale:
                (scale,) = _V0_SCALE.unpack(self._read_exactly(_V0_SCALE.size, f"scale of {what}"))
            # A segment's codes are one bit stream flushed at its end; unsegmented
            # files are split into byte-aligned pieces to bound memory.
            piece = n_frames if h.segmented else _V0_PIECE_FRAMES
            for first in range(0, n_frames, piece):
                m = min(piece, n_frames - first)
                data = self._read_exactly(packed_size(m * n_q, bits), f"codes of {what}")
                codes = unpack_codes(data, bits, m * n_q).reshape(m, 1, n_q).transpose(1, 2, 0)
                self.chunks_read += 1
                yield CodeChunk(np.ascontiguousarray(codes), scale)
        self.total_samples = h.num_samples
        self.original_samples = h.num_samples

    # -- iteration

    def __iter__(self) -> Iterator[CodeChunk]:
        """Yield code chunks in order; the stream is consumed once."""
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
