"""Reading ``.ecdc`` streams: the strict version 1 reader, and the dispatch to the others.

The strict reader refuses a damaged file with an error that names the chunk, its audio
time and its byte offset; ``salvage=True`` hands version 1 to :mod:`.salvage`, and
Meta's version 0 goes to :mod:`.v0` either way.
"""

from __future__ import annotations

import io
import zlib
from typing import BinaryIO, Iterator

from ..errors import ChecksumError, FormatError, TruncatedError, UnsupportedVersionError
from .chunks import (
    CHUNK_CODES,
    CHUNK_END,
    CHUNK_HEAD,
    MAX_CHUNK_PAYLOAD,
    CodeChunk,
    Gap,
    chunk_start_seconds,
    code_head,
    decode_code_chunk,
    parse_end,
    plausible_original,
)
from .header import (
    CRC,
    MAGIC,
    MAX_DURATION_SECONDS,
    PREFIX,
    READABLE_VERSIONS,
    EcdcHeader,
    decode_body,
    max_samples,
)
from .salvage import DamageLog, GapAccountant
from .scanner import ResyncScanner
from .source import ByteSource
from .tags import CHUNK_TAGS, MAX_TAGS_PAYLOAD, Tags, parse_tags, tags_head
from .v0 import iter_v0, read_v0_header


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
    in order, :attr:`damage` describes what was lost (see the package docstring).
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
        self._source = ByteSource(fileobj)
        self.salvage = bool(salvage)
        if max_silence is not None and not max_silence >= 0:
            raise ValueError(f"max_silence must be a number of seconds >= 0, got {max_silence!r}")
        self.total_samples = None
        self.original_samples = None
        #: Salvage mode: the length (at the model's rate) the evidence says the recovered
        #: audio has, gaps and end included: the end marker's count when it survived and
        #: the silence it implies is allowed.  None: keep what was recovered, trimmed to
        #: ``total_samples`` or ``header.num_samples`` when known; never padded to them.
        self.salvaged_samples: int | None = None
        self.chunks_read = 0
        #: Code chunk count from the end marker (None until it is read, or if it was lost).
        self.chunks_expected: int | None = None
        start = self._source.read_upto(5)
        if not start:
            raise TruncatedError("input is empty, not an .ecdc stream")
        if start[:4] != MAGIC[:len(start[:4])]:
            raise FormatError("not an .ecdc stream (the file does not start with 'ECDC')")
        if len(start) < 5:
            raise TruncatedError(f".ecdc stream truncated after {len(start)} bytes, inside its header")
        major = start[4]
        if major == 0:
            self.header = read_v0_header(self._source)
        elif major == 1:
            self.header = self._read_v1_header(start)
        else:
            raise UnsupportedVersionError(
                f"this file uses .ecdc format version {major}; this ecdc reads versions "
                f"{' and '.join(map(str, READABLE_VERSIONS))}; upgrade ecdc to read it"
            )
        self._log = DamageLog(self.header, max_silence)
        #: Salvage mode: one line per problem found, in stream order.
        self.damage: list[str] = self._log.damage
        #: Salvage mode: every Gap yielded so far.
        self.gaps: list[Gap] = self._log.gaps
        #: The file's tags (docs/FORMAT.md, section 13); empty if it has none (or, when
        #: salvaging, if its tags chunk was damaged: ``damage`` then says so).
        self.tags: Tags = {}
        if major == 1:
            self._read_tags()
        self._iter: Iterator[CodeChunk | Gap]
        if major == 0:
            self._iter = iter_v0(self)
        elif self.salvage:
            self._iter = iter(GapAccountant(self, ResyncScanner(self._source, self.header).events()))
        else:
            self._iter = self._iter_v1()

    @property
    def max_silence(self) -> float | None:
        """Most seconds of silence salvage puts in place of lost audio (None: by file size)."""
        return self._log.max_silence

    @max_silence.setter
    def max_silence(self, value: float | None) -> None:
        self._log.max_silence = value

    @property
    def bytes_read(self) -> int:
        """Bytes of the input consumed so far: after iteration, the size of the stream read.

        Counts what this reader took from the file object, so a caller need not wrap
        it to learn a file's size.  After a salvage resync, bytes read ahead past the
        end marker are given back (and not counted) where the file can seek; on a pipe
        they stay read.
        """
        return self._source.pos

    # -- version 1

    def _read_v1_header(self, start: bytes) -> EcdcHeader:
        rest = self._source.read_exactly(PREFIX.size - len(start), "header")
        prefix = start + rest
        _, _, _minor, body_len = PREFIX.unpack(prefix)
        body = self._source.read_exactly(body_len, "header")
        (crc,) = CRC.unpack(self._source.read_exactly(CRC.size, "header checksum"))
        if zlib.crc32(body, zlib.crc32(prefix)) != crc:
            raise ChecksumError(".ecdc header is corrupted (CRC32 mismatch)")
        return decode_body(body)

    def _read_tags(self) -> None:
        """The tags chunk, if the chunk after the header is one (the only place one counts).

        Read here, before any audio, so that a decoder knows the tags before it opens its
        output. Whatever is not an intact tags chunk is pushed back for the chunk reader,
        which reports a damaged one as it reports any chunk (strict) or steps over it
        (salvage); a salvaging read also says here that the tags are lost.
        """
        source = self._source
        offset = source.pos
        head = source.read_upto(CHUNK_HEAD.size)
        length = tags_head(head)
        if length is None:
            source.push_back(head)
            return
        what = f"tags chunk (byte {offset})"
        if length > MAX_TAGS_PAYLOAD:
            problem = f"{what} claims {length} bytes, more than the {MAX_TAGS_PAYLOAD}-byte limit"
            if not self.salvage:
                raise FormatError(f"corrupt .ecdc stream: {problem}")
            self._log.damage.append(f"the {problem}; the tags are dropped")
            source.push_back(head)
            return
        rest = source.read_upto(length + CRC.size)
        raw = head + rest
        intact = len(rest) == length + CRC.size
        if intact:
            (crc,) = CRC.unpack_from(raw, len(raw) - CRC.size)
            intact = zlib.crc32(memoryview(raw)[:len(raw) - CRC.size]) == crc
        if not intact:
            if self.salvage:
                self._log.damage.append(f"the {what} is damaged (truncated or CRC mismatch); "
                                        f"the tags are dropped")
            source.push_back(raw)
            return
        try:
            self.tags = parse_tags(raw[CHUNK_HEAD.size:CHUNK_HEAD.size + length], what)
        except FormatError as exc:
            if not self.salvage:
                raise
            self._log.damage.append(f"{str(exc).removeprefix('corrupt .ecdc stream: ')}; "
                                    f"the tags are dropped")

    def _describe(self, ctype: int, offset: int, frames_before: int) -> str:
        if ctype == CHUNK_CODES:
            t = chunk_start_seconds(self.header, self.chunks_read, frames_before)
            return f"code chunk {self.chunks_read} (audio from {t:.2f} s, byte {offset})"
        if ctype == CHUNK_END:
            return f"end marker (byte {offset})"
        if ctype == CHUNK_TAGS:
            return f"tags chunk (byte {offset}, after {self.chunks_read} code chunks)"
        return f"chunk of type 0x{ctype:02x} (byte {offset}, after {self.chunks_read} code chunks)"

    def _iter_v1(self) -> Iterator[CodeChunk]:
        """Strict reading: every chunk intact, numbered in order, and the end marker agreeing."""
        h = self.header
        source = self._source
        frames = 0
        while True:
            offset = source.pos
            head = source.read_upto(CHUNK_HEAD.size)
            if len(head) < CHUNK_HEAD.size:
                t = chunk_start_seconds(h, self.chunks_read, frames)
                raise TruncatedError(
                    f".ecdc stream truncated: it ends at byte {offset + len(head)} without an end "
                    f"marker, after {self.chunks_read} code chunks ({t:.2f} s of audio)"
                )
            ctype, length = CHUNK_HEAD.unpack(head)
            what = self._describe(ctype, offset, frames)
            if length > MAX_CHUNK_PAYLOAD:
                raise FormatError(
                    f"corrupt .ecdc stream: {what} claims {length} bytes, more than the "
                    f"{MAX_CHUNK_PAYLOAD}-byte limit"
                )
            payload = source.read_exactly(length, what)
            (crc,) = CRC.unpack(source.read_exactly(CRC.size, f"checksum of {what}"))
            if zlib.crc32(payload, zlib.crc32(head)) != crc:
                raise ChecksumError(f".ecdc stream is corrupted: CRC32 mismatch in {what}")

            if ctype == CHUNK_CODES:
                index, n_frames = code_head(h, payload, what)
                if index != self.chunks_read:
                    raise FormatError(
                        f"corrupt .ecdc stream: {what} is numbered {index}; "
                        f"code chunks are missing, duplicated or out of order"
                    )
                chunk = decode_code_chunk(h, payload, index, n_frames, what)
                self.chunks_read += 1
                frames += n_frames
                yield chunk
            elif ctype == CHUNK_END:
                total, count, original = parse_end(payload, what)
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
                self.original_samples = plausible_original(h, total, original)
                self.chunks_expected = count
                self.total_samples = total
                return
            # Any other type: skipped (after its CRC was checked), as the spec requires.

    # -- iteration

    def __iter__(self) -> Iterator:
        """Yield code chunks in order (and Gap markers when salvaging); consumed once."""
        return self._iter


def read_ecdc(data: bytes) -> tuple[EcdcHeader, list[CodeChunk], int]:
    """Parse a whole version 0 or 1 file from bytes: (header, chunks, total_samples)."""
    reader = EcdcReader(io.BytesIO(data))
    chunks = list(reader)
    total = reader.total_samples
    if total is None:  # pragma: no cover - iteration either sets it or raises
        raise TruncatedError(".ecdc stream ended without an end marker")
    return reader.header, chunks, total
