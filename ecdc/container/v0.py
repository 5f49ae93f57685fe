"""Reading Meta's version 0 files (encodec 0.1.1's ``compress``; docs/FORMAT.md, section 13).

Version 0 is ``"ECDC"``, a zero byte, a big-endian u32 JSON length and a JSON header
naming the model, then the codes of each segment (a big-endian float32 scale first,
for models that have one), with no checksums and no chunk framing.  The model's
parameters are not in the file: they are fixed by Meta's model code, so they are here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, TypeVar

import numpy as np

from ..bitpack import packed_size, unpack_codes
from ..errors import FormatError, TruncatedError, UnsupportedFeatureError
from .chunks import CodeChunk, Gap, valid_scale
from .header import EcdcHeader, StereoMode, max_samples
from .source import ByteSource

if TYPE_CHECKING:
    from .reader import EcdcReader

_T = TypeVar("_T")

# Largest payload a v0 JSON header may have; Meta writes ~60 bytes.
_V0_MAX_JSON = 64 * 1024
_V0_PREFIX_LEN = struct.Struct(">I")
_V0_SCALE = struct.Struct(">f")


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


def read_v0_header(source: ByteSource) -> EcdcHeader:
    """The header of a version 0 stream whose first 5 bytes (``ECDC\\0``) were read."""
    (json_len,) = _V0_PREFIX_LEN.unpack(source.read_exactly(4, "version 0 header"))
    if not 1 <= json_len <= _V0_MAX_JSON:
        raise FormatError(
            f"corrupt version 0 .ecdc header: JSON length {json_len} is outside 1..{_V0_MAX_JSON}"
        )
    raw = source.read_exactly(json_len, "version 0 JSON header")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FormatError("corrupt version 0 .ecdc header: invalid JSON") from None
    if not isinstance(meta, dict):
        raise FormatError("corrupt version 0 .ecdc header: JSON is not an object")

    def field(key: str, kind: type[_T]) -> _T:
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
    model = _V0_MODELS.get(name)
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
    if not 0 <= length <= max_samples(model.sample_rate):
        raise FormatError(f"corrupt version 0 .ecdc header: audio length {length} out of range")
    if not 1 <= n_q <= model.max_codebooks:
        raise FormatError(
            f"corrupt version 0 .ecdc header: {n_q} codebooks, {name} has 1..{model.max_codebooks}"
        )
    frame_rate = model.sample_rate / model.hop_length
    header = EcdcHeader(
        model_name=name,
        weights_fingerprint=bytes(16),
        sample_rate=model.sample_rate,
        channels=model.channels,
        stereo_mode=model.stereo_mode,
        bandwidth=n_q * model.bits_per_code * frame_rate / 1000,
        num_codebooks=n_q,
        bits_per_code=model.bits_per_code,
        hop_length=model.hop_length,
        segment_length=model.segment_length,
        segment_stride=model.segment_stride,
        has_scale=model.has_scale,
        num_samples=length,
        original_sample_rate=model.sample_rate,
        original_channels=model.channels,
        version=0,
    )
    header.validate()
    return header


def _segments(header: EcdcHeader) -> Iterator[tuple[int, int]]:
    """(n_frames, start_sample) of each segment, with exact integer arithmetic."""
    h = header
    total = h.num_samples or 0
    hop = h.hop_length
    if not h.segmented:
        if total:
            yield -(-total // hop), 0
        return
    for offset in range(0, total, h.segment_stride):
        seg_len = min(total - offset, h.segment_length)
        yield -(-seg_len // hop), offset


def _lost(reader: EcdcReader, segment: int, first_frame: int, exc: TruncatedError) -> None:
    """Salvage of a truncated version 0 file: the end is reported as lost, not filled.

    Only the header gives the length, and a 60-byte header can claim a week: with no
    intact data after the loss, nothing proves it (as for version 1, section 12).
    """
    h = reader.header
    total = h.num_samples or 0
    log = reader._log
    log.damage.append(f"the file ends at byte {reader.bytes_read} (truncated): {exc}")
    if h.segmented:  # up to the end of the last intact segment
        covered = min((segment - 1) * h.segment_stride + h.segment_length, total) if segment else 0
    else:
        covered = first_frame * h.hop_length
    if total > covered:
        log.damage.append(log.unfilled_end(total, covered, "header"))


def iter_v0(reader: EcdcReader) -> Iterator[CodeChunk | Gap]:
    """What ``reader`` yields for a version 0 stream: its segments (or pieces) in order.

    With ``reader.salvage`` a truncated end is reported and a segment with an
    invalid scale becomes a Gap; otherwise both raise.
    """
    h = reader.header
    source, log = reader._source, reader._log
    n_q, bits = h.num_codebooks, h.bits_per_code
    total = h.num_samples or 0
    frames = 0
    index = 0  # segment number (segmented) or piece number (unsegmented)
    for segment, (n_frames, start) in enumerate(_segments(h)):
        t = start / h.sample_rate
        what = f"segment {index} (audio from {t:.2f} s)"
        scale = None
        bad_scale = False
        try:
            if h.has_scale:
                (scale,) = _V0_SCALE.unpack(source.read_exactly(_V0_SCALE.size, f"scale of {what}"))
        except TruncatedError as exc:
            if not reader.salvage:
                raise
            _lost(reader, segment, 0, exc)
            return
        if scale is not None and not valid_scale(scale):
            if not reader.salvage:
                raise FormatError(f"corrupt version 0 .ecdc file: {what} has invalid scale {scale!r}")
            bad_scale = True
        # A segment's codes are one bit stream flushed at its end; unsegmented
        # files are split into byte-aligned pieces to bound memory.
        piece = n_frames if h.segmented else _V0_PIECE_FRAMES
        for first in range(0, n_frames, piece):
            m = min(piece, n_frames - first)
            try:
                data = source.read_exactly(packed_size(m * n_q, bits), f"codes of {what}")
            except TruncatedError as exc:
                if not reader.salvage:
                    raise
                _lost(reader, segment, first, exc)
                return
            if bad_scale:  # only segmented models carry a scale: one piece per segment
                gap = log.make_gap(index, 1, m, frames, start, min(h.segment_stride, total - start),
                                   True, f"invalid scale {scale!r}")
                yield from log.emit(gap)
            else:
                codes = unpack_codes(data, bits, m * n_q).reshape(m, 1, n_q).transpose(1, 2, 0)
                reader.chunks_read += 1
                yield CodeChunk(np.ascontiguousarray(codes), scale, index)
            index += 1
            frames += m
    reader.total_samples = h.num_samples
    reader.original_samples = h.num_samples
    if reader.salvage:  # every segment was read: its gaps are backed by the bytes read
        reader.salvaged_samples = h.num_samples
