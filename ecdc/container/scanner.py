"""Stage 1 of salvage: the chunks after a version 1 header as named events.

:class:`ResyncScanner` reads the stream chunk by chunk.  At a chunk that does not
parse (bad CRC, garbled length, truncation, garbage) it scans forward for the next
byte offset where a code chunk or end marker parses with a valid CRC, and reports
the bytes in between as a :class:`SkipEvent` saying why.  It knows nothing of gaps
or sample counts: :class:`~.salvage.GapAccountant` makes sense of its events.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterator, NamedTuple

from ..errors import FormatError
from .chunks import (
    CHUNK_CODES,
    CHUNK_END,
    CHUNK_HEAD,
    CODE_HEAD,
    END_MIN_SIZE,
    MAX_CHUNK_CODES,
    MAX_CHUNK_PAYLOAD,
    SCALE,
    CodeChunk,
    EndMarker,
    decode_code_chunk,
    expected_code_bytes,
    parse_end,
)
from .header import CRC, EcdcHeader
from .source import ByteSource
from .tags import CHUNK_TAGS

# The scan only stops at these chunk types (an unknown type carries
# optional data, so stepping over one loses nothing).
_RESYNC_TYPES = re.compile(b"[CE]")
# Bytes read at a time while scanning for the next intact chunk.
_SCAN_PIECE = 1 << 16
# The scan checks a candidate's CRC only while it has credit: a start allowance
# plus this much per byte it has moved past.  Without it a hostile file with a
# plausible chunk header every few bytes, each claiming 16 MiB, would make the
# scan quadratic; with it the work is linear in the file size.
_SCAN_CREDIT_PER_BYTE = 16
_SCAN_CREDIT_START = 2 * (MAX_CHUNK_PAYLOAD + 9)


# --------------------------------------------------------------------------- events


class ChunkEvent(NamedTuple):
    """An intact code chunk at bytes ``start`` .. ``end``."""

    start: int
    end: int
    chunk: CodeChunk


class EndEvent(NamedTuple):
    """An intact end marker at bytes ``start`` .. ``end``; the last event."""

    start: int
    end: int
    marker: EndMarker


class OtherEvent(NamedTuple):
    """An intact chunk of another type (optional data, skipped as the spec says)."""

    start: int
    end: int


class SkipEvent(NamedTuple):
    """Bytes ``start`` .. ``end`` that did not parse, and why, in a few words."""

    start: int
    end: int
    reason: str


class EofEvent(NamedTuple):
    """The stream ended at byte ``offset`` without an intact end marker; the last event."""

    offset: int


#: What :meth:`ResyncScanner.events` yields.
Event = ChunkEvent | EndEvent | OtherEvent | SkipEvent | EofEvent
_Parsed = ChunkEvent | EndEvent | OtherEvent


# --------------------------------------------------------------------------- stage 1


class ResyncScanner:
    """Stage 1: the chunks after the header as events, resynchronising after damage.

    Holds at most one chunk (16 MiB) plus a 64 KiB scan piece in memory.  An
    undamaged stream is never read past its end marker; after a resync the bytes
    read past it are given back where the file can seek.
    """

    def __init__(self, source: ByteSource, header: EcdcHeader) -> None:
        self._source = source
        self._header = header
        self._buf = bytearray()  # bytes of the stream from absolute offset _base on
        self._base = source.pos
        self._eof = False
        self._credit = _SCAN_CREDIT_START

    def events(self) -> Iterator[Event]:
        """Every event up to and including an EndEvent or EofEvent."""
        pos = self._base
        names = {CHUNK_CODES: "code chunk", CHUNK_END: "end marker", CHUNK_TAGS: "tags chunk"}
        while True:
            if not self._fill(pos + 1, exact=True):
                yield EofEvent(pos)
                return
            event, problem = self._try(pos, scanning=False)
            if event is None:
                ctype = self._buf[pos - self._base]
                name = names.get(ctype, f"chunk of unknown type 0x{ctype:02x}")
                event, resume = self._scan(pos + 1)
                yield SkipEvent(pos, resume, f"{problem} ({name} at byte {pos})")
                if event is None:
                    yield EofEvent(resume)
                    return
            pos = event.end
            self._drop(pos)
            if isinstance(event, EndEvent):
                self._unread()  # before yielding: the consumer stops at the end marker
                yield event
                return
            yield event

    def _buffer_end(self) -> int:
        return self._base + len(self._buf)

    def _fill(self, end: int, exact: bool) -> bool:
        """Make the stream up to absolute offset ``end`` available; False if it ends first.

        ``exact`` reads no further than asked, so an undamaged stream is never
        read past its end marker; the scan reads ahead in pieces.
        """
        have = self._buffer_end()
        while have < end and not self._eof:
            want = end - have if exact else max(end - have, _SCAN_PIECE)
            data = self._source.read_upto(want)
            if len(data) < want:
                self._eof = True
            self._buf += data
            have += len(data)
        return have >= end

    def _drop(self, pos: int) -> None:
        """Forget the bytes before ``pos``; moving past them earns scan credit."""
        n = min(pos - self._base, len(self._buf))
        if n > 0:
            del self._buf[:n]
            self._base += n
            self._credit += _SCAN_CREDIT_PER_BYTE * n

    def _try(self, q: int, scanning: bool) -> tuple[_Parsed | None, str]:
        """Parse the chunk at absolute offset ``q``: (event, "") or (None, what is wrong).

        Cheap checks (length limits, a code chunk's length against its frame
        count) come before the payload is read and its CRC checked.
        """
        h = self._header
        exact = not scanning
        scale_size = SCALE.size if h.has_scale else 0
        off = q - self._base
        if not self._fill(q + CHUNK_HEAD.size, exact):
            return None, "truncated chunk header"
        ctype, length = CHUNK_HEAD.unpack_from(self._buf, off)
        if length > MAX_CHUNK_PAYLOAD:
            return None, f"invalid length field ({length} bytes)"
        n_frames = 0
        if ctype == CHUNK_CODES:
            if length < CODE_HEAD.size + scale_size:
                return None, f"invalid length field ({length} bytes)"
            if not self._fill(q + CHUNK_HEAD.size + CODE_HEAD.size, exact):
                return None, "truncated"
            _, n_frames = CODE_HEAD.unpack_from(self._buf, off + CHUNK_HEAD.size)
            if (n_frames < 1 or n_frames * h.streams * h.num_codebooks > MAX_CHUNK_CODES
                    or length != CODE_HEAD.size + scale_size + expected_code_bytes(h, n_frames)):
                return None, f"length field ({length} bytes) does not fit its {n_frames} frames"
            if h.segmented and n_frames > h.segment_frames:
                return None, f"{n_frames} frames, more than one segment holds ({h.segment_frames})"
        elif ctype == CHUNK_END:
            if length < END_MIN_SIZE:
                return None, f"invalid length field ({length} bytes)"
        elif scanning:
            return None, "not a resynchronisation point"
        size = CHUNK_HEAD.size + length + CRC.size
        if scanning:
            if size > self._credit:
                return None, "scan budget exhausted"
            self._credit -= size
        if not self._fill(q + size, exact):
            return None, f"truncated ({length}-byte payload, {max(self._buffer_end() - q - 5, 0)} bytes present)"
        raw = bytes(self._buf[off:off + size])
        (crc,) = CRC.unpack_from(raw, size - CRC.size)
        if zlib.crc32(memoryview(raw)[:size - CRC.size]) != crc:
            return None, "CRC mismatch"
        payload = raw[CHUNK_HEAD.size:CHUNK_HEAD.size + length]
        what = f"the chunk at byte {q}"
        if ctype == CHUNK_CODES:
            index, _ = CODE_HEAD.unpack_from(payload)
            try:
                chunk = decode_code_chunk(h, payload, index, n_frames, what)
            except FormatError as exc:
                return None, str(exc).replace("corrupt .ecdc stream: ", "")
            return ChunkEvent(q, q + size, chunk), ""
        if ctype == CHUNK_END:
            return EndEvent(q, q + size, parse_end(payload, what)), ""
        return OtherEvent(q, q + size), ""

    def _scan(self, start: int) -> tuple[_Parsed | None, int]:
        """Find the first intact code chunk or end marker at or after ``start``.

        Returns (its event, its offset), or (None, end of stream).
        """
        pos = start
        while True:
            self._drop(pos)
            m = _RESYNC_TYPES.search(self._buf, pos - self._base)
            if m is None:
                pos = self._buffer_end()
                self._drop(pos)
                if not self._fill(pos + 1, exact=False):
                    return None, pos
                continue
            q = self._base + m.start()
            event, _ = self._try(q, scanning=True)
            if event is not None:
                return event, q
            pos = q + 1

    def _unread(self) -> None:
        """Give back bytes read ahead past the end marker, where the file can seek."""
        extra = len(self._buf)
        self._buf = bytearray()
        if not extra:
            return
        self._source.unread(extra)
