"""The values the command line's options take, and how a bitrate is shown: what ``--help``
and ``ecdc info`` need, so this module imports neither torch nor numpy (``ecdc --help``
loads neither; :mod:`ecdc.codec` and the model check values against these)."""

from __future__ import annotations

#: ``--stereo``: how multi-channel input goes through a mono model: ``downmix`` codes the
#: ITU-R BS.775 mix of its channels (:func:`ecdc.audio.mix_matrix`), ``separate`` every
#: channel as its own stream; ``dual`` is separate's older name.
STEREO_CHOICES = ("downmix", "separate", "dual")

#: ``decompress --format``: the formats :data:`ecdc.outputformats.OUTPUT_FORMATS` writes (opus
#: and mp3 only where libsndfile was built with them; that is checked when one is asked for).
OUTPUT_FORMAT_CHOICES = ("wav", "flac", "ogg", "opus", "mp3", "aiff", "raw")
#: ``decompress --bits``: 16 or 24-bit integers, 32-bit float (opusdec's ``--float``).
BITS_CHOICES = ("16", "24", "32f")
#: ``compress --raw-format``: headerless PCM layouts (:data:`ecdc.wavstream.RAW_INPUT_FORMATS`).
RAW_FORMAT_CHOICES = ("s16le", "s24le", "f32le")


def format_kbps(kbps: float) -> str:
    """A bandwidth as short as ``:g`` where that is exact, else in full (``repr``), so that
    distinct values print distinctly: -b 6.0000001 is not shown as "6"."""
    short = f"{kbps:g}"
    return short if float(short) == kbps else repr(float(kbps))
