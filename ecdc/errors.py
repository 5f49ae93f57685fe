"""Exceptions that ecdc reports to users as a single line.

Everything the CLI is expected to catch derives from :class:`EcdcError`; any other
exception reaching the CLI is a bug in ecdc.
"""

from __future__ import annotations

import os


class EcdcError(Exception):
    """Base class: a problem with the user's input or environment, not a bug.

    ``where`` says what the problem is about when that is not the command's input, so that
    the line a user reads blames the right thing (:mod:`ecdc.messages`): a file (a
    checkpoint, ``--checkpoint nope.th``) is named as the line's file; ``""`` puts no file
    before the message, which names what is at fault itself ("cannot write out.wav: ...")
    or is about no file (an unsupported ``-b``, an unknown ``--model``).
    ``str()`` is the whole message, starting with the file when there is one, for callers
    of the API; ``reason`` is the message without it.
    """

    def __init__(self, message: str = "", *, where: str | os.PathLike[str] | None = None):
        self.where = None if where is None else os.fspath(where)
        self.reason = message
        super().__init__(f"{self.where}: {message}" if self.where else message)


class FormatError(EcdcError):
    """A .ecdc stream is malformed."""


class TruncatedError(FormatError):
    """A .ecdc stream ends before its end marker."""


class ChecksumError(FormatError):
    """A CRC32 in a .ecdc stream does not match its data."""


class UnsupportedVersionError(FormatError):
    """A .ecdc stream uses a format version this ecdc cannot read."""


class UnsupportedFeatureError(FormatError):
    """A .ecdc stream uses a feature ecdc does not implement (e.g. Meta's LM entropy coding)."""


class AudioError(EcdcError):
    """Audio could not be read, written or converted."""


class OutputError(EcdcError):
    """An output could not be written: a full disk, a file-size limit, no permission."""


class ModelError(EcdcError):
    """Unknown model, unsupported bandwidth, or weights that do not match a file."""


class WeightsError(EcdcError):
    """A checkpoint could not be downloaded, verified or loaded."""
