"""What decompression writes: the output formats (``--format``, the suffix of ``-o``) and
their writers.

:data:`OUTPUT_FORMATS` says, per format, which suffixes name it, which ``--bits`` it holds
and which rates and channel counts it takes; :func:`output_format_for` reads a format from
an output's name and refuses, in one line, one libsndfile cannot write, and
:func:`check_output` checks the decoded rate and channels before any output exists.
:func:`open_sink` gives the writer: :class:`~ecdc.wavstream.WavStreamWriter` for WAV and
raw (streamed as decoded, to pipes too), :class:`SoundFileSink` for the formats libsndfile
encodes (FLAC, Ogg Vorbis, Opus, MP3, AIFF). No torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import soundfile

from . import audio, audiotags
from .errors import AudioError
from .streams import STDIO, write_all
from .wavstream import WavStreamWriter

__all__ = [
    "OUTPUT_FORMATS",
    "OUTPUT_SUFFIXES",
    "OutputFormat",
    "SoundFileSink",
    "check_output",
    "open_sink",
    "output_format",
    "output_format_for",
    "writable_formats",
]


@dataclass(frozen=True)
class OutputFormat:
    """A format decompression writes: what ``--format`` calls it, how libsndfile calls it,
    and which ``--bits`` it takes (a lossy format takes none: it has its own ``codec``)."""

    name: str
    major: str  #: libsndfile's major format
    suffix: str  #: of outputs named after their inputs
    subtypes: Mapping[str, str] = field(default_factory=dict)  #: ``--bits`` -> libsndfile subtype
    codec: str | None = None  #: the libsndfile subtype of a lossy format
    rates: tuple[int, ...] = ()  #: the sample rates it takes, ascending (empty: any libsndfile writes)
    #: most channels it holds (libsndfile's Vorbis encoder crashes on some counts past 255, so
    #: the limits are ecdc's own, checked before libsndfile sees them)
    max_channels: int = 1024

    def check_rate(self, rate: int) -> None:
        """Refuse a ``--rate`` this format cannot be written at, in one line."""
        if self.rates and rate not in self.rates:
            raise AudioError(f"{self.name} takes sample rates of {', '.join(map(str, self.rates))} Hz, not {rate} "
                             f"(without --rate the nearest one is chosen)")

    def nearest_rate(self, rate: int) -> int:
        """The rate audio of ``rate`` Hz is written at when no ``--rate`` is given: its own if
        this format takes it, else the next one up (the highest, above that), as Opus and
        MP3 encoders resample to a rate they take."""
        if not self.rates or rate in self.rates:
            return rate
        return next((r for r in self.rates if r >= rate), self.rates[-1])

    @property
    def streams(self) -> bool:
        """Whether :class:`~ecdc.wavstream.WavStreamWriter` writes it (to pipes too, as it goes)."""
        return self.major in ("WAV", "RAW")

    def subtype(self, bits: str | None) -> str:
        """The libsndfile subtype for ``--bits`` (None: 16-bit, or the lossy codec), or a
        one-line refusal of bits this format cannot hold."""
        if self.codec is not None:
            if bits is not None:
                raise AudioError(f"--bits does not apply to {self.name}, a lossy format (it stores no "
                                 f"sample size); --bits is for {_bit_formats()}")
            return self.codec
        chosen = self.subtypes.get(bits or "16")
        if chosen is None:
            takes = " or ".join(self.subtypes)
            floats = ", ".join(f.name for f in OUTPUT_FORMATS.values() if "32f" in f.subtypes)
            raise AudioError(f"{self.name} cannot hold {_BITS_WORDS.get(bits or '', bits)} samples: --bits {takes} "
                             f"(32-bit float: {floats})")
        return chosen


_INTEGER_AND_FLOAT = {"16": "PCM_16", "24": "PCM_24", "32f": "FLOAT"}
_BITS_WORDS = {"16": "16-bit", "24": "24-bit", "32f": "32-bit float"}

#: What decompression writes, by ``--format`` name.
OUTPUT_FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("wav", "WAV", ".wav", _INTEGER_AND_FLOAT, max_channels=65535),
    OutputFormat("flac", "FLAC", ".flac", {"16": "PCM_16", "24": "PCM_24"}, max_channels=8),
    OutputFormat("ogg", "OGG", ".ogg", codec="VORBIS", max_channels=255),
    OutputFormat("opus", "OGG", ".opus", codec="OPUS", rates=(8000, 12000, 16000, 24000, 48000), max_channels=255),
    OutputFormat("mp3", "MP3", ".mp3", codec="MPEG_LAYER_III",
                 rates=(8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000), max_channels=2),
    OutputFormat("aiff", "AIFF", ".aiff", _INTEGER_AND_FLOAT),
    OutputFormat("raw", "RAW", ".raw", _INTEGER_AND_FLOAT, max_channels=65535),
)}

#: Output suffixes and the format each names (any case).
OUTPUT_SUFFIXES = {".wav": "wav", ".wave": "wav", ".flac": "flac", ".ogg": "ogg", ".oga": "ogg",
                   ".opus": "opus", ".mp3": "mp3", ".aif": "aiff", ".aiff": "aiff", ".aifc": "aiff",
                   ".raw": "raw", ".pcm": "raw"}

#: Suffixes users give for formats libsndfile cannot write, and what they are.
_UNWRITABLE = {".m4a": "MPEG-4 AAC", ".aac": "AAC", ".mp4": "MPEG-4 AAC", ".wma": "Windows Media Audio",
               ".ac3": "AC-3", ".alac": "ALAC", ".ape": "Monkey's Audio", ".wv": "WavPack", ".amr": "AMR"}


def _bit_formats() -> str:
    return ", ".join(f.name for f in OUTPUT_FORMATS.values() if f.codec is None)


def writable_formats() -> list[str]:
    """The ``--format`` names this libsndfile can write (opus and mp3 depend on how it was built)."""
    return [f.name for f in OUTPUT_FORMATS.values() if _libsndfile_writes(f)]


def _libsndfile_writes(fmt: OutputFormat) -> bool:
    subtype = fmt.codec or fmt.subtypes["16"]
    try:
        return bool(soundfile.check_format(fmt.major, subtype))
    except (ValueError, TypeError):  # a name this soundfile does not know at all
        return False


def output_format(name: str) -> OutputFormat:
    """The format ``--format NAME`` asks for, or a one-line refusal naming those there are."""
    fmt = OUTPUT_FORMATS.get(name.lower())
    if fmt is None:
        raise AudioError(f"unknown output format {name!r}; ecdc writes {', '.join(writable_formats())}")
    if not _libsndfile_writes(fmt):
        raise AudioError(f"this libsndfile ({soundfile.__libsndfile_version__}) cannot write {name}; "
                         f"it writes {', '.join(writable_formats())}")
    return fmt


def output_format_for(path: str) -> OutputFormat:
    """The format an output's name asks for: its suffix, WAV for a name without one (and
    for ``-``); a suffix that names no format ecdc writes is refused in one line."""
    suffix = os.path.splitext(os.path.basename(path))[1].lower()
    if path == STDIO or not suffix:
        return OUTPUT_FORMATS["wav"]
    if suffix in OUTPUT_SUFFIXES:
        return output_format(OUTPUT_SUFFIXES[suffix])
    known = ", ".join(writable_formats())
    if suffix in _UNWRITABLE:
        raise AudioError(f"cannot write {suffix}: libsndfile has no {_UNWRITABLE[suffix]} encoder; ecdc writes "
                         f"{known} (for {suffix}, pipe WAV to ffmpeg: "
                         f"ecdc decompress IN -o - | ffmpeg -i - OUT{suffix})")
    raise AudioError(f"cannot tell an output format from the suffix {suffix!r}; ecdc writes {known} "
                     f"(choose one with --format)")


def check_output(fmt: OutputFormat, subtype: str, sample_rate: int, channels: int) -> None:
    """Refuse, before any output exists, audio that ``fmt`` cannot hold (a rate Opus or MP3
    does not take, more channels than FLAC's 8, ...), in libsndfile's own words."""
    if channels < 1 or sample_rate < 1:
        raise AudioError(f"invalid output format: {channels} channels at {sample_rate} Hz")
    if channels > fmt.max_channels:
        raise AudioError(f"{fmt.name} holds at most {fmt.max_channels} channel{'s' if fmt.max_channels > 1 else ''}, "
                         f"not {channels} (choose fewer with --channels, or another format)")
    fmt.check_rate(sample_rate)
    if fmt.streams:
        return
    try:
        soundfile.SoundFile(io.BytesIO(), "w", sample_rate, channels, subtype, format=fmt.major).close()
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot write {fmt.name} with {channels} channels at {sample_rate} Hz: "
                         f"{_writer_reason(exc)}") from None


def _writer_reason(exc: BaseException) -> str:
    reason = audio._soundfile_reason(exc)
    return reason.removeprefix("Error : ").strip() or "libsndfile refused it"


class SoundFileSink:
    """Any format libsndfile writes (FLAC, Ogg Vorbis/Opus, MP3, AIFF), block by block.

    libsndfile seeks in its output to finish most of these (FLAC's and AIFF's sizes), so a
    seekable output is written in place; an output that cannot seek (a pipe, a FIFO) gets
    the file spooled to an anonymous temporary file first and copied to it at :meth:`close`
    (memory stays bounded; the reader gets it all at the end, and none of it if decoding
    fails). Integer and lossy output is clipped to full scale, so peaks saturate. A write
    error (disk full) is raised as the ``OSError`` it is, as WAV output raises it.
    """

    def __init__(self, fileobj: BinaryIO, fmt: OutputFormat, subtype: str, sample_rate: int, channels: int,
                 tags: Mapping[str, str] | None = None):
        self._out = fileobj
        self._name = fmt.name
        self._spool: BinaryIO | None = None
        if not _seekable(fileobj):
            self._spool = tempfile.TemporaryFile(prefix="ecdc-")
        self._target = _GuardedOutput(self._spool or fileobj)
        self._clip = subtype not in ("FLOAT", "DOUBLE")
        self.frames_written = 0
        try:
            self._sf = soundfile.SoundFile(self._target, "w", sample_rate, channels, subtype, format=fmt.major)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            self._close_spool()
            self._target.raise_error()
            raise AudioError(f"cannot write {fmt.name}: {_writer_reason(exc)}") from None
        self.channels = channels
        audiotags.write_soundfile_tags(self._sf, tags or {})

    def write(self, block: np.ndarray) -> None:
        block = np.nan_to_num(np.asarray(block, dtype=np.float32), nan=0.0)
        if block.ndim != 2 or block.shape[0] != self.channels:
            raise ValueError(f"expected [{self.channels}, n] audio, got shape {block.shape}")
        if self._clip:
            block = np.clip(block, -1.0, np.float32(32767 / 32768))
        with self._libsndfile_errors():
            self._sf.write(block.T)
        self.frames_written += block.shape[1]

    def close(self) -> None:
        """Finish the file (and copy a spooled one out); the output file object stays open."""
        if self._sf.closed:
            return
        with self._libsndfile_errors():
            self._sf.close()  # encoders write their last pages here
        try:
            if self._spool is not None:
                self._spool.seek(0)
                for piece in iter(lambda: self._spool.read(1 << 20), b""):  # type: ignore[union-attr]
                    write_all(self._out, piece)
        finally:
            self._close_spool()
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    @contextlib.contextmanager
    def _libsndfile_errors(self) -> Iterator[None]:
        """The output's own error (disk full) where there was one, else libsndfile's, in one line."""
        try:
            yield
        except (soundfile.LibsndfileError, RuntimeError, AssertionError) as exc:  # soundfile asserts short writes
            self._abandon()
            self._target.raise_error()
            raise AudioError(f"cannot write {self._name}: {_writer_reason(exc)}") from None
        if self._target.error is not None:
            self._abandon()
            self._target.raise_error()

    def _abandon(self) -> None:
        """Close libsndfile's handle after a failure; what it still writes goes nowhere."""
        self._target.failed = True
        with contextlib.suppress(soundfile.LibsndfileError, RuntimeError):
            self._sf.close()
        self._close_spool()


class _GuardedOutput:
    """The output as libsndfile's virtual I/O sees it. An ``OSError`` there (disk full) is
    kept and answered with a short write, not raised inside libsndfile's callback (where
    Python could only print it as "Exception ignored"); :meth:`raise_error` raises it
    once libsndfile has returned. After an error, and once the file is closed (a failed
    conversion's libsndfile handle is only collected later), nothing more reaches it."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        self.error: OSError | None = None
        self.failed = False

    def _usable(self) -> bool:
        return not self.failed and not getattr(self._f, "closed", False)

    def write(self, data: bytes) -> int:
        if not self._usable():
            return 0
        try:
            write_all(self._f, data)
        except OSError as exc:
            self._fail(exc)
            return 0
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if not self._usable():
            return b""
        try:
            return self._f.read(n)
        except OSError as exc:
            self._fail(exc)
            return b""

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self._usable():
            return 0
        try:
            return self._f.seek(offset, whence)
        except OSError as exc:
            self._fail(exc)
            return 0

    def tell(self) -> int:
        if not self._usable():
            return 0
        try:
            return self._f.tell()
        except OSError as exc:
            self._fail(exc)
            return 0

    def _fail(self, exc: OSError) -> None:
        self.failed = True
        if self.error is None:
            self.error = exc

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _seekable(fileobj: BinaryIO) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def open_sink(fileobj: BinaryIO, fmt: OutputFormat, subtype: str, sample_rate: int,
              channels: int, tags: Mapping[str, str] | None = None,
              channel_mask: int = 0) -> WavStreamWriter | SoundFileSink:
    """The writer for ``fmt`` on ``fileobj``: WAV and raw stream as they are written
    (:class:`WavStreamWriter`, which records ``channel_mask``), the others go through
    libsndfile (:class:`SoundFileSink`)."""
    if fmt.streams:
        return WavStreamWriter(fileobj, sample_rate, channels, raw=fmt.major == "RAW", subtype=subtype, tags=tags,
                               channel_mask=channel_mask)
    return SoundFileSink(fileobj, fmt, subtype, sample_rate, channels, tags)
