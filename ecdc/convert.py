"""Converting one input to one output, in either direction: the one path that the public
API (:func:`compress_file`, :func:`decompress_file`), the command line and every batch
worker take.

A :class:`Compression` or :class:`Decompression` holds what was asked for (its options)
and where its codecs come from (a :class:`CodecCache`), and converts any number of inputs
one at a time. Each conversion opens its input (a path, or ``-`` for standard input)
before its output, so an unreadable input creates nothing; checks that the file's codec
matches once, before anything is written; and writes through
:func:`~ecdc.outputs.atomic_output` (or to standard output for ``-``). The checks a single
conversion makes before a model is loaded, and the test a batch plan makes of every output
(:func:`output_clash`), are here too, so both refuse the same outputs.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, ClassVar, Iterator, Mapping, Protocol

import numpy as np

from .audio import decoded_layout, layout_mask
from .container import TAG_KEYS, CodeChunk, EcdcHeader, EcdcReader, EncodedAudio
from .errors import AudioError, ChecksumError, TruncatedError
from .messages import PathError, output_name
from .outputformats import OUTPUT_FORMATS, OutputFormat, check_output, open_sink, output_format, output_format_for
from .outputs import atomic_output, stdout_failures
from .streams import STDIO, CountingStream
from .wavstream import RawInput, open_audio_file, open_audio_stream

if TYPE_CHECKING:  # the codec (torch) is imported where a model is loaded, not here: `ecdc info` needs none
    from .codec import Codec, DownloadFn, ProgressFn, StreamResult

#: Extensions ``-r`` picks up for compression (what libsndfile commonly reads).
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64",
})
ECDC_EXTENSION = ".ecdc"

#: Called with one line per problem a salvaging decode worked around.
WarnFn = Callable[[str], None]


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CompressOptions:
    """What ``ecdc compress`` was asked for, the same for every file of a batch."""

    bandwidth: float = 6.0
    stereo: str | None = None
    #: Tags set on the command line (``--title`` ...), over the input's; an empty value drops that tag.
    tags: tuple[tuple[str, str], ...] = ()
    #: Carry the input's own tags (``--no-tags``: only those set on the command line).
    keep_tags: bool = True
    raw: RawInput | None = None  #: the inputs are headerless PCM of this layout (``--raw``)
    #: ``--latency`` in seconds; None: :data:`STREAM_LATENCY` to a pipe, blocks sized for throughput to a file
    latency: float | None = None

    @property
    def suffix(self) -> str:
        return ECDC_EXTENSION

    def tags_for(self, source_tags: Mapping[str, str]) -> dict[str, str]:
        """The tags a file compressed from an input with ``source_tags`` gets, in ecdc's order."""
        tags = dict(source_tags) if self.keep_tags else {}
        for key, value in self.tags:
            if value:
                tags[key] = value
            else:
                tags.pop(key, None)
        return {key: tags[key] for key in TAG_KEYS if key in tags}


@dataclass(frozen=True)
class DecompressOptions:
    """What ``ecdc decompress`` was asked for, the same for every file of a batch."""

    sample_rate: int | None = None
    channels: int | None = None
    raw: bool = False  #: headerless s16le instead of WAV
    salvage: bool = False  #: decode the intact parts of a damaged file, silence for the rest
    #: seconds of silence salvage may fill in, in all; None: in proportion to the file's size
    max_silence: float | None = None
    format: str | None = None  #: ``--format`` (a name in OUTPUT_FORMATS); None: from each output's suffix
    bits: str | None = None  #: ``--bits``: ``"16"``, ``"24"`` or ``"32f"``; None: 16 (lossy formats: none)
    #: ``--latency`` in seconds; None: :data:`STREAM_LATENCY` to a pipe, blocks sized for throughput to a file
    latency: float | None = None

    @property
    def suffix(self) -> str:
        if self.format is not None:
            return output_format(self.format).suffix
        return ".raw" if self.raw else ".wav"

    def output_format(self, dst: str | Path) -> OutputFormat:
        """What is written to ``dst``: ``--format``, else ``--raw``, else the format its
        suffix names (WAV for stdout and names without one); an unwritable one is refused."""
        if self.format is not None:
            return output_format(self.format)
        if self.raw:
            return OUTPUT_FORMATS["raw"]
        return output_format_for(str(dst))


Options = CompressOptions | DecompressOptions


@dataclass(frozen=True)
class ModelChoice:
    """How to load the codec, so worker processes can load the same one themselves."""

    model: str | None = None
    checkpoint: str | None = None
    device: str = "cpu"

    @property
    def named(self) -> bool:
        return self.model is not None or self.checkpoint is not None


class CodecCache:
    """Loads codecs on demand and keeps them, so a batch loads each model once.

    With ``only`` (``"encode"`` or ``"decode"``) each codec it loads keeps only that half
    (:meth:`~ecdc.codec.Codec.release_unused`), for a smaller peak memory. A ``preloaded``
    codec is used for every file. Pickled (sent to a worker process) a cache is its recipe:
    the worker loads its own codecs, and no loaded model is copied.
    """

    def __init__(self, choice: ModelChoice = ModelChoice(), progress: DownloadFn | None = None,
                 preloaded: Codec | None = None, only: str | None = None):
        self.choice = choice
        self.progress = progress
        self.only = only
        self._codecs: dict[str | None, Codec] = {}
        if preloaded is not None:
            self._codecs[None] = preloaded
        self._fixed = choice.named or preloaded is not None

    def __reduce__(self) -> tuple[Any, ...]:
        return CodecCache, (self.choice, None, None, self.only)

    def _loaded(self, codec: Codec) -> Codec:
        if self.only is not None:
            codec.release_unused(self.only)
        return codec

    def default(self) -> Codec:
        """The codec the user named or gave (compression always has one)."""
        if None not in self._codecs:
            from .codec import load_model

            c = self.choice
            self._codecs[None] = self._loaded(load_model(c.model, device=c.device, checkpoint=c.checkpoint,
                                                         progress=self.progress))
        return self._codecs[None]

    def for_header(self, header: EcdcHeader) -> Codec:
        """The codec the user named or gave, else the one the file's header names."""
        if self._fixed:
            return self.default()
        name = header.model_name
        if name not in self._codecs:
            from .codec import load_model_for

            c = self.choice
            self._codecs[name] = self._loaded(load_model_for(header, None, None, c.device, progress=self.progress))
        return self._codecs[name]


# --------------------------------------------------------------------------- checks


class OutputClash(enum.Enum):
    """Why an existing path cannot take a conversion's output, found before any input is read."""

    IS_INPUT = enum.auto()
    IS_DIRECTORY = enum.auto()
    EXISTS = enum.auto()  #: and no ``-f``: a single conversion refuses it, a batch skips it


def output_clash(src: str, dst: str, force: bool) -> OutputClash | None:
    """What stops ``dst`` from taking ``src``'s output (None: nothing); the one output
    check of single conversions (:meth:`Conversion.check`) and batch plans alike."""
    if dst == STDIO or not os.path.exists(dst):
        return None
    if src != STDIO and os.path.samefile(src, dst):
        return OutputClash.IS_INPUT
    if os.path.isdir(dst):
        return OutputClash.IS_DIRECTORY
    return None if force else OutputClash.EXISTS


#: What a single conversion says about each clash, at its output.
_REFUSALS = {
    OutputClash.IS_INPUT: "output is the input file; choose another -o",
    OutputClash.IS_DIRECTORY: "output is a directory",
    OutputClash.EXISTS: "output exists (use -f to overwrite)",
}


def require_stream(stream: object, name: str) -> None:
    """Refuse a closed standard stream (Python has None for it) in one line, not a traceback."""
    if stream is None:
        raise PathError("", f"standard {name} is closed")


def check_input(src: str) -> None:
    """Refuse an input that cannot be read at all, before any model is loaded."""
    if src == STDIO:
        require_stream(sys.stdin, "input")
        return
    if not os.path.exists(src):
        raise PathError(src, "no such file")
    if os.path.isdir(src):
        raise PathError(src, "is a directory (use -r to convert the files in it)")
    if not os.access(src, os.R_OK):
        raise PathError(src, "permission denied")


# --------------------------------------------------------------------------- conversions


class Converted(Protocol):
    """What a conversion wrote, as far as a batch cares."""

    @property
    def duration(self) -> float:
        """Seconds of audio converted."""
        ...


@dataclass
class Decoded:
    """What a decompression wrote."""

    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


class Conversion(abc.ABC):
    """Converts one input (a path, or the string ``-`` for stdin) to one output (a path, or
    ``-`` for stdout) at a time, with the same options and codecs for each; a
    :class:`~pathlib.Path` is always a file, also ``Path("-")``.

    :meth:`convert` returns what it wrote (its ``duration`` is the seconds of audio);
    without ``overwrite`` an existing output, or one created meanwhile, is an error.
    """

    kind: ClassVar[str]  #: ``"compress"`` or ``"decompress"``, as the command is called
    extensions: ClassVar[frozenset[str]]  #: of the inputs ``-r`` picks up
    reads: ClassVar[str]  #: what its input holds, in words ("audio"), for the line about waiting for stdin

    def __init__(self, codecs: CodecCache, options: Options):
        self.codecs = codecs
        self.options = options
        #: the standard streams the last conversion used ("stdin", "stdout"), counting bytes for the stats
        self.stdio: dict[str, CountingStream] = {}

    @property
    def suffix(self) -> str:
        """Of the outputs written beside their inputs."""
        return self.options.suffix

    def check(self, src: str, dst: str, force: bool) -> None:
        """Refuse, before any model is loaded, what the single conversion ``src`` -> ``dst``
        cannot do; a :class:`~ecdc.messages.PathError` names the file at fault."""
        check_input(src)
        if dst == STDIO:
            require_stream(sys.stdout, "output")
            if sys.stdout.isatty():
                raise PathError(output_name(dst),
                                "refusing to write binary data to a terminal; redirect it or pass -o FILE")
            return
        clash = output_clash(src, dst, force)
        if clash is not None:
            raise PathError(dst, _REFUSALS[clash])

    def preload(self, batch: bool) -> None:
        """Load (and download) up front the codec every input will need, once, before any
        worker starts, so that a bad ``--model`` fails early."""

    @abc.abstractmethod
    def convert(self, src: str | Path, dst: str | Path, progress: ProgressFn | None = None,
                warn: WarnFn | None = None, overwrite: bool = False, keep: list | None = None) -> Converted:
        """Convert ``src`` to ``dst``; ``keep`` also collects what was written (code chunks,
        audio blocks), for the public API, which returns it."""

    @staticmethod
    @abc.abstractmethod
    def estimate_seconds(path: str) -> float:
        """Audio length of the input ``path`` for a progress bar, from headers only (0 when
        it cannot be told)."""


class Compression(Conversion):
    """Audio (any format libsndfile reads, a pipe too) to .ecdc."""

    kind = "compress"
    extensions = AUDIO_EXTENSIONS
    reads = "audio"
    options: CompressOptions

    def __init__(self, codecs: CodecCache, options: CompressOptions = CompressOptions()):
        super().__init__(codecs, options)

    def preload(self, batch: bool) -> None:
        """Compression always has its codec: load it, and refuse a bad ``-b`` before any audio is read."""
        self.codecs.default().check_bandwidth(self.options.bandwidth)

    def convert(self, src: str | Path, dst: str | Path, progress: ProgressFn | None = None,
                warn: WarnFn | None = None, overwrite: bool = False,
                keep: list[CodeChunk] | None = None) -> StreamResult:
        codec = self.codecs.default()
        raw = self.options.raw
        source = (open_audio_stream(_stdin(self.stdio), raw=raw) if src == STDIO
                  else open_audio_file(str(src), raw=raw))
        with source, _open_output(dst, overwrite, self.stdio) as out:
            return codec.compress_stream(source, out, self.options.bandwidth, self.options.stereo, progress, keep,
                                         self.options.tags_for(source.tags),
                                         latency=stream_latency(self.options.latency, _stdin_or(src), out))

    @staticmethod
    def estimate_seconds(path: str) -> float:
        if not os.path.isfile(path):
            return 0.0  # stdin, or a named pipe that must not be read twice
        try:
            with open_audio_file(path) as source:  # opens names libsndfile cannot take, too
                return (source.frames or 0) / source.sample_rate
        except Exception:  # noqa: BLE001 - an estimate only; the conversion reports real problems
            return 0.0


class Decompression(Conversion):
    """.ecdc (ecdc's or Meta's, a pipe too) to WAV, raw PCM, or another format libsndfile
    writes (:data:`~ecdc.outputformats.OUTPUT_FORMATS`), as ``--format`` or the output's suffix says.

    With ``options.salvage`` a damaged file is decoded around its damage and ``warn`` gets
    one line per problem; without it, ``salvage_hint`` adds to a checksum or truncation
    error that ``--salvage`` would recover the intact parts (the command line's advice).
    """

    kind = "decompress"
    extensions = frozenset({ECDC_EXTENSION})
    reads = ".ecdc data"
    options: DecompressOptions

    def __init__(self, codecs: CodecCache, options: DecompressOptions = DecompressOptions(),
                 salvage_hint: bool = True):
        super().__init__(codecs, options)
        self.salvage_hint = salvage_hint

    def check(self, src: str, dst: str, force: bool) -> None:
        """Also refuses an output format that cannot be written (``-o out.m4a``, ``--bits 32f``
        to FLAC, a ``--rate`` Opus does not take), naming the output, before any model loads."""
        super().check(src, dst, force)
        try:
            self._check_format(self.options.output_format(dst))
        except AudioError as exc:
            raise PathError(dst, str(exc)) from None

    def _check_format(self, fmt: OutputFormat) -> None:
        fmt.subtype(self.options.bits)
        if self.options.sample_rate is not None:
            fmt.check_rate(self.options.sample_rate)

    def preload(self, batch: bool) -> None:
        """Only a named model, and only for a batch: a single file's header is read first,
        so that one that is not .ecdc is refused before any model is loaded. A batch's
        output format (all its outputs have one) is checked first of all."""
        if batch:
            self._check_format(self.options.output_format("out" + self.suffix))
        if batch and self.codecs.choice.named:
            self.codecs.default()

    def convert(self, src: str | Path, dst: str | Path, progress: ProgressFn | None = None,
                warn: WarnFn | None = None, overwrite: bool = False,
                keep: list[np.ndarray] | None = None) -> Decoded:
        """Samples are written as they are decoded (so ``-o -`` flows before the input ends)."""
        o = self.options
        with _open_input(src, self.stdio) as f:
            reader = EcdcReader(f, salvage=o.salvage, max_silence=o.max_silence)
            codec = self.codecs.for_header(reader.header)
            fmt = o.output_format(dst)
            subtype = fmt.subtype(o.bits)
            sample_rate = o.sample_rate  # without --rate, the original's, or the nearest the format takes
            if sample_rate is None:
                sample_rate = fmt.nearest_rate(codec.output_format(reader.header, None, o.channels)[0])
            latency = stream_latency(o.latency, f, sys.stdout if dst == STDIO else None)
            blocks = codec.decode_blocks(reader, sample_rate, o.channels, progress,  # checks the codec
                                         latency=latency)
            rate, channels = codec.output_format(reader.header, sample_rate, o.channels)
            check_output(fmt, subtype, rate, channels)  # before the output exists
            try:
                with _open_output(dst, overwrite, self.stdio) as out:
                    mask = layout_mask(decoded_layout(reader.header, o.channels))
                    frames = _write_audio(blocks, out, fmt, subtype, rate, channels, keep, reader.tags, mask)
            except (ChecksumError, TruncatedError) as exc:
                if not self.salvage_hint:
                    raise
                # The header was intact, so salvage can recover the chunks that are.
                raise type(exc)(f"{exc}; --salvage decodes the intact parts") from None
        if reader.damage and warn is not None:
            for line in reader.damage:
                warn(line)
            lost = sum(gap.num_samples for gap in reader.gaps) / reader.header.sample_rate
            warn(f"salvaged: {frames / rate:.2f} s written, {lost:.2f} s of it silence in place of lost audio")
        return Decoded(frames, rate, channels)

    @staticmethod
    def estimate_seconds(path: str) -> float:
        if not os.path.isfile(path):
            return 0.0  # stdin, or a named pipe that must not be read twice
        try:
            with open(path, "rb") as f:
                header = EcdcReader(f).header
            if header.num_samples is not None:
                return header.num_samples / header.sample_rate
            # Streamed files: from the size, at the payload rate plus ~21 bytes of framing (and
            # scale) per chunk of about a second.
            per_second = header.streams * header.num_codebooks * header.bits_per_code * header.frame_rate / 8
            return os.path.getsize(path) / (per_second + 21)
        except Exception:  # noqa: BLE001 - an estimate only; the conversion reports real problems
            return 0.0


#: The conversion of each command, by name.
CONVERSIONS: dict[str, type[Conversion]] = {c.kind: c for c in (Compression, Decompression)}

#: Seconds of audio per block when none is asked for and both the input and the output are
#: streams (a pipe, socket or terminal: live audio with someone reading as it is written):
#: compressed codes or decoded audio then start about a second after the input does
#: (bench/latency.py), at about half to two thirds of the throughput of the long blocks.
#: A file on either side is converted for throughput: nothing is gained by sending the
#: output early when the whole input is already there, or when nobody reads it as it comes.
STREAM_LATENCY = 0.5


def _is_stream(where: Any) -> bool:
    """Whether ``where`` (a file object, a path, or None: a regular file written by path)
    is a stream rather than a regular file; in-memory objects count as files."""
    if where is None:
        return False
    try:
        mode = os.stat(where).st_mode if isinstance(where, (str, Path)) else os.fstat(where.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # no descriptor (in memory), or gone
        return False
    return not stat.S_ISREG(mode)


def stream_latency(latency: float | None, source: Any, out: Any) -> float | None:
    """The ``latency`` a conversion from ``source`` to ``out`` runs at (each a file object
    or path; None: a regular file): the one asked for; else :data:`STREAM_LATENCY` where
    both are streams, else None (throughput)."""
    if latency is not None:
        return latency
    return STREAM_LATENCY if _is_stream(source) and _is_stream(out) else None


def _write_audio(blocks: Iterator[np.ndarray], out: BinaryIO, fmt: OutputFormat, subtype: str, rate: int,
                 channels: int, keep: list[np.ndarray] | None, tags: Mapping[str, str] | None = None,
                 channel_mask: int = 0) -> int:
    """Write decoded blocks in ``fmt``, each flushed at once (WAV and raw: a pipe's reader
    hears it; other formats to a pipe are spooled, :class:`~ecdc.outputformats.SoundFileSink`);
    ``tags`` (the .ecdc file's) go where the output format holds them, ``channel_mask`` (the
    channels' speakers) into a WAV header."""
    sink = open_sink(out, fmt, subtype, rate, channels, tags, channel_mask)
    out.flush()
    for block in blocks:
        sink.write(block)
        out.flush()
        if keep is not None:
            keep.append(block)
    sink.close()
    return sink.frames_written


def _stdin(counted: dict[str, CountingStream] | None = None) -> BinaryIO:
    """Standard input; counted (as ``counted["stdin"]``) when ``counted`` is given."""
    if counted is None:
        return sys.stdin.buffer
    stream = counted["stdin"] = CountingStream(sys.stdin.buffer)
    return stream  # type: ignore[return-value]  # a BinaryIO in all but name


def _stdin_or(src: str | Path) -> Any:
    """Standard input for ``-``, else the path: what :func:`stream_latency` looks at."""
    return sys.stdin if src == STDIO else src


@contextlib.contextmanager
def _open_input(src: str | Path, counted: dict[str, CountingStream] | None = None) -> Iterator[BinaryIO]:
    if src == STDIO:
        yield _stdin(counted)
        return
    with open(src, "rb") as f:
        yield f


@contextlib.contextmanager
def _open_output(dst: str | Path, overwrite: bool,
                 counted: dict[str, CountingStream] | None = None) -> Iterator[BinaryIO]:
    if dst == STDIO:
        with stdout_failures():
            if counted is None:
                yield sys.stdout.buffer
            else:
                stream = counted["stdout"] = CountingStream(sys.stdout.buffer)
                yield stream  # type: ignore[misc]  # a BinaryIO in all but name
        return
    with atomic_output(dst, overwrite) as out:
        yield out


# --------------------------------------------------------------------------- the public API


def compress_file(src: str | Path, dst: str | Path, model: str | Codec | None = None,
                  bandwidth: float = 6.0, stereo: str | None = None, overwrite: bool = True) -> EncodedAudio:
    """Compress an audio file to a .ecdc file (streamed, written by :func:`~ecdc.outputs.atomic_output`).

    Returns what was written; its chunks are kept in memory for the caller (codes are
    about 0.1 % of the PCM size), the audio never is. ``overwrite=False`` refuses an
    existing ``dst`` (also one created while writing) with :class:`~ecdc.errors.OutputError`.
    """
    codecs = _codecs_for(model)
    chunks: list[CodeChunk] = []
    result = Compression(codecs, CompressOptions(bandwidth, stereo)).convert(
        _file(src), _file(dst), overwrite=overwrite, keep=chunks)
    return EncodedAudio(result.header, chunks, result.num_samples, result.original_samples)


def decompress_file(src: str | Path, dst: str | Path, model: str | Codec | None = None,
                    sample_rate: int | None = None, channels: int | None = None,
                    overwrite: bool = True) -> tuple[np.ndarray, int]:
    """Decompress a .ecdc file to 16-bit audio in the format ``dst``'s suffix names (wav without
    one; :func:`~ecdc.outputformats.output_format_for`), streamed and written by
    :func:`~ecdc.outputs.atomic_output`; returns the audio too. Without ``model`` the model the
    file's header names is loaded.
    ``overwrite`` as for :func:`compress_file`."""
    codecs = _codecs_for(model)
    blocks: list[np.ndarray] = []
    conversion = Decompression(codecs, DecompressOptions(sample_rate, channels), salvage_hint=False)
    decoded = conversion.convert(_file(src), _file(dst), overwrite=overwrite, keep=blocks)
    if not blocks:
        return np.zeros((decoded.channels, 0), dtype=np.float32), decoded.sample_rate
    return np.concatenate(blocks, axis=1), decoded.sample_rate


def _codecs_for(model: str | Codec | None) -> CodecCache:
    """The API's ``model``: a loaded Codec to use as it is, or a name (None: the file's or the default)."""
    from .codec import Codec

    return CodecCache(preloaded=model) if isinstance(model, Codec) else CodecCache(ModelChoice(model))


def _file(path: str | Path) -> str | Path:
    """The API's paths are all files: ``"-"`` is one of that name, not a standard stream."""
    return Path(path) if path == STDIO else path


# --------------------------------------------------------------------------- reading


def read_encoded(src: str) -> tuple[EncodedAudio, int]:
    """All of the .ecdc stream at ``src`` (a path or ``-``) and its size in bytes (``info``).

    Parsed while it is read, never read whole first: what does not start like .ecdc
    (``/dev/zero``) is refused after 5 bytes, and lengths are checked before their bytes are read.
    """
    with _open_input(src) as f:
        reader = EcdcReader(f)
        encoded = EncodedAudio.from_reader(reader)
    return encoded, reader.bytes_read
