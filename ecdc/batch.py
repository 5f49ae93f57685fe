"""Converting files: one input (file or pipe) or many (files and directory trees).

The command line is glue around this module. It decides where outputs go, plans a batch
(which inputs, which outputs, what to skip), and runs it with a progress bar and a
summary: each file is converted by the batch's :class:`~ecdc.convert.Conversion`, in this
process or in worker processes (:mod:`ecdc.pool`, each loading the model once). One bad
file is reported and skipped; Ctrl-C, SIGTERM, SIGHUP or SIGQUIT stops everything and
leaves no partial files.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from .convert import (
    AUDIO_EXTENSIONS,
    CONVERSIONS,
    ECDC_EXTENSION,
    CompressOptions,
    Conversion,
    DecompressOptions,
    ModelChoice,
    Options,
    OutputClash,
    WarnFn,
    output_clash,
)
from .errors import EcdcError
from .messages import (
    PathError,
    describe_error,
    emit,
    error_line,
    output_name,
    printable,
    stats_line,
    stats_text,
    stdin_note,
    warning_line,
)
from .outputs import make_parents
from .pool import cpu_count, run_pool
from .shards import Shard
from .streams import STDIO

__all__ = [  # with what a batch is planned and run with, importable from here as it always was
    "AUDIO_EXTENSIONS", "ECDC_EXTENSION", "CompressOptions", "DecompressOptions", "Job", "ModelChoice", "Plan",
    "Summary", "check_batch_output", "convert_single", "cpu_count", "is_batch", "names_directory", "plan_batch",
    "progress_enabled", "run_batch", "single_output",
]

#: Suffixes that make an ``-o`` look like one file (what either command reads or writes).
_FILE_SUFFIXES = AUDIO_EXTENSIONS | {ECDC_EXTENSION, ".raw", ".pcm"}
#: Inputs that are more likely a format name from ffmpeg's ``-f FORMAT`` habit than a file.
_FORMAT_NAMES = frozenset(suffix[1:] for suffix in _FILE_SUFFIXES) | {"s16le", "pcm"}

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

    jobs: list[Job] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    #: (path, why) of files a tree walk left out (named pipes, devices, sockets)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def is_batch(inputs: Sequence[str], recursive: bool) -> bool:
    """Several inputs, or a directory to recurse into; one file (or ``-``) is a single conversion."""
    if len(inputs) != 1:
        return True
    return recursive and inputs[0] != STDIO and os.path.isdir(inputs[0])


def names_directory(output: str | None) -> bool:
    """Whether ``-o`` ends with a path separator: a directory, as ``cp`` and ``mv`` read it,
    whether or not it exists yet."""
    if output is None or output == STDIO:
        return False
    return output.endswith(os.sep) or bool(os.altsep and output.endswith(os.altsep))


def _without_slash(output: str) -> str:
    """``output`` without trailing separators, so that ``file/`` is seen to exist."""
    return output.rstrip(os.sep + (os.altsep or "")) or output


def single_output(src: str, output: str | None, suffix: str) -> str:
    """Where a single conversion writes: ``-o`` (a file, or into a directory: an existing
    one, or one named with a trailing ``/``, which :func:`convert_single` creates), else
    beside the input with ``suffix`` (stdout for stdin)."""
    if output is None:
        return STDIO if src == STDIO else str(Path(src).with_suffix(suffix))
    if output == STDIO:
        return output
    named_dir = names_directory(output)
    if named_dir and not os.path.isdir(output) and os.path.lexists(_without_slash(output)):
        raise PathError(output, "not a directory (a trailing / names one)")
    if named_dir or os.path.isdir(output):
        if src == STDIO:
            raise PathError(output, "is a directory; name the output file for stdin with -o FILE")
        return str(Path(output) / Path(src).with_suffix(suffix).name)
    return output


def check_batch_output(output: str | None, inputs: Sequence[str]) -> None:
    """Refuse, before anything is loaded or created, an ``-o`` that cannot take several
    outputs: stdout, an existing file, or a name that looks like one file (``y.wav``: most
    likely ``-f FORMAT`` read as ffmpeg's, which made ``FORMAT`` a second input)."""
    if output is None:
        return
    if output == STDIO:
        raise PathError(output_name(STDIO), "-o - (stdout) takes a single input file")
    if os.path.isdir(output):
        return
    if os.path.lexists(_without_slash(output)):
        raise PathError(output, "with several inputs -o must be a directory")
    if not names_directory(output) and Path(output).suffix.lower() in _FILE_SUFFIXES:
        format_name = _format_name(inputs)
        hint = f" (is {format_name} meant as a format? {_FORCE_NOT_FORMAT})" if format_name else ""
        raise PathError(output, f"-o looks like one file, but a batch writes several{hint}; "
                                f"for a directory of that name end it with /")


#: Said of an input that does not exist and is named like a format (``-f wav``).
_FORCE_NOT_FORMAT = "-f means --force here; the format comes from the output's suffix"


def _format_name(inputs: Sequence[str]) -> str | None:
    """The first input that does not exist and is named like a format, as ffmpeg's
    ``-f FORMAT`` habit makes one, or None."""
    return next((arg for arg in inputs if arg.lower() in _FORMAT_NAMES and not os.path.lexists(arg)), None)


def plan_batch(kind: str, inputs: Sequence[str], output_dir: str | None, recursive: bool, force: bool,
               options: Options, shard: Shard | None = None) -> Plan:
    """Expand files and directories into jobs; outputs mirror each directory argument's tree.

    ``kind`` is the command (``"compress"`` or ``"decompress"``): which files a tree walk
    takes, and how their lengths are estimated; nothing is loaded. Without ``output_dir``
    each output goes beside its input. Existing outputs are skipped unless ``force``; a
    directory without ``recursive`` and a missing input are errors. With ``shard`` only its
    files of the whole batch's order are planned (:mod:`ecdc.shards`); clashes between
    outputs are still found across all of them.
    """
    direction = CONVERSIONS[kind]
    position = -1
    suffix = options.suffix
    wanted = direction.extensions
    plan = Plan()
    claimed: dict[str, str] = {}  #: output (absolute) -> the input it is planned (or skipped) for
    others: Counter[str] = Counter()  #: suffixes of the files tree walks left out
    check_batch_output(output_dir, inputs)
    for arg in inputs:
        if arg == STDIO:
            raise EcdcError("- (stdin) cannot be combined with other inputs")
        if not os.path.exists(arg):
            hint = f" ({_FORCE_NOT_FORMAT})" if _format_name([arg]) else ""
            plan.errors.append((arg, "no such file or directory" + hint))
            continue
        if os.path.isdir(arg):
            if not recursive:
                plan.errors.append((arg, "is a directory (use -r to convert the files in it)"))
                continue
            pairs = [(path, path.relative_to(arg)) for path in _walk(Path(arg), wanted, plan.warnings, others)]
        else:
            pairs = [(Path(arg), Path(Path(arg).name))]
        for path, rel in pairs:
            position += 1
            mine = shard is None or shard.takes(position)
            base = Path(output_dir) if output_dir is not None else path.parent
            dst = base / rel.with_suffix(suffix) if output_dir is not None else path.with_suffix(suffix)
            job = Job(str(path), str(dst), direction.estimate_seconds(str(path)) if mine else 0.0, overwrite=force)
            problem = _plan_problem(job, claimed, force)
            if problem in (None, "exists"):
                # An output skipped because it exists is claimed too, so that a second input
                # with the same output is the same collision on a rerun as on the first run.
                claimed[os.path.abspath(job.dst)] = job.src
            if not mine:
                continue
            if problem == "exists":
                plan.skipped.append(job)
            elif problem:
                plan.errors.append((job.src, problem))
            else:
                plan.jobs.append(job)
    if position < 0 and not plan.errors:
        raise PathError(inputs[0] if len(inputs) == 1 else "", _nothing_found(kind, wanted, others, plan.warnings))
    return plan


def _nothing_found(kind: str, wanted: frozenset, others: Counter[str], left_out: list) -> str:
    """What a batch whose tree walks found no file to convert says (one line, exit status 1)."""
    what = "audio files" if kind == "compress" else f"{ECDC_EXTENSION} files"
    text = f"no {what} to {kind} found (-r takes {', '.join(sorted(wanted))})"
    if others:
        found = ", ".join(f"{n} {suffix or 'without a suffix'}" for suffix, n in others.most_common(3))
        text += f"; found other files: {found}"
        if kind == "compress":
            text += " (convert other audio formats with ffmpeg first, e.g. ffmpeg -i IN.m4a OUT.flac)"
    if left_out:
        text += f"; {len(left_out)} left out as not regular files"
    return text


def _walk(root: Path, wanted: frozenset, skipped: list[tuple[str, str]],
          others: Counter[str] | None = None) -> Iterator[Path]:
    """Files under ``root`` with a wanted extension, sorted; hidden files and folders skipped
    (``others`` counts the suffixes of the other files).

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
            elif others is not None:
                others[os.path.splitext(entry.name)[1].lower()] += 1
        folders.extend(reversed(subfolders))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path) -> str | None:
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


def _plan_problem(job: Job, claimed: dict[str, str], force: bool) -> str | None:
    """Why ``job`` cannot be planned (``"exists"``: skip it), or None."""
    dst = os.path.abspath(job.dst)
    if dst in claimed:
        return f"its output {job.dst} would also be written from {claimed[dst]}"
    clash = output_clash(job.src, job.dst, force)
    if clash is OutputClash.IS_INPUT:
        return "output would be the input file"
    if clash is OutputClash.IS_DIRECTORY:
        return f"output {job.dst} is a directory"
    return "exists" if clash is OutputClash.EXISTS else None


# --------------------------------------------------------------------------- running a batch


@dataclass
class Summary:
    """Counts for the one-line report at the end of a batch, with the totals of what was
    converted (:func:`~ecdc.messages.stats_text`: audio, speed, bitrate, bytes and ratio)."""

    converted: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0  #: audio converted
    wall: float = 0.0
    kind: str = "compress"  #: the command, which says which side of the bytes is .ecdc
    bytes_in: int | None = 0  #: of the converted inputs; None once one could not be told
    bytes_out: int | None = 0  #: of their outputs; likewise

    def add_bytes(self, src: str, dst: str) -> None:
        """Count one converted file's input and output sizes."""
        self.bytes_in = _plus(self.bytes_in, _size(src))
        self.bytes_out = _plus(self.bytes_out, _size(dst))

    def line(self) -> str:
        skipped = f"{self.skipped} skipped (output exists; -f overwrites)" if self.skipped else "0 skipped"
        compressing = self.kind == "compress"
        coded = self.bytes_out if compressing else self.bytes_in
        stats = stats_text(self.seconds, self.wall, coded, self.bytes_in, self.bytes_out, compressing)
        return printable(f"ecdc: {self.converted} converted, {skipped}, {self.failed} failed; {stats}")


def _plus(total: int | None, n: int | None) -> int | None:
    return None if total is None or n is None else total + n


def _size(path: str) -> int | None:
    """Bytes in the regular file ``path``; None for a FIFO, a device, or what cannot be examined."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class BarLines:
    """What every progress bar of ecdc shares: a tqdm bar (``self.bar``; None when not
    shown) and the lines a run prints while it goes, kept above the bar, or plain lines
    when there is none."""

    bar: Any = None
    stream: TextIO | None = None

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(printable(line), file=self.stream)
        else:
            emit(line, self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Progress(BarLines):
    """A tqdm bar over audio seconds with a files count, or nothing.

    tqdm counts whole milliseconds (``unit_scale`` shows them as seconds), so that sums of
    float increments cannot drift past the total (tqdm's "clamping frac" warning) nor be
    shown as ``21.529999999999998``; seconds are shown rounded (tenths under 10 s). The
    total starts as the inputs' estimates and becomes each file's real length as it is
    done; the count never passes the total.
    """

    def __init__(self, enabled: bool, total_seconds: float, files: int, stream: TextIO | None):
        self.files = files
        self.done = 0
        self.stream = stream
        self.bar = None
        self.total_ms = _ms(total_seconds)  #: 0: unknown (stdin, or no estimates)
        self.advanced_ms = 0  #: what the conversions reported, which may overshoot the total
        if enabled:
            from tqdm import tqdm

            digits = 1 if 0 < total_seconds < 10 else 0
            if self.total_ms:
                shape = f"{{l_bar}}{{bar}}| {{n:.{digits}f}}/{{total:.{digits}f}} s of audio [{{elapsed}}<{{remaining}}"
            else:  # no bar to fill, no time to predict
                shape = "{n:.0f} s of audio [{elapsed}"
            self.bar = tqdm(total=self.total_ms or None, unit="s", unit_scale=0.001, file=stream, leave=False,
                            dynamic_ncols=True, bar_format=shape + "{postfix}]")
            self._postfix()

    def advance(self, seconds: float) -> None:
        if self.bar is not None and seconds:
            self.advanced_ms += _ms(seconds)
            self._show()

    def file_done(self, estimate: float = 0.0, actual: float | None = None) -> None:
        """One file finished; with its ``actual`` length the total takes it in place of its ``estimate``."""
        self.done += 1
        if self.bar is not None and self.total_ms and actual is not None:
            self.total_ms = max(1, self.total_ms + _ms(actual) - _ms(estimate))  # stays known
            self.bar.total = self.total_ms
            self._show()
        self._postfix()

    def _show(self) -> None:
        if self.bar is None:
            return
        shown = min(self.advanced_ms, self.total_ms) if self.total_ms else self.advanced_ms
        if shown != self.bar.n:
            self.bar.update(shown - self.bar.n)

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.done}/{self.files} files", refresh=True)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def progress_enabled(quiet: bool, stream: TextIO | None) -> bool:
    """Bars only on a terminal, and never with ``-q``."""
    return not quiet and _is_terminal(stream)


def _warn_to(bar: _Progress, src: str) -> WarnFn:
    """Where a conversion's warnings about ``src`` go: a line above the progress bar."""
    return lambda line: bar.write(warning_line(src, line))


def convert_single(conversion: Conversion, src: str, dst: str, quiet: bool = False,
                   stream: TextIO | None = None, overwrite: bool = False, make_dirs: bool = False) -> float:
    """One conversion with a progress bar on a terminal; returns its seconds of audio, and
    errors propagate to the caller.

    ``overwrite`` is ``-f``: without it the output must not exist when it is renamed into place.
    ``make_dirs`` creates the folders above ``dst`` first (``-o DIR/`` names a directory).
    Reading ``-`` from a terminal, it says first that it waits for standard input (unless ``quiet``).
    Unless ``quiet`` it ends, as opusenc does, with one line of figures on ``stream`` (a
    terminal or not): duration, speed, bitrate, bytes in and out and their ratio.
    """
    stream = stream or sys.stderr
    if make_dirs:
        make_parents(dst)
    if src == STDIO and not quiet and _is_terminal(sys.stdin):
        emit(stdin_note(conversion.reads), stream)
    seconds = conversion.estimate_seconds(src) if src != STDIO else 0.0
    bar = _Progress(progress_enabled(quiet, stream), seconds, 1, stream)
    bytes_in = None if src == STDIO else _size(src)
    conversion.stdio.clear()
    started = time.monotonic()
    try:
        duration = conversion.convert(src, dst, bar.advance, _warn_to(bar, src), overwrite).duration
    finally:
        bar.close()
    if not quiet and stream is not None:  # with stderr closed, figures nobody asked for are not "lost"
        wall = time.monotonic() - started
        if src == STDIO:
            bytes_in = conversion.stdio["stdin"].count if "stdin" in conversion.stdio else None
        bytes_out = _size(dst) if dst != STDIO else (
            conversion.stdio["stdout"].count if "stdout" in conversion.stdio else None)
        compressing = conversion.kind == "compress"
        coded = bytes_out if compressing else bytes_in
        emit(stats_line(src, dst, stats_text(duration, wall, coded, bytes_in, bytes_out, compressing)), stream)
    return duration


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


def run_batch(conversion: Conversion, plan: Plan, workers: int = 1, quiet: bool = False,
              stream: TextIO | None = None) -> Summary:
    """Convert every job of ``plan``; one line per failure on ``stream``, and a summary back.

    ``workers`` > 1 runs that many processes (:func:`~ecdc.pool.run_pool`), each loading
    the model once and using an equal share of the CPU cores. KeyboardInterrupt (SIGINT,
    or SIGTERM/SIGHUP/SIGQUIT under :func:`~ecdc.pool.interrupts_as_keyboard`) stops the
    workers, removes their partial outputs and propagates.
    """
    stream = stream or sys.stderr
    started = time.monotonic()
    summary = Summary(skipped=len(plan.skipped), failed=len(plan.errors), kind=conversion.kind)
    bar = _Progress(progress_enabled(quiet, stream), sum(j.seconds for j in plan.jobs), len(plan.jobs), stream)

    def report(src: str, message: str) -> None:
        bar.write(error_line(src, message))

    for src, message in plan.warnings:
        bar.write(warning_line(src, message))
    for src, message in plan.errors:
        report(src, message)

    def done(job: Job, seconds: float | None, error: str | None) -> None:
        if error is None:
            summary.converted += 1
            summary.seconds += seconds or 0.0
            summary.add_bytes(job.src, job.dst)
        else:
            summary.failed += 1
            report(job.src, error)
        bar.file_done(job.seconds, seconds if error is None else 0.0)

    try:
        if workers <= 1 or len(plan.jobs) <= 1:
            for job in plan.jobs:
                make_parents(job.dst)
                try:
                    seconds = conversion.convert(job.src, job.dst, bar.advance, _warn_to(bar, job.src),
                                                 job.overwrite).duration
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                    done(job, None, describe_error(exc))
                else:
                    done(job, seconds, None)
        else:
            run_pool(conversion, plan.jobs, min(workers, len(plan.jobs)), bar, done)
    finally:
        bar.close()
    summary.wall = time.monotonic() - started
    return summary

