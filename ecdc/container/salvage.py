"""Stage 2 of salvage (docs/FORMAT.md, section 12): from events to chunks and Gaps.

:class:`GapAccountant` turns the events of :class:`~.scanner.ResyncScanner` into what
a salvaging reader yields: the intact chunks, and a :class:`Gap` of silence wherever
an intact chunk after a loss (a later ``chunk_index``, or the end marker) proves audio
was lost, within the silence a file of its size may ask for.  A truncated end is
reported, not filled.  :class:`DamageLog` keeps what salvage reports (damage lines,
gaps, the silence handed out); Meta's version 0 reader uses it too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Generator, Iterator

from .chunks import CodeChunk, Gap, plausible_original
from .header import EcdcHeader, max_samples
from .scanner import ChunkEvent, EndEvent, EofEvent, Event, SkipEvent

if TYPE_CHECKING:
    from .reader import EcdcReader

#: By default salvage fills at most this many times the audio that the bytes of the file
#: could code (at the header's bits per frame) with silence, so that the output stays
#: proportional to the input: a gap has to be backed by the file's size, not only by a
#: number in it.  8 still fills a file that lost 7/8 of its chunks outright (a real
#: file also spends bytes on framing); ``EcdcReader(max_silence=...)`` sets another limit.
SALVAGE_SILENCE_RATIO = 8

# Per-segment frame counts are summed exactly for up to this many short segments.
_MAX_EXACT_TAIL = 4096
# Stream events the accountant may look ahead to size a gap at the start of a file.
_MAX_PEEK = 64
# How every gap's description ends.
_FILLED = ", replaced by silence"


def salvage_silence_limit(header: EcdcHeader, nbytes: int) -> int:
    """Samples of silence salvage fills in by default for a file of ``nbytes`` bytes.

    ``SALVAGE_SILENCE_RATIO`` times the samples that ``nbytes`` bytes of codes hold.
    """
    bits_per_frame = header.streams * header.num_codebooks * header.bits_per_code
    return SALVAGE_SILENCE_RATIO * 8 * max(int(nbytes), 0) * header.hop_length // bits_per_frame


# --------------------------------------------------------------------------- what salvage reports


def describe_skips(pending: list[SkipEvent], sizes: bool = False) -> str:
    """What went wrong in the skipped stretches ``pending``, in a few words."""
    if not pending:
        return "missing from the file"
    reasons = [f"{reason}, {end - start} bytes skipped" if sizes else reason
               for start, end, reason in pending[:3]]
    more = f"; and {len(pending) - 3} more damaged spots" if len(pending) > 3 else ""
    return "; ".join(reasons) + more


class DamageLog:
    """What a salvaging read reports: damage lines, the gaps yielded, and their silence.

    The silence is kept within a limit proportional to the file's size
    (:func:`salvage_silence_limit`), or ``max_silence`` seconds, so that a small
    hostile file cannot make a decoder produce days of output.
    """

    def __init__(self, header: EcdcHeader, max_silence: float | None) -> None:
        self.header = header
        #: Seconds; None: :func:`salvage_silence_limit` of the file's size; ``math.inf``: no limit.
        self.max_silence = max_silence
        #: One line per problem found, in stream order.
        self.damage: list[str] = []
        #: Every Gap yielded so far.
        self.gaps: list[Gap] = []
        #: Samples of silence handed out so far (gaps and end padding).
        self.silence = 0
        #: Bytes in the stream, where the file can tell (set when version 1 salvage starts).
        self.size: int | None = None

    def make_gap(self, first: int, n: int, n_frames: int, start_frame: int, start_sample: int,
                 num_samples: int, exact: bool, why: str) -> Gap:
        """A Gap for chunks ``first .. first+n-1``, with its one-line description."""
        h = self.header
        label = f"code chunk {first}" if n == 1 else f"code chunks {first}-{first + n - 1}"
        if h.version == 0:
            label = label.replace("code chunk", "piece")
        t0 = start_sample / h.sample_rate
        t1 = (start_sample + num_samples) / h.sample_rate
        text = f"{label} ({t0:.2f}-{t1:.2f} s): {why}{_FILLED}"
        return Gap(first, n, n_frames, start_frame, start_sample, num_samples, h.sample_rate,
                   exact, text)

    def emit(self, gap: Gap) -> Iterator[Gap]:
        """Record ``gap`` (gaps, damage, silence) and yield it."""
        self.gaps.append(gap)
        self.damage.append(gap.description)
        self.silence += gap.num_samples
        yield gap

    def limit(self, pos: int) -> int | None:
        """Most samples of silence salvage hands out in all, ``pos`` bytes into the stream."""
        h = self.header
        if self.max_silence is None:
            return salvage_silence_limit(h, max(pos, self.size or 0))
        if math.isinf(self.max_silence):
            return None  # only the format's own bounds (a week per gap)
        return int(self.max_silence * h.sample_rate)

    def allows(self, silence: int, pos: int) -> bool:
        """Whether ``silence`` more samples of it stay within the limit at byte ``pos``."""
        limit = self.limit(pos)
        return limit is None or self.silence + silence <= limit

    def limit_note(self, silence: int, pos: int) -> str:
        """Why ``silence`` samples in all are too many, for a damage line."""
        rate = self.header.sample_rate
        limit = self.limit(pos) or 0
        if self.max_silence is None:
            size = max(pos, self.size or 0)
            whose = f"salvage fills for a file of {size} bytes (--max-silence allows more)"
        else:
            whose = "--max-silence allows"
        return f"{silence / rate:.2f} s of silence in all, more than the {limit / rate:.2f} s {whose}"

    def unfilled_end(self, total: int, covered: int, source: str) -> str:
        """The damage line for an end that is lost and not replaced by silence."""
        rate = self.header.sample_rate
        return (f"the {source} says the audio is {total / rate:.2f} s long, but only the first "
                f"{covered / rate:.2f} s were recovered; the last {(total - covered) / rate:.2f} s "
                f"are lost and not replaced by silence")


# --------------------------------------------------------------------------- stage 2


def segment_frames(header: EcdcHeader, first: int, n: int, total: int | None) -> tuple[int, bool]:
    """Frames in segments ``first .. first+n-1`` of a segmented model: (count, exact)."""
    h = header
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


class GapAccountant:
    """Stage 2: the scanner's events as intact chunks and Gaps, in ``chunk_index`` order.

    Iterating it yields what the salvaging reader yields, and sets the reader's
    results (``chunks_read``, ``chunks_expected``, ``total_samples``,
    ``salvaged_samples``, ``original_samples``) as the evidence comes in.
    Silence is only put where an intact chunk after the loss proves it; a
    truncated end is reported, not filled.
    """

    def __init__(self, reader: EcdcReader, events: Iterator[Event]) -> None:
        self._reader = reader
        self._log: DamageLog = reader._log
        self._events = events
        self._ahead: list[Event] = []
        h = self._h = reader.header
        self._hop, self._rate = h.hop_length, h.sample_rate
        self._known = h.num_samples
        self._fallback_unit = max(1, -(-self._rate // self._hop))  # the writer's ~1 s of frames per chunk
        self._expected = 0  # chunk_index of the next code chunk
        self._frames = 0  # frames accounted for so far, intact plus estimated gaps
        self._covered = 0  # first sample after the audio yielded so far (chunks and gaps)
        self._unit: int | None = None  # frames in every code chunk but the last (unsegmented)
        self._prev: int | None = None  # frames in the last intact chunk
        self._pending: list[SkipEvent] = []  # bytes skipped since the last intact code chunk
        # An index jump is believed only if the audio up to that chunk fits in a week.  (Not
        # the header's length: the format lets a writer put more frames than that needs.)
        self._max_index = max_samples(self._rate) // h.segment_stride + 1 if h.segmented else 0
        self._max_frames = max_samples(self._rate) // self._hop + 1

    def __iter__(self) -> Iterator[CodeChunk | Gap]:
        self._log.size = self._reader._source.size()
        while True:
            ev = self._pull()
            if isinstance(ev, SkipEvent):
                self._pending.append(ev)
            elif isinstance(ev, ChunkEvent):
                if not (yield from self._on_chunk(ev)):
                    return
            elif isinstance(ev, EndEvent):
                if ev.marker.total <= max_samples(self._rate):
                    yield from self._on_end(ev)
                    return
                self._log.damage.append(
                    f"the end marker at byte {ev.start} claims {ev.marker.total} samples, more than the "
                    f"format allows; ignored"
                )
                ev = EofEvent(ev.end)
            if isinstance(ev, EofEvent):
                self._on_eof(ev)
                return

    # -- the event queue

    def _pull(self) -> Event:
        return self._ahead.pop(0) if self._ahead else next(self._events)

    def _peek_next_chunk_or_end(self) -> ChunkEvent | EndEvent | EofEvent | None:
        """The next ChunkEvent, EndEvent or EofEvent, left in the queue."""
        for i in range(_MAX_PEEK):
            if i == len(self._ahead):
                self._ahead.append(next(self._events))
            ev = self._ahead[i]
            if isinstance(ev, (ChunkEvent, EndEvent, EofEvent)):
                return ev
        return None

    # -- the events

    def _on_chunk(self, ev: ChunkEvent) -> Generator[CodeChunk | Gap, None, bool]:
        """Yield the chunk, after the Gap its index proves; returns False to stop recovery."""
        h, log = self._h, self._log
        chunk = ev.chunk
        i, n = chunk.index, chunk.num_frames
        assert i is not None  # the reader sets it
        if i < self._expected:
            log.damage.append(
                f"code chunk {i} at byte {ev.start} repeats an earlier chunk index "
                f"(duplicated or out of order); ignored"
            )
            return True
        if i > self._expected:
            gap = self._gap_before(i, n)
            if gap is None:
                log.damage.append(
                    f"a code chunk at byte {ev.start} claims index {i}, implausibly far after "
                    f"chunk {self._expected - 1}; ignored"
                )
                return True
            if not log.allows(gap.num_samples, ev.end):
                # The index proves the loss but a file this small cannot have held
                # that much audio; filling it is what a hostile file would want.
                log.damage.append(
                    f"{gap.description.removesuffix(_FILLED)}; filling it "
                    f"would take {log.limit_note(log.silence + gap.num_samples, ev.end)}; "
                    f"recovery stops at byte {ev.start}"
                )
                return False
            self._frames += gap.n_frames
            self._covered = max(self._covered, gap.end_sample)
            yield from log.emit(gap)
        else:
            self._skipped_note()
        self._pending = []
        if self._unit is None and self._prev is not None:
            self._unit = self._prev
        self._prev = n
        self._frames += n
        self._covered = max(self._covered, i * h.segment_stride + n * self._hop if h.segmented
                            else self._frames * self._hop)
        self._expected = i + 1
        self._reader.chunks_read += 1
        yield chunk
        return True

    def _on_end(self, ev: EndEvent) -> Iterator[Gap]:
        """The end marker (its count within the format's bounds): the Gap at the end, if any."""
        h, log, reader = self._h, self._log, self._reader
        total, count, original = ev.marker
        if self._known is not None and total != self._known:
            log.damage.append(f"the end marker says {total} samples but the header says {self._known}")
        if count < self._expected:
            log.damage.append(
                f"the end marker counts {count} code chunks but chunk {self._expected - 1} was read"
            )
        gap = self._trailing_gap(total, count)
        end = max(self._covered, gap.end_sample) if gap is not None else self._covered
        extra = (gap.num_samples if gap is not None else 0) + max(total - end, 0)
        reader.chunks_expected = count
        reader.total_samples = total
        if extra and not log.allows(extra, ev.end):
            # The end marker proves the length, but not that the file is big
            # enough for that much silence: report the loss, do not fill it.
            self._skipped_note()
            log.damage.append(
                f"{log.unfilled_end(total, self._covered, 'end marker')}; filling them would take "
                f"{log.limit_note(log.silence + extra, ev.end)}"
            )
            return
        if gap is not None:
            self._frames += gap.n_frames
            yield from log.emit(gap)
        else:
            self._skipped_note()
        if not h.segmented and self._frames * self._hop < total:
            log.damage.append(
                f"the recovered audio covers {self._frames * self._hop} samples but the end marker "
                f"says {total}; the end is padded with silence"
            )
        log.silence += max(total - end, 0)
        reader.salvaged_samples = total
        reader.original_samples = plausible_original(h, total, original)

    def _on_eof(self, ev: EofEvent) -> None:
        """The stream ended without an intact end marker: report the loss, fill nothing."""
        log = self._log
        why = f": {describe_skips(self._pending, sizes=True)}" if self._pending else ""
        log.damage.append(
            f"the file ends at byte {ev.offset} without an intact end marker (truncated){why}"
        )
        # Nothing intact after the loss says how long it was: the header's length is
        # only a claim (81 bytes can claim a week), so the end is not filled in.
        if self._known is None:
            log.damage.append(
                "the header does not give the length (streamed file), so how much audio "
                "was lost at the end is unknown"
            )
        elif self._known > self._covered:
            log.damage.append(log.unfilled_end(self._known, self._covered, "header"))

    def _skipped_note(self) -> None:
        """Damage that cost no audio (bytes skipped between consecutive chunks)."""
        if self._pending:
            self._log.damage.append(f"{describe_skips(self._pending, sizes=True)}; no audio lost")

    # -- sizing gaps

    def _gap_before(self, i: int, n: int) -> Gap | None:
        """The Gap for chunks expected..i-1 (chunk i has ``n`` frames), or None if i is implausible."""
        h, hop, rate, known = self._h, self._hop, self._rate, self._known
        expected, frames = self._expected, self._frames
        lost = i - expected
        why = describe_skips(self._pending)
        if h.segmented:
            if i > self._max_index:
                return None
            count, exact = segment_frames(h, expected, lost, known)
            return self._log.make_gap(expected, lost, count, frames, expected * h.segment_stride,
                                      lost * h.segment_stride, exact, why)
        exact = False
        if self._unit is None and self._prev is not None:
            self._unit = self._prev  # the chunk before the gap was not the last one
        if self._unit is not None:
            count = lost * self._unit
        else:
            # A gap at the very start: is chunk i the last one?
            nxt = self._peek_next_chunk_or_end()
            if isinstance(nxt, ChunkEvent) and nxt.chunk.index > i:  # type: ignore[operator]
                self._unit = n
                count = lost * n
            elif (isinstance(nxt, EndEvent) and nxt.marker.chunk_count == i + 1
                  and nxt.marker.total <= max_samples(rate)):
                count, exact = max(-(-nxt.marker.total // hop) - n, 0), True
            elif known is not None:
                count = max(-(-known // hop) - n, lost * max(n, self._fallback_unit))
            else:
                count = lost * max(n, self._fallback_unit)
        if frames + count + n > self._max_frames:
            return None
        return self._log.make_gap(expected, lost, count, frames, frames * hop, count * hop, exact, why)

    def _trailing_gap(self, total: int, n_chunks: int) -> Gap | None:
        """The Gap for the chunks after the last intact one, from the end marker."""
        h, hop = self._h, self._hop
        expected, frames = self._expected, self._frames
        why = describe_skips(self._pending)
        if h.segmented:
            lost = n_chunks - expected
            if lost <= 0:
                return None
            start = expected * h.segment_stride
            count, exact = segment_frames(h, expected, lost, total)
            return self._log.make_gap(expected, lost, count, frames, start, max(total - start, 0),
                                      exact, why)
        count = -(-total // hop) - frames
        lost = n_chunks - expected
        if lost <= 0:
            return None
        count = max(count, 0)
        return self._log.make_gap(expected, lost, count, frames, frames * hop, count * hop, True, why)
