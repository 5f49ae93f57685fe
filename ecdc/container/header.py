"""The version 1 header (docs/FORMAT.md, section 3) and the limits every field is held to.

The header is the one part of a file salvage cannot do without, so it is validated
completely here, field by field, before anything reads a chunk against it.
"""

from __future__ import annotations

import enum
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ..bitpack import MAX_BITS
from ..errors import FormatError, UnsupportedFeatureError

MAGIC = b"ECDC"
#: Major format version written by this module.
FORMAT_VERSION = 1
#: Minor format version written by this module: 1 when a file uses what version 1.1 adds
#: (a channel mask, SEPARATE streams), else 0, so a file that uses none of it is a 1.0 file.
FORMAT_MINOR = 1
#: Major versions this module can read.
READABLE_VERSIONS = (0, 1)

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
#: Most code streams of a SEPARATE file (one per input channel): 22.2, the largest standard
#: layout, has 24. Each stream is a batch item through the model, so this bounds the work
#: and memory one frame asks for.
MAX_SEPARATE_STREAMS = 24
#: The WAVE_FORMAT_EXTENSIBLE speaker bits (FL 0x1 .. TBR 0x20000) a channel mask may set.
MAX_CHANNEL_MASK = 0x3FFFF
MAX_HOP_LENGTH = 1 << 16
MAX_SEGMENT_LENGTH = 1 << 24
MAX_NAME_BYTES = 255
#: Longest audio a header or end marker may claim, in seconds (one week).  Nobody codes
#: a week into one stream, so more is damage or an attack; the bound also keeps a
#: salvaging decoder from being told to produce years of silence.
MAX_DURATION_SECONDS = 7 * 24 * 3600
#: Floor of the sample-count bound, for sample rates so low that a week is fewer samples.
_MIN_SAMPLE_BOUND = 1 << 32

_FLAG_SCALE = 0x01
#: Set exactly when stereo_mode is SEPARATE, so that a reader of version 1.0, which cannot
#: know how many streams such a file has, refuses it as a newer feature.
_FLAG_SEPARATE = 0x02
_KNOWN_FLAGS = _FLAG_SCALE | _FLAG_SEPARATE

# Header prefix: magic, major, minor, body length.
PREFIX = struct.Struct("<4sBBH")
# Fixed part of the version 1.0 header body (file offsets 8..63).
_BODY = struct.Struct("<IIIIII Q 16s H BBBBBB")  # struct ignores the spaces
# Version 1.1's field after the model name: the input's channel mask.
_MASK = struct.Struct("<I")
#: The CRC32 that ends the header and every chunk.
CRC = struct.Struct("<I")


def max_samples(sample_rate: int) -> int:
    """Largest sample count a file at ``sample_rate`` may claim (one week, at least 2**32)."""
    return max(MAX_DURATION_SECONDS * int(sample_rate), _MIN_SAMPLE_BOUND)


class StereoMode(enum.IntEnum):
    """How the input's channels map onto what the model codes."""

    MONO = 0  #: single-channel input, single-channel model
    JOINT = 1  #: the model codes all channels together (e.g. the stereo 48 kHz model)
    DOWNMIX = 2  #: multi-channel input mixed to mono for a mono model
    DUAL = 3  #: each of 2 channels coded separately through a mono model (2 code streams)
    SEPARATE = 4  #: each of original_channels channels coded separately through a mono model


@dataclass(frozen=True)
class EcdcHeader:
    """Everything a decoder needs to know before the first chunk.

    ``bandwidth`` is in kbps (stored in the file as whole bits per second).
    ``num_samples`` is at the model's sample rate; None means the writer was
    streaming and the end chunk carries the count.  Decoders must not
    preallocate from ``num_samples`` (a hostile file can claim anything); the
    reader checks it against the end chunk and the frames actually present.
    ``channel_mask`` is the input's WAVE_FORMAT_EXTENSIBLE speaker mask, 0 for the
    default layout of ``original_channels`` (docs/FORMAT.md, section 3).
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
    channel_mask: int = 0

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
        """Independent code streams per frame: 2 for DUAL, one per input channel for
        SEPARATE, else 1."""
        if self.stereo_mode == StereoMode.SEPARATE:
            return self.original_channels
        return 2 if self.stereo_mode == StereoMode.DUAL else 1

    @property
    def minor_version(self) -> int:
        """The minor version this header is written as: 1 only if it needs version 1.1."""
        return FORMAT_MINOR if self.channel_mask or self.stereo_mode == StereoMode.SEPARATE else 0

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
        if mode == StereoMode.SEPARATE and not (ch == 1 and 2 <= orig <= MAX_SEPARATE_STREAMS):
            raise bad(f"SEPARATE needs channels == 1 and original_channels in 2..{MAX_SEPARATE_STREAMS}, "
                      f"got {ch} and {orig}")
        if not is_int(self.channel_mask) or not 0 <= self.channel_mask <= MAX_CHANNEL_MASK:
            raise bad(f"channel_mask must be an integer in 0..0x{MAX_CHANNEL_MASK:X}, got {self.channel_mask!r}")
        if int(self.channel_mask).bit_count() > orig:
            raise bad(f"channel_mask 0x{self.channel_mask:X} names more speakers than the "
                      f"{orig} original channels")
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
        (_FLAG_SCALE if header.has_scale else 0)
        | (_FLAG_SEPARATE if header.stereo_mode == StereoMode.SEPARATE else 0),
        len(name),
    ) + name
    if header.channel_mask:
        body += _MASK.pack(header.channel_mask)
    head = PREFIX.pack(MAGIC, FORMAT_VERSION, header.minor_version, len(body)) + body
    return head + CRC.pack(zlib.crc32(head))


def decode_body(body: bytes) -> EcdcHeader:
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
    if bool(flags & _FLAG_SEPARATE) != (stereo == StereoMode.SEPARATE):
        raise FormatError("corrupt .ecdc header: the SEPARATE flag and the stereo mode disagree")
    mask_at = _BODY.size + name_len
    channel_mask = _MASK.unpack_from(body, mask_at)[0] if len(body) >= mask_at + _MASK.size else 0
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
        channel_mask=channel_mask,
    )
    header.validate()
    return header
