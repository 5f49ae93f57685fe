"""Converting files: one input (file or pipe) or many (files and directory trees), in parallel.

The command line is glue around this module. It decides where outputs go, streams each
conversion through :class:`~ecdc.codec.Codec` with every output written to a temporary
file beside its target and renamed only when complete, and runs batches in worker
processes (each loads the model once) with a progress bar and a summary. One bad file
is reported and skipped; Ctrl-C, SIGTERM, SIGHUP or SIGQUIT stops everything and leaves no
partial files.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import re
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Set, TextIO,
                    Tuple, Union)

from .codec import (Codec, EncodedAudio, ProgressFn, atomic_output, load_model, load_model_for,
                    remove_temp_files)
from .container import EcdcHeader, EcdcReader
from .errors import ChecksumError, EcdcError, TruncatedError
from .perf import available_cpus, configure_threads
from .wavstream import WavStreamWriter, open_audio_file, open_audio_stream

STDIO = "-"
COMPRESS = "compress"
DECOMPRESS = "decompress"

#: Extensions ``-r`` picks up for compression (what libsndfile commonly reads).
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64",
})
ECDC_EXTENSION = ".ecdc"

#: Exit status after SIGINT/SIGTERM/SIGHUP/SIGQUIT, as shells report for Ctrl-C.
EXIT_INTERRUPTED = 130

#: Signals that stop ecdc like Ctrl-C (SIGINT) does: cleanup runs, temp files go. SIGHUP
#: (terminal closed) and SIGQUIT (Ctrl-\) would otherwise kill it with its temp files left.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CompressOptions:
    """What ``ecdc compress`` was asked for, the same for every file of a batch."""

    bandwidth: float = 6.0
    stereo: Optional[str] = None


@dataclass(frozen=True)
class DecompressOptions:
    """What ``ecdc decompress`` was asked for, the same for every file of a batch."""

    sample_rate: Optional[int] = None
    channels: Optional[int] = None
    raw: bool = False  #: headerless s16le instead of WAV
    salvage: bool = False  #: decode the intact parts of a damaged file, silence for the rest
    #: seconds of silence salvage may fill in, in all; None: in proportion to the file's size
    max_silence: Optional[float] = None

    @property
    def suffix(self) -> str:
        return ".raw" if self.raw else ".wav"


Options = Union[CompressOptions, DecompressOptions]


@dataclass(frozen=True)
class ModelChoice:
    """How to load the codec, so worker processes can load the same one themselves."""

    model: Optional[str] = None
    checkpoint: Optional[str] = None
    device: str = "cpu"

    @property
    def named(self) -> bool:
        return self.model is not None or self.checkpoint is not None


def output_suffix(kind: str, options: Options) -> str:
    return ECDC_EXTENSION if kind == COMPRESS else options.suffix  # type: ignore[union-attr]


# --------------------------------------------------------------------------- converting one file


def compress_one(codec: Codec, src: str, dst: str, options: CompressOptions,
                 progress: Optional[ProgressFn] = None, overwrite: bool = False) -> float:
    """Compress ``src`` (a path or ``-``) to ``dst`` (a path or ``-``); returns audio seconds.

    The input is opened before the output, so an unreadable input creates nothing. Without
    ``overwrite`` (``-f``) an existing ``dst``, or one created meanwhile, is an error.
    """
    source = open_audio_stream(sys.stdin.buffer) if src == STDIO else open_audio_file(src)
    with source:
        if dst == STDIO:
            result = codec.compress_stream(source, sys.stdout.buffer, options.bandwidth, options.stereo, progress)
        else:
            with atomic_output(dst, overwrite) as out:
                result = codec.compress_stream(source, out, options.bandwidth, options.stereo, progress)
    return result.duration


#: Called with one line per problem a salvaging decode worked around.
WarnFn = Callable[[str], None]


def decompress_one(src: str, dst: str, options: DecompressOptions, codec_for: Callable[[EcdcHeader], Codec],
                   progress: Optional[ProgressFn] = None, warn: Optional[WarnFn] = None,
                   overwrite: bool = False) -> float:
    """Decompress ``src`` (a path or ``-``) to ``dst`` (a path or ``-``); returns audio seconds.

    ``codec_for`` picks the codec once the header is read. Samples are written as they
    are decoded (so ``-o -`` flows before the input ends). With ``options.salvage`` a
    damaged file is decoded around its damage and ``warn`` gets one line per problem.
    ``overwrite`` as for :func:`compress_one`.
    """
    with _open_binary_input(src) as f:
        reader = EcdcReader(f, salvage=options.salvage, max_silence=options.max_silence)
        codec = codec_for(reader.header)
        codec.check_compatible(reader.header)  # before anything is written
        rate, channels = codec.output_format(reader.header, options.sample_rate, options.channels)
        try:
            if dst == STDIO:
                frames = _decode_into(codec, reader, sys.stdout.buffer, rate, channels, options, progress)
            else:
                with atomic_output(dst, overwrite) as out:
                    frames = _decode_into(codec, reader, out, rate, channels, options, progress)
        except (ChecksumError, TruncatedError) as exc:
            # The header was intact, so salvage can recover the chunks that are.
            raise type(exc)(f"{exc}; --salvage decodes the intact parts") from None
    if reader.damage and warn is not None:
        for line in reader.damage:
            warn(line)
        lost = sum(gap.num_samples for gap in reader.gaps) / reader.header.sample_rate
        warn(f"salvaged: {frames / rate:.2f} s written, {lost:.2f} s of it silence in place of lost audio")
    return frames / rate


def _decode_into(codec: Codec, reader: EcdcReader, out: BinaryIO, rate: int, channels: int,
                 options: DecompressOptions, progress: Optional[ProgressFn]) -> int:
    sink = WavStreamWriter(out, rate, channels, raw=options.raw)
    out.flush()
    for block in codec.decode_blocks(reader, options.sample_rate, options.channels, progress):
        sink.write(block)
        out.flush()
    sink.close()
    return sink.frames_written


@contextlib.contextmanager
def _open_binary_input(src: str) -> Iterator[BinaryIO]:
    if src == STDIO:
        yield sys.stdin.buffer
        return
    with open(src, "rb") as f:
        yield f


def read_encoded(src: str) -> Tuple[EncodedAudio, int]:
    """All of the .ecdc stream at ``src`` (a path or ``-``) and its size in bytes (``info``).

    Parsed while it is read, never read whole first: what does not start like .ecdc
    (``/dev/zero``) is refused after 5 bytes, and lengths are checked before their bytes are read.
    """
    with _open_binary_input(src) as f:
        counted = _CountingReader(f)
        encoded = EncodedAudio.read(counted)  # type: ignore[arg-type]
    return encoded, counted.count


class _CountingReader:
    """A file object's ``read``, counting the bytes it gives (EcdcReader calls nothing else)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        return data


class CodecCache:
    """Loads codecs on demand and keeps them, so a batch loads each model once.

    With ``kind`` (COMPRESS or DECOMPRESS) each model loaded keeps only the half it needs
    (:meth:`~ecdc.models.EncodecModel.release_unused`), for a smaller peak memory.
    """

    def __init__(self, choice: ModelChoice, progress: Optional[Callable[[int, Optional[int]], None]] = None,
                 preloaded: Optional[Codec] = None, kind: Optional[str] = None):
        self.choice = choice
        self.progress = progress
        self.kind = kind
        self._codecs: Dict[Optional[str], Codec] = {}
        if preloaded is not None:
            self._codecs[None] = preloaded

    def _loaded(self, codec: Codec) -> Codec:
        if self.kind is not None:
            codec.model.release_unused("encode" if self.kind == COMPRESS else "decode")
        return codec

    def default(self) -> Codec:
        """The codec the user named (compression always has one)."""
        if None not in self._codecs:
            c = self.choice
            self._codecs[None] = self._loaded(load_model(c.model, device=c.device, checkpoint=c.checkpoint,
                                                         progress=self.progress))
        return self._codecs[None]

    def for_header(self, header: EcdcHeader) -> Codec:
        """The codec the user named, else the one the file's header names."""
        if self.choice.named:
            return self.default()
        name = header.model_name
        if name not in self._codecs:
            c = self.choice
            self._codecs[name] = self._loaded(load_model_for(header, None, None, c.device, progress=self.progress))
        return self._codecs[name]


def convert_one(kind: str, codecs: CodecCache, src: str, dst: str, options: Options,
                progress: Optional[ProgressFn] = None, warn: Optional[WarnFn] = None,
                overwrite: bool = False) -> float:
    """One conversion of either kind; returns the seconds of audio converted."""
    if kind == COMPRESS:
        return compress_one(codecs.default(), src, dst, options, progress, overwrite)  # type: ignore[arg-type]
    return decompress_one(src, dst, options, codecs.for_header, progress, warn, overwrite)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- planning a batch


@dataclass(frozen=True)
class Job:
    """One conversion; picklable, so it can go to a worker process."""

    src: str
    dst: str
    seconds: float = 0.0  #: estimated audio length, for the progress bar
    overwrite: bool = False  #: ``-f``: replace ``dst`` even if it exists (or appears meanwhile)


@dataclass
class Plan:
    """What a batch will do: conversions, outputs that exist already, inputs that are errors."""

    jobs: List[Job] = field(default_factory=list)
    skipped: List[Job] = field(default_factory=list)
    errors: List[Tuple[str, str]] = field(default_factory=list)
    #: (path, why) of files a tree walk left out (named pipes, devices, sockets)
    warnings: List[Tuple[str, str]] = field(default_factory=list)


def is_batch(inputs: Sequence[str], recursive: bool) -> bool:
    """Several inputs, or a directory to recurse into; one file (or ``-``) is a single conversion."""
    if len(inputs) != 1:
        return True
    return recursive and inputs[0] != STDIO and os.path.isdir(inputs[0])


def single_output(src: str, output: Optional[str], suffix: str) -> str:
    """Where a single conversion writes: ``-o`` (a file, or into an existing directory),
    else beside the input with ``suffix`` (stdout for stdin)."""
    if output is None:
        return STDIO if src == STDIO else str(Path(src).with_suffix(suffix))
    if output != STDIO and os.path.isdir(output):
        if src == STDIO:
            raise EcdcError(f"{output} is a directory; name the output file for stdin with -o FILE")
        return str(Path(output) / Path(src).with_suffix(suffix).name)
    return output


def plan_batch(kind: str, inputs: Sequence[str], output_dir: Optional[str], recursive: bool, force: bool,
               options: Options) -> Plan:
    """Expand files and directories into jobs; outputs mirror each directory argument's tree.

    Without ``output_dir`` each output goes beside its input. Existing outputs are skipped
    unless ``force``; a directory without ``recursive`` and a missing input are errors.
    """
    suffix = output_suffix(kind, options)
    wanted = AUDIO_EXTENSIONS if kind == COMPRESS else frozenset({ECDC_EXTENSION})
    plan = Plan()
    claimed: Dict[str, str] = {}
    if output_dir is not None and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise EcdcError(f"{output_dir}: with several inputs -o must be a directory")
    for arg in inputs:
        if arg == STDIO:
            raise EcdcError("- (stdin) cannot be combined with other inputs")
        if not os.path.exists(arg):
            plan.errors.append((arg, "no such file or directory"))
            continue
        if os.path.isdir(arg):
            if not recursive:
                plan.errors.append((arg, "is a directory (use -r to convert the files in it)"))
                continue
            pairs = [(path, path.relative_to(arg)) for path in _walk(Path(arg), wanted, plan.warnings)]
        else:
            pairs = [(Path(arg), Path(Path(arg).name))]
        for path, rel in pairs:
            base = Path(output_dir) if output_dir is not None else path.parent
            dst = base / rel.with_suffix(suffix) if output_dir is not None else path.with_suffix(suffix)
            job = Job(str(path), str(dst), _estimate_seconds(kind, str(path)), overwrite=force)
            problem = _output_problem(job, claimed, force)
            if problem == "exists":
                plan.skipped.append(job)
            elif problem:
                plan.errors.append((job.src, problem))
            else:
                claimed[os.path.abspath(job.dst)] = job.src
                plan.jobs.append(job)
    return plan


def _walk(root: Path, wanted: frozenset, skipped: List[Tuple[str, str]]) -> Iterator[Path]:
    """Files under ``root`` with a wanted extension, sorted; hidden files and folders skipped.

    The order is ``os.walk``'s (a folder's files, then each subfolder's tree in turn), but
    from a stack of folders, not recursion: a tree of any depth is walked. Symlinked folders
    are not entered (as ``os.walk`` does not), so links cannot loop. A match that is not a
    regular file (a FIFO, device or socket, or a link to one) would block the batch or
    never end: it is left out, with its (path, why) appended to ``skipped``.
    """
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # an unreadable folder, as os.walk skips it
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_dir(entry):
                if not entry.is_symlink():
                    subfolders.append(folder / entry.name)
            elif os.path.splitext(entry.name)[1].lower() in wanted:
                path = folder / entry.name
                why = _not_regular(path)
                if why:
                    skipped.append((str(path), why))
                else:
                    yield path
        folders.extend(reversed(subfolders))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path) -> Optional[str]:
    """Why a file found in a tree is left out, or None for a regular file (or one that cannot
    be examined: its conversion reports why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return None
    kind = next((name for test, name in _SPECIAL_FILES if test(st.st_mode)), "a special file")
    if os.path.islink(path):
        kind = f"a link to {kind}"
    hint = "; name it as an input to read from it" if stat.S_ISFIFO(st.st_mode) else ""
    return f"skipped: {kind}, not a regular file{hint}"


def _output_problem(job: Job, claimed: Dict[str, str], force: bool) -> Optional[str]:
    dst = os.path.abspath(job.dst)
    if dst in claimed:
        return f"its output {job.dst} would also be written from {claimed[dst]}"
    if os.path.exists(job.dst):
        if os.path.samefile(job.src, job.dst):
            return "output would be the input file"
        if os.path.isdir(job.dst):
            return f"output {job.dst} is a directory"
        if not force:
            return "exists"
    return None


def _estimate_seconds(kind: str, path: str) -> float:
    """Audio length for the progress bar, from headers only (0 when it cannot be told)."""
    if not os.path.isfile(path):
        return 0.0  # stdin, or a named pipe that must not be read twice
    try:
        if kind == COMPRESS:
            with open_audio_file(path) as source:  # opens names libsndfile cannot take, too
                return (source.frames or 0) / source.sample_rate
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


# --------------------------------------------------------------------------- running a batch


@dataclass
class Summary:
    """Counts for the one-line report at the end of a batch."""

    converted: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0  #: audio converted
    wall: float = 0.0

    def line(self) -> str:
        skipped = f"{self.skipped} skipped (output exists; -f overwrites)" if self.skipped else "0 skipped"
        return printable(f"ecdc: {self.converted} converted, {skipped}, {self.failed} failed; "
                         f"{self.seconds:.1f} s of audio in {self.wall:.1f} s")


class _Progress:
    """A tqdm bar over audio seconds with a files count, or nothing."""

    def __init__(self, enabled: bool, total_seconds: float, files: int, stream: TextIO):
        self.files = files
        self.done = 0
        self.stream = stream
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=round(total_seconds) or None, unit="s", file=stream, leave=False,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s of audio "
                                                           "[{elapsed}<{remaining}{postfix}]")
            self._postfix()

    def advance(self, seconds: float) -> None:
        if self.bar is not None and seconds:
            self.bar.update(round(seconds, 2))

    def file_done(self) -> None:
        self.done += 1
        self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.done}/{self.files} files", refresh=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(printable(line), file=self.stream)
        else:
            emit(line, self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_enabled(quiet: bool, stream: TextIO) -> bool:
    """Bars only on a terminal, and never with ``-q``."""
    try:
        return not quiet and stream.isatty()
    except (AttributeError, ValueError):
        return False


def convert_single(kind: str, codecs: CodecCache, src: str, dst: str, options: Options,
                   quiet: bool = False, stream: Optional[TextIO] = None, overwrite: bool = False) -> float:
    """One conversion with a progress bar on a terminal; errors propagate to the caller.

    ``overwrite`` is ``-f``: without it the output must not exist when it is renamed into place.
    """
    stream = stream or sys.stderr
    seconds = _estimate_seconds(kind, src) if src != STDIO else 0.0
    bar = _Progress(progress_enabled(quiet, stream), seconds, 1, stream)
    try:
        return convert_one(kind, codecs, src, dst, options, bar.advance,
                           lambda line: bar.write(warning_line(src, line)), overwrite)
    finally:
        bar.close()


def run_batch(kind: str, plan: Plan, choice: ModelChoice, options: Options, workers: int = 1,
              quiet: bool = False, codecs: Optional[CodecCache] = None,
              stream: Optional[TextIO] = None) -> Summary:
    """Convert every job of ``plan``; one line per failure on ``stream``, and a summary back.

    ``workers`` > 1 runs that many processes, each loading the model once and using an
    equal share of the CPU cores. KeyboardInterrupt (SIGINT, or SIGTERM/SIGHUP/SIGQUIT
    under :func:`interrupts_as_keyboard`) stops the workers, removes their partial outputs and
    propagates.
    """
    stream = stream or sys.stderr
    started = time.monotonic()
    summary = Summary(skipped=len(plan.skipped), failed=len(plan.errors))
    bar = _Progress(progress_enabled(quiet, stream), sum(j.seconds for j in plan.jobs), len(plan.jobs), stream)

    def report(src: str, message: str) -> None:
        bar.write(error_line(src, message))

    for src, message in plan.warnings:
        bar.write(warning_line(src, message))
    for src, message in plan.errors:
        report(src, message)

    def done(job: Job, seconds: Optional[float], error: Optional[str]) -> None:
        if error is None:
            summary.converted += 1
            summary.seconds += seconds or 0.0
        else:
            summary.failed += 1
            report(job.src, error)
        bar.file_done()

    try:
        if workers <= 1 or len(plan.jobs) <= 1:
            cache = codecs or CodecCache(choice, kind=kind)
            for job in plan.jobs:
                _make_parent(job.dst)
                try:
                    seconds = convert_one(kind, cache, job.src, job.dst, options, bar.advance,
                                          lambda line, src=job.src: bar.write(warning_line(src, line)),
                                          job.overwrite)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                    done(job, None, describe_error(exc))
                else:
                    done(job, seconds, None)
        else:
            _run_pool(kind, plan.jobs, choice, options, min(workers, len(plan.jobs)), bar, done)
    finally:
        bar.close()
    summary.wall = time.monotonic() - started
    return summary


def error_line(src: str, message: str) -> str:
    return _message_line("error", src, message)


def warning_line(src: str, message: str) -> str:
    return _message_line("warning", src, message)


def _message_line(level: str, src: str, message: str) -> str:
    """The one formatter of ``ecdc: LEVEL: FILE: message`` lines (cli.py's errors too)."""
    where = "<stdin>" if src == STDIO else src
    return printable(f"ecdc: {level}: {where}: {message}" if where else f"ecdc: {level}: {message}")


#: C0 controls, DEL, C1 controls and the Unicode line/paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (a newline as the two characters
    ``\\n``, ESC as ``\\x1b``, like ``ls -b``): a file name or an exception's text must
    neither split a message line (faking another) nor drive the terminal. Idempotent."""
    def escape(match: "re.Match[str]") -> str:
        char = match.group()
        if char in _NAMED_ESCAPES:
            return _NAMED_ESCAPES[char]
        return f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}"

    return _CONTROLS.sub(escape, text)


_lost_messages = False


def emit(line: str, stream: Optional[TextIO]) -> None:
    """Show one message line on ``stream`` (standard error, escaped by :func:`printable`).

    ``None`` is a closed standard error (``2>&-``): the line is lost, and
    :func:`messages_lost` says so, so that the exit status can (nothing unseen exits 0).
    """
    global _lost_messages
    if stream is None:
        _lost_messages = True
        return
    print(printable(line), file=stream, flush=True)


def messages_lost() -> bool:
    """Whether a message was dropped because standard error is closed."""
    return _lost_messages


def describe_error(exc: BaseException) -> str:
    """One line for any failure of one file; unexpected ones name their type."""
    if isinstance(exc, EcdcError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or exc}{where}"
    text = str(exc).strip().splitlines()
    return f"internal error: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _make_parent(path: str) -> None:
    """Create the folders above ``path``; a loop, as os.makedirs recurses once per level."""
    missing = []
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent):
        missing.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not os.path.isdir(folder):  # another worker may have made it; a file may not
                raise


# --------------------------------------------------------------------------- worker processes


class _Terminated(BaseException):
    """Raised in a worker by one of :data:`STOP_SIGNALS`: unwinds (removing temp files)
    without being caught as an error."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def cpu_count() -> int:
    """CPUs this process may use (affinity mask and cgroup quota), to share among workers."""
    return available_cpus()


def _worker(kind: str, choice: ModelChoice, options: Options, threads: int,
            tasks: "multiprocessing.Queue", results: "multiprocessing.Queue") -> None:
    """A worker process: loads the model once, converts jobs until told to stop."""
    for signum in STOP_SIGNALS:  # the parent's SIGTERM, or SIGHUP/SIGQUIT sent to the whole group
        signal.signal(signum, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        if hasattr(signal, "pthread_sigmask"):  # blocked when we were started: see _group_signals_blocked
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        configure_threads(threads)
        codecs = CodecCache(choice, kind=kind)
        while True:
            item = tasks.get()
            if item is None:
                return
            index, job = item
            results.put(("start", index, os.getpid()))
            sent = [time.monotonic(), 0.0]

            def progress(seconds: float, index: int = index) -> None:
                sent[1] += seconds
                now = time.monotonic()
                if now - sent[0] > 0.1:
                    results.put(("progress", index, sent[1]))
                    sent[0], sent[1] = now, 0.0

            try:
                _make_parent(job.dst)
                seconds = convert_one(kind, codecs, job.src, job.dst, options, progress,
                                      lambda line, index=index: results.put(("warning", index, line)),
                                      job.overwrite)
            except Exception as exc:  # noqa: BLE001 - reported, the batch goes on
                results.put(("progress", index, sent[1]))
                results.put(("done", index, None, describe_error(exc)))
            else:
                results.put(("progress", index, sent[1]))
                results.put(("done", index, seconds, None))
    except (_Terminated, KeyboardInterrupt):
        # Partial outputs were removed while unwinding; exit at once, without waiting to
        # deliver queued messages to a parent that has stopped reading.
        os._exit(EXIT_INTERRUPTED)


def _context() -> Any:
    """forkserver where there is one: torch is imported once in the server and each worker
    is a cheap fork of it; spawn elsewhere. (Never plain fork: a forked parent's torch
    thread pools can deadlock the child.)"""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["ecdc.batch", "torch"])
        return ctx
    return multiprocessing.get_context("spawn")


#: What a terminal sends to its whole process group besides SIGINT: hangup, Ctrl-\.
_GROUP_SIGNALS = tuple(s for s in STOP_SIGNALS if s != signal.SIGTERM)


@contextlib.contextmanager
def _group_signals_blocked() -> Iterator[None]:
    """Block SIGHUP and SIGQUIT while multiprocessing starts its helper processes.

    The forkserver and the resource tracker inherit the mask, so, like SIGINT (which they
    ignore themselves), a hangup or Ctrl-\\ sent to the whole group does not kill them under
    a parent still cleaning up (a killed tracker is restarted and prints tracebacks, and
    keeps stderr open); they leave when the parent does. Workers unblock the signals. One
    arriving meanwhile is delivered to the parent when this ends, not lost.
    """
    if not _GROUP_SIGNALS or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
    try:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _run_pool(kind: str, jobs: List[Job], choice: ModelChoice, options: Options, workers: int,
              bar: _Progress, done: Callable[[Job, Optional[float], Optional[str]], None]) -> None:
    ctx = _context()
    threads = max(1, cpu_count() // workers)
    procs = []
    with _group_signals_blocked():  # the queues start the resource tracker, the first worker the forkserver
        tasks = ctx.Queue()
        results = ctx.Queue()
        for index, job in enumerate(jobs):
            tasks.put((index, job))
        for _ in range(workers):
            tasks.put(None)
        # Workers inherit an ignored SIGINT from the start, so Ctrl-C during their startup
        # cannot print a traceback from them; the parent stops them with SIGTERM instead.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for _ in range(workers):
                p = ctx.Process(target=_worker, args=(kind, choice, options, threads, tasks, results), daemon=True)
                p.start()
                procs.append(p)
        finally:
            signal.signal(signal.SIGINT, previous)
    running: Dict[int, int] = {}  # pid -> job index
    finished: Set[int] = set()

    def handle(msg: tuple) -> None:
        what, index = msg[0], msg[1]
        if what == "start":
            running[msg[2]] = index
        elif what == "progress":
            bar.advance(msg[2])
        elif what == "warning":
            bar.write(warning_line(jobs[index].src, msg[2]))
        elif what == "done" and index not in finished:
            finished.add(index)
            for pid in [pid for pid, i in running.items() if i == index]:
                del running[pid]
            done(jobs[index], msg[2], msg[3])

    try:
        while len(finished) < len(jobs):
            try:
                handle(results.get(timeout=0.2))
            except queue.Empty:
                if any(p.exitcode is not None and p.pid in running for p in procs) \
                        or not any(p.is_alive() for p in procs):
                    _drain(results, handle)  # what they sent before exiting
                    _reap_dead(procs, running, jobs, finished, done)
                if not any(p.is_alive() for p in procs):
                    for index, job in enumerate(jobs):
                        if index not in finished:
                            finished.add(index)
                            done(job, None, "not converted: every worker process died")
    except BaseException:
        _stop(procs)
        for index in running.values():
            if index not in finished:
                _remove_temp_files(jobs[index].dst)
        raise
    finally:
        for p in procs:
            p.join(timeout=5)
        tasks.cancel_join_thread()
        results.cancel_join_thread()


def _drain(results: "multiprocessing.Queue", handle: Callable[[tuple], None]) -> None:
    while True:
        try:
            handle(results.get(timeout=0.05))
        except queue.Empty:
            return


def _reap_dead(procs: list, running: Dict[int, int], jobs: List[Job], finished: Set[int],
               done: Callable[[Job, Optional[float], Optional[str]], None]) -> None:
    """A worker that died mid-job (killed, out of memory) fails that job, not the batch."""
    for p in procs:
        if p.exitcode is not None and p.pid in running:
            index = running.pop(p.pid)
            if index not in finished:
                finished.add(index)
                _remove_temp_files(jobs[index].dst)
                done(jobs[index], None, f"worker process died (exit status {p.exitcode})")


def _stop(procs: list) -> None:
    """SIGTERM every worker (each removes its partial output), then make sure they are gone."""
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.kill()
            p.join(timeout=1)


def _remove_temp_files(dst: str) -> None:
    """Remove the temp file a killed worker left for ``dst``: exactly atomic_output's
    ``.NAME.XXXXXXXX.tmp`` for this output (no glob: ``a*`` must not match ``abc``'s) and
    only if no live process holds it, so another job's or another run's file is never taken."""
    remove_temp_files(dst)


# --------------------------------------------------------------------------- signals


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """Treat :data:`STOP_SIGNALS` (SIGTERM, SIGHUP, SIGQUIT) like Ctrl-C (KeyboardInterrupt),
    so cleanup runs and partial files go."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    previous: Dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
