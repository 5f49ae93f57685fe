"""Audio I/O, resampling and channel layout; numpy only, no torch.

Audio is handled as float32 arrays shaped ``[channels, samples]``. Reading goes through
soundfile (wav, flac, ogg/opus, ...), resampling through libsoxr, so neither torchaudio
nor ffmpeg is needed.

Bad input gets one clear outcome each (docs/ROBUSTNESS.md lists them): it is converted,
or :class:`~ecdc.errors.AudioError` says in one line what is wrong.  In particular:

* a missing file, a directory, an unreadable file or an empty (0-byte) file is refused
  before libsndfile sees it (whose own messages, e.g. "Format not recognised" for a
  directory, would mislead);
* a named pipe (or other non-regular file, e.g. ``/dev/stdin``) is read to its end like
  stdin, then decoded from memory: libsndfile must seek in most formats. Its first bytes
  are sniffed, so what begins no audio format (``/dev/zero``, ``/dev/urandom``) is
  refused at once, and more than :data:`MAX_BUFFERED_INPUT` of anything but WAV is
  refused rather than buffered without end;
* the format is detected from the content, so a wrong extension does not matter;
* a WAV whose header promises more sample frames than the file holds (an interrupted
  copy or recording) is converted as far as it goes, as libsndfile and the CLI's
  streaming reader do, with a :class:`TruncatedAudioWarning` saying how much is
  missing; a streaming writer's "size unknown" placeholder (0 or 0xFFFFFFFF) is
  not a truncation;
* NaN or infinite samples (possible only in float files) are refused: there is no
  right value to substitute, and the codec would turn them into noise or silence;
* sample rates outside 1 kHz .. 1 MHz are refused (the container's limit is 1 MHz; below
  1 kHz is not audio, and upsampling it would multiply its size many times over);
* :func:`write_audio` saturates integer output at full scale (never wraps around) and
  writes NaN as 0.

The ``check_*`` helpers are public so that streaming readers can apply the same rules.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import sys
import warnings
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from .container import MAX_ORIGINAL_CHANNELS
from .errors import AudioError
from .messages import first_line

PathOrFile = str | os.PathLike | BinaryIO

#: Largest PCM_16 value as a float, so clipping never wraps around to the other sign.
_PCM16_MAX = 32767 / 32768

#: Input sample rates accepted, in Hz (the container stores up to 1 MHz).
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 1_000_000

# How much of a WAV file's start is searched for its "data" chunk header.
_WAV_HEAD = 1 << 16

#: Most bytes of a pipe or device input held in memory to decode it when it cannot be
#: streamed (not PCM WAV: libsndfile must seek in those formats). More is refused, so an
#: endless input (``/dev/urandom``, a FIFO that never closes) cannot use up the memory.
MAX_BUFFERED_INPUT = 256 << 20

#: Bytes of a pipe or device input examined to tell whether it can be audio at all.
SNIFF_BYTES = 12

# libsndfile refuses paths this long ("Supplied filename too long"; its buffer is 1 KiB).
_SF_MAX_PATH = 1000


class TruncatedAudioWarning(UserWarning):
    """An audio file ends before its header says it does; what is present was read."""


def read_audio(source: PathOrFile) -> tuple[np.ndarray, int]:
    """Read any file soundfile can decode; return (``[C, T]`` float32, sample rate)."""
    if isinstance(source, (str, bytes, os.PathLike)):
        with _open_input(source) as f:
            return _decode(f)
    return _decode(source)


def read_audio_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an in-memory audio file (stdin is read whole when it is not seekable)."""
    if not data:
        raise AudioError("empty input")
    return _decode(io.BytesIO(data))


def input_error(exc: OSError) -> AudioError:
    """The one-line error for an ``OSError`` met while opening an input, whoever opened it."""
    if isinstance(exc, IsADirectoryError):
        return AudioError("is a directory, not an audio file")
    if isinstance(exc, FileNotFoundError):
        return AudioError("no such file")
    if isinstance(exc, PermissionError):
        return AudioError("permission denied")
    return AudioError(f"cannot read: {exc.strerror or exc}")


def check_input_path(path: str | bytes | os.PathLike) -> os.stat_result:
    """Refuse a path that cannot be an audio file (missing, directory, empty), in one line.

    Returns its ``stat`` so a caller can tell regular files from pipes.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise input_error(exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError("is a directory, not an audio file")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise AudioError("empty file (0 bytes), not audio")
    if stat.S_ISSOCK(st.st_mode):
        raise AudioError("is a socket, not an audio file")
    return st


def check_audio_head(head: bytes) -> None:
    """Refuse input whose first 12 bytes begin no format libsndfile reads (zeros, random bytes).

    libsndfile tells its formats apart by their first 12 bytes alone, so a pipe or device
    that fails the same tests (``/dev/zero``, ``/dev/urandom``) is refused at once instead
    of being buffered first. Shorter input is left to libsndfile (it is all there is).
    """
    if len(head) >= SNIFF_BYTES and not _could_be_audio(head):
        raise AudioError("cannot read audio: Format not recognised (its first bytes begin no "
                         "audio format ecdc reads)")


def buffer_stream(stream: BinaryIO, head: bytes = b"", limit: int | None = MAX_BUFFERED_INPUT) -> io.BytesIO:
    """All of a pipe or device (after ``head``, already read from it) in memory, for
    libsndfile to seek in; its format is sniffed first (:func:`check_audio_head`).

    More than ``limit`` bytes (None: no limit) is refused in one line saying what to do,
    rather than read without end.
    """
    buf = io.BytesIO()
    buf.write(head)
    try:
        if len(head) < SNIFF_BYTES:
            buf.write(read_upto(stream, SNIFF_BYTES - len(head)))
        check_audio_head(buf.getvalue()[:SNIFF_BYTES])
        while True:
            piece = stream.read(1 << 20)
            if not piece:
                break
            buf.write(piece)
            if limit is not None and buf.tell() > limit:
                raise AudioError(
                    f"input from a pipe or device that is not PCM WAV is decoded in memory, and this one "
                    f"is over the {limit >> 20} MiB limit: give it as a file, or convert it to WAV on the "
                    f"way (e.g. ffmpeg -i INPUT -f wav -)")
    except OSError as exc:
        raise AudioError(f"cannot read: {exc.strerror or exc}") from None
    buf.seek(0)
    return buf


def libsndfile_takes_name(path: str | os.PathLike) -> bool:
    """Whether libsndfile can open ``path`` by name. It refuses names that are not valid in
    the file system encoding (e.g. the byte 0xff in a UTF-8 locale) and paths of 1 KiB or
    more, all of which the OS takes: open those with Python and hand over the file object.
    (By name is preferred otherwise: given a file object, libsndfile looks for a Mac
    resource fork, ``._``, in the current directory when it does not recognise the data.)
    """
    try:
        return len(os.fspath(path).encode(sys.getfilesystemencoding())) < _SF_MAX_PATH
    except (UnicodeError, TypeError):
        return False


def is_wav_head(head: bytes) -> bool:
    """Whether ``head`` starts a RIFF, RIFX or RF64 WAVE file."""
    return head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE"


def check_channels(channels: int) -> int:
    """Refuse more channels than a .ecdc header can record (its original channel count),
    saying so about the audio, before any header is built; return the count as an int."""
    if int(channels) > MAX_ORIGINAL_CHANNELS:
        raise AudioError(f"the audio has {int(channels)} channels; ecdc supports at most "
                         f"{MAX_ORIGINAL_CHANNELS}")
    return int(channels)


def check_sample_rate(rate: int) -> int:
    """Refuse a sample rate ecdc cannot sensibly convert; return it as an int."""
    if not MIN_SAMPLE_RATE <= int(rate) <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"sample rate {rate} Hz is outside the {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz "
            f"that ecdc accepts"
        )
    return int(rate)


def check_finite(wav: np.ndarray, rate: int, offset: int = 0) -> None:
    """Refuse audio with NaN or infinite samples, saying where the first one is.

    ``offset`` is the position of ``wav``'s first sample in the whole input (for blocks).
    """
    finite = np.isfinite(wav)
    if finite.all():
        return
    channel, index = np.argwhere(~finite)[0]
    at = (offset + int(index)) / rate if rate > 0 else 0.0
    raise AudioError(
        f"audio contains NaN or infinite samples (first at {at:.3f} s, channel {int(channel) + 1}); "
        f"fix the input, ecdc does not guess what they should be"
    )


def wav_truncation(head: bytes, size: int) -> str | None:
    """Why a RIFF/WAVE file of ``size`` bytes starting with ``head`` is truncated, or None.

    Only the header's promise is checked: the "data" chunk must hold as many whole
    sample frames as its size field says.  Unknown sizes (0, 0xFFFFFFFF) and files whose
    data chunk starts beyond ``head`` are not judged.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    block_align = 0
    while pos + 8 <= len(head):
        cid = head[pos:pos + 4]
        (csize,) = struct.unpack_from("<I", head, pos + 4)
        body = pos + 8
        if cid == b"fmt " and body + 14 <= len(head):
            (block_align,) = struct.unpack_from("<H", head, body + 12)
        elif cid == b"data":
            if csize in (0, 0xFFFFFFFF) or block_align <= 0:
                return None
            promised = csize // block_align
            present = max(size - body, 0) // block_align
            if present < promised:
                return (f"truncated WAV file: its header promises {promised} sample frames but only "
                        f"{present} are present")
            return None
        pos = body + csize + (csize & 1)
    return None


def write_audio(target: PathOrFile, wav: np.ndarray, sample_rate: int,
                subtype: str = "PCM_16", format: str = "WAV") -> None:
    """Write ``[C, T]`` audio; integer formats are clipped so loud peaks saturate, not wrap."""
    out = np.asarray(wav, dtype=np.float32)
    if subtype.startswith("PCM"):
        # libsndfile converts float to int without clipping; NaN would become full scale.
        out = np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, _PCM16_MAX)
    try:
        soundfile.write(target, out.T, sample_rate, subtype=subtype, format=format)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot write audio: {first_line(exc)}") from None


def resample(wav: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """High-quality resampling of ``[C, T]`` audio (libsoxr)."""
    if rate_in == rate_out or wav.shape[-1] == 0:
        return wav
    if rate_in <= 0 or rate_out <= 0:
        raise AudioError(f"invalid sample rate {rate_in} -> {rate_out}")
    out = soxr.resample(np.ascontiguousarray(wav.T), rate_in, rate_out, quality="HQ")
    return np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(-1, wav.shape[0]).T)


def fit_length(wav: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad ``[C, T]`` audio to exactly ``length`` samples."""
    if wav.shape[-1] >= length:
        return wav[..., :length]
    return np.pad(wav, [(0, 0)] * (wav.ndim - 1) + [(0, length - wav.shape[-1])])


def to_channels(wav: np.ndarray, channels: int) -> np.ndarray:
    """Mix or spread ``[C, T]`` audio to ``channels`` channels.

    Down to mono: the mean of all channels (as the reference does). Down to stereo from
    more than two: even-numbered channels feed the left, odd ones the right. Up: existing
    channels are repeated in turn (mono becomes identical left and right).
    """
    have = wav.shape[0]
    if channels < 1:
        raise AudioError(f"invalid channel count {channels}")
    if have == channels:
        return wav
    if channels == 1:
        return wav.mean(axis=0, keepdims=True)
    if have > channels:
        groups = [wav[i::channels].mean(axis=0) for i in range(channels)]
        return np.stack(groups).astype(np.float32)
    return np.ascontiguousarray(wav[np.arange(channels) % have])


# -- internals ----------------------------------------------------------------------


class _open_input:
    """Open a path for decoding: a regular file as is, a pipe or device read whole.

    A pipe or device is sniffed (:func:`check_audio_head`), and held to
    :data:`MAX_BUFFERED_INPUT` unless it is a WAV (whose samples the caller asked for
    in memory anyway).
    """

    def __init__(self, path: str | bytes | os.PathLike) -> None:
        self._path = path
        self._file: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        st = check_input_path(self._path)
        try:
            f = open(self._path, "rb")  # a FIFO blocks here until a writer opens it, like cat
        except OSError as exc:
            raise input_error(exc) from None
        if stat.S_ISREG(st.st_mode):
            self._file = f
            return f
        with f:
            try:
                head = read_upto(f, 12)
            except OSError as exc:
                raise AudioError(f"cannot read: {exc.strerror or exc}") from None
            if not head:
                raise AudioError("empty input (the pipe or device gave no data)")
            self._file = buffer_stream(f, head, None if is_wav_head(head) else MAX_BUFFERED_INPUT)
        return self._file

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def read_upto(stream: BinaryIO, n: int) -> bytes:
    """``n`` bytes, fewer only at the end of the stream (a pipe may give less per read)."""
    parts = []
    got = 0
    while got < n:
        piece = stream.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


# Magic numbers from libsndfile's guess_file_type (sndfile.c): whole 4-byte words at the start...
_MAGIC_WORDS = frozenset({b".snd", b"dns.", b"fap ", b" paf", b"NIST", b"riff", b"PVF1", b"OggS", b"fLaC",
                          b"2BIT", b"LM89", b"53\x00\x00"})
# ... the first 8 or 12 bytes ...
_MAGIC_PREFIXES = (b"Creative", b"MATLAB 5", b"Extended Ins", b"ALawSoundFil", b"DiamondWare ",
                   b"\x00\x00\x03\xe8\x00\x00\x00\x01\x00\x00\x00\x01",
                   b"\x00\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00", b"ID3")
# ... and the first word with the third (e.g. RIFF....WAVE).
_MAGIC_PAIRS = frozenset({(b"RIFF", b"WAVE"), (b"RIFX", b"WAVE"), (b"RF64", b"WAVE"), (b"FORM", b"AIFF"),
                          (b"FORM", b"AIFC"), (b"FORM", b"8SVX"), (b"FORM", b"16SV"), (b"caff", b"desc"),
                          (b"CAT ", b"REX2")})


def _could_be_audio(head: bytes) -> bool:
    """Whether 12 bytes pass one of libsndfile's format tests (the rest of the file decides)."""
    b = head[:12]
    if b[:4] in _MAGIC_WORDS or b.startswith(_MAGIC_PREFIXES) or (b[:4], b[8:12]) in _MAGIC_PAIRS:
        return True
    return (
        (b[0] == 0x64 and b[1] == 0xA3 and b[2] & 0xF8 == 0 and b[3] == 0)  # IRCAM
        or (b[0] == 0 and b[1] & 0xF8 == 0 and b[2] == 0xA3 and b[3] == 0x64)  # IRCAM
        or (b[0] == 0xF0 and b[1] == 0x7E and b[2] & 0x80 == 0 and b[3] == 0x01)  # SDS
        or (b[0] == 0x01 and b[1] == 0x04)  # MPC 2000
        or b[8:12] == b"\x00\x02\x00\x00"  # HTK (libsndfile checks its length too)
        or (b[0] == 0xFF and b[1] & 0xE0 == 0xE0)  # an MPEG audio frame (MP3)
    )


def _decode(f: BinaryIO) -> tuple[np.ndarray, int]:
    problem = _truncation_of(f)
    if problem:
        warnings.warn(f"{problem}; converting what is there", TruncatedAudioWarning, stacklevel=3)
    try:
        data, rate = soundfile.read(f, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot read audio: {_soundfile_reason(exc)}") from None
    except OSError as exc:
        raise AudioError(f"cannot read: {exc.strerror or exc}") from None
    rate = check_sample_rate(rate)
    wav = np.ascontiguousarray(data.T)
    check_finite(wav, rate)
    return wav, rate


def _truncation_of(f: BinaryIO) -> str | None:
    """wav_truncation for a seekable file object, leaving its position unchanged."""
    try:
        if not f.seekable():
            return None
        start = f.tell()
        size = f.seek(0, io.SEEK_END)
        f.seek(start)
        head = f.read(_WAV_HEAD)
        f.seek(start)
    except (AttributeError, OSError, ValueError):
        return None
    if not isinstance(head, (bytes, bytearray)):
        return None
    return wav_truncation(bytes(head), size - start)


def _soundfile_reason(exc: BaseException) -> str:
    """libsndfile's reason without its "Error opening <file object ...>: " preamble."""
    reason = getattr(exc, "error_string", None)
    if isinstance(reason, str) and reason.strip():
        return first_line(Exception(reason)).rstrip(".")
    return first_line(exc)

