"""The vocabulary of user messages: how an exception becomes the one line a user reads.

Every line ecdc writes to standard error is ``ecdc: LEVEL: FILE: message`` (or a batch
summary), made by :func:`message_line` and shown by :func:`emit`, both escaping control
characters (:func:`printable`) so that a file name or an exception's text cannot split a
line or drive the terminal. :func:`describe_error` says what went wrong with one file of a
batch; :func:`run_reporting` runs a whole command, turning expected failures into one line
and an exit status. Torch-free, so every layer may use it.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import sys
from typing import Callable, TextIO, TypeVar

from .errors import EcdcError
from .streams import STDIO

#: Exit status after SIGINT/SIGTERM/SIGHUP/SIGQUIT, as shells report for Ctrl-C.
EXIT_INTERRUPTED = 130
#: Exit status when the reader of standard output went away, as for a process killed by SIGPIPE.
EXIT_BROKEN_PIPE = 141

T = TypeVar("T")


class PathError(EcdcError):
    """A one-line failure tied to a file: printed as ``ecdc: error: FILE: message``
    (``where`` empty: ``ecdc: error: message``)."""

    where: str  #: never None here: the file at fault ("" for none)

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where = where


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: C0 controls, DEL, C1 controls and the Unicode line/paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (a newline as the two characters
    ``\\n``, ESC as ``\\x1b``, like ``ls -b``): a file name or an exception's text must
    neither split a message line (faking another) nor drive the terminal. Idempotent."""
    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in _NAMED_ESCAPES:
            return _NAMED_ESCAPES[char]
        return f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}"

    return _CONTROLS.sub(escape, text)


def message_line(level: str, where: str, message: str) -> str:
    """The one formatter of ``ecdc: LEVEL: FILE: message`` lines (``-`` is ``<stdin>``)."""
    shown = "<stdin>" if where == STDIO else where
    return printable(f"ecdc: {level}: {shown}: {message}" if shown else f"ecdc: {level}: {message}")


def output_name(dst: str) -> str:
    """How a line names the output ``dst``: ``-`` there is standard output (``<stdout>``),
    which :func:`message_line` would show as ``<stdin>``."""
    return "<stdout>" if dst == STDIO else dst


def error_line(where: str, message: str) -> str:
    return message_line("error", where, message)


def warning_line(where: str, message: str) -> str:
    return message_line("warning", where, message)


def stdin_note(what: str) -> str:
    """The line shown before reading ``what`` from a terminal, so that a forgotten ``<``
    or pipe does not look like a hang."""
    return f"ecdc: reading {what} from standard input (Ctrl-D ends it)"


def stats_text(seconds: float, wall: float, coded_bytes: int | None, bytes_in: int | None,
               bytes_out: int | None, compressing: bool) -> str:
    """End-of-run figures, as opusenc prints them but on one line that is easy to grep:
    ``3.20 s of audio in 0.08 s (41.7x real time), 6.15 kbps, 204844 -> 2460 bytes (ratio 83.3:1)``.

    ``coded_bytes`` is the .ecdc side (its bitrate is shown); the ratio is always audio
    bytes to .ecdc bytes (``83.3:1`` compressing, ``1:83.3`` decompressing). A byte count
    that cannot be known (an output that is a device) is ``?``, and what needs it is left out.
    """
    text = f"{seconds:.2f} s of audio in {wall:.2f} s"
    if seconds > 0 and wall > 0:
        text += f" ({seconds / wall:.1f}x real time)"
    if seconds > 0 and coded_bytes is not None:
        text += f", {coded_bytes * 8 / seconds / 1000:.2f} kbps"
    shown = ["?" if n is None else str(n) for n in (bytes_in, bytes_out)]
    text += f", {shown[0]} -> {shown[1]} bytes"
    if bytes_in and bytes_out:
        pcm, coded = (bytes_in, bytes_out) if compressing else (bytes_out, bytes_in)
        ratio = f"{pcm / coded:.1f}:1" if compressing else f"1:{pcm / coded:.1f}"
        text += f" (ratio {ratio})"
    return text


def stats_line(src: str, dst: str, stats: str) -> str:
    """The line a single conversion ends with (unless ``-q``): ``ecdc: IN -> OUT: figures``."""
    shown_src = "<stdin>" if src == STDIO else src
    return printable(f"ecdc: {shown_src} -> {output_name(dst)}: {stats}")


def unreadable_format_text(format_name: str, path: str | None) -> str:
    """What is said of an input in a format ecdc's audio reader (libsndfile) cannot decode:
    the format, and the ffmpeg pipe that converts it on the way (with ``path`` and an
    output beside it filled in when the input is a file, shell-quoted)."""
    if path:
        src, dst = shlex.quote(path), shlex.quote(os.path.splitext(os.path.basename(path))[0] + ".ecdc")
    else:
        src, dst = "INPUT", "OUTPUT.ecdc"
    return (f"cannot read audio: this is {format_name}, which libsndfile (ecdc's audio reader) cannot "
            f"decode; convert it on the way: ffmpeg -i {src} -f wav - | ecdc compress - -o {dst}")


def command_error_line(exc: EcdcError | MemoryError | OSError, where: str) -> str:
    """The line a command's failure about input ``where`` is shown as, for a command that
    reports one failure per input and goes on (``info A B``)."""
    return error_line(*_command_error(exc, where))


_lost_messages = False


def emit(line: str, stream: TextIO | None) -> None:
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


def _os_error_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


def describe_error(exc: BaseException) -> str:
    """One line for any failure of one file of a batch; unexpected ones name their type."""
    if isinstance(exc, EcdcError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"{_os_error_text(exc)}{where}"
    detail = first_line(exc) if str(exc).strip() else ""
    return f"internal error: {type(exc).__name__}: {detail}".rstrip(": ")


def _command_error(exc: EcdcError | MemoryError | OSError, where: str) -> tuple[str, str]:
    """(file, message) of the line a command's failure is shown as: a :class:`PathError` at
    its own file, an OSError at the file it names (so the message does not repeat it), the
    rest at ``where``, the command's input, unless they say what they are about
    (:attr:`~ecdc.errors.EcdcError.where`: a checkpoint, or nothing the user named)."""
    if isinstance(exc, PathError):
        return exc.where, str(exc)
    if isinstance(exc, EcdcError) and exc.where is not None:
        return exc.where, exc.reason  # about another file (a checkpoint), or about none ("")
    if isinstance(exc, OSError):
        return getattr(exc, "filename", None) or where, _os_error_text(exc)
    return where, describe_error(exc)


def run_reporting(command: Callable[[], T], where: str) -> T:
    """Run one command; expected failures become one line on stderr and a non-zero exit,
    never a traceback (exceptions of other types are bugs, and propagate).

    ``where`` is the command's one input, named in lines about failures that name no other
    file ("" for none). A success exits 1 all the same when a message could not be shown.
    """
    try:
        result = command()
        if messages_lost():
            sys.exit(1)  # something to report could not be shown (stderr closed)
        return result
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as tools killed by SIGPIPE do.
        _silence_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
    except (EcdcError, MemoryError, OSError) as exc:
        emit(command_error_line(exc, where), sys.stderr)
    except KeyboardInterrupt:
        emit("ecdc: interrupted", sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(1)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
