"""Writing version 1 streams: header, code chunks, end marker, in order, never seeking.

Never seeking is what lets ``ecdc encode - > pipe`` work: the header may say
"sample count unknown" and the end marker, written last, says it.
"""

from __future__ import annotations

import io
from typing import BinaryIO, Iterable, Mapping

import numpy as np

from ..bitpack import pack_codes
from ..streams import write_all
from .chunks import (
    CHUNK_CODES,
    CHUNK_END,
    CODE_HEAD,
    MAX_CHUNK_CODES,
    MAX_CHUNK_PAYLOAD,
    SCALE,
    CodeChunk,
    encode_chunk,
    encode_end,
    expected_code_bytes,
    valid_scale,
)
from .header import UNKNOWN_SAMPLES, EcdcHeader, encode_header, max_samples
from .tags import tags_chunk


class EcdcWriter:
    """Streams a version 1 file to any writable binary file object; never seeks.

    The header (and the tags chunk, when there are ``tags``) is written by the
    constructor, each :meth:`write_chunk` writes one code chunk, and :meth:`finish`
    writes the end marker (without which readers report the file as truncated).
    """

    def __init__(self, fileobj: BinaryIO, header: EcdcHeader,
                 tags: Mapping[str, str] | None = None) -> None:
        header.validate()
        start = encode_header(header) + tags_chunk(tags or {})  # ValueError before anything is written
        self._f = fileobj
        self.header = header
        self.tags = dict(tags or {})
        self.chunks_written = 0
        self.frames_written = 0
        self._finished = False
        self._write(start)

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
            if not valid_scale(scale):
                raise ValueError(f"scale must be a finite float in 0..2**64, got {chunk.scale!r}")
            scale_bytes = SCALE.pack(scale)
        else:
            if chunk.scale is not None:
                raise ValueError("this header has has_scale=False: chunks must not carry a scale")
            scale_bytes = b""
        size = CODE_HEAD.size + len(scale_bytes) + expected_code_bytes(h, n_frames)
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
        payload = CODE_HEAD.pack(self.chunks_written, n_frames) + scale_bytes + packed
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
        self._write(encode_chunk(CHUNK_END, encode_end(total, self.chunks_written, original)))
        self._finished = True
        flush = getattr(self._f, "flush", None)
        if flush is not None:
            flush()


def write_ecdc(header: EcdcHeader, chunks: Iterable[CodeChunk], total_samples: int,
               original_samples: int | None = None, tags: Mapping[str, str] | None = None) -> bytes:
    """Serialise a whole version 1 file to bytes."""
    buf = io.BytesIO()
    writer = EcdcWriter(buf, header, tags)
    for chunk in chunks:
        writer.write_chunk(chunk)
    writer.finish(total_samples, original_samples)
    return buf.getvalue()
