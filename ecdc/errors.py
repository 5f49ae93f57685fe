"""Exceptions that ecdc reports to users as a single line.

Everything the CLI is expected to catch derives from :class:`EcdcError`; any other
exception reaching the CLI is a bug in ecdc.
"""


class EcdcError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


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
