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

import functools
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

from .container import MAX_ORIGINAL_CHANNELS, EcdcHeader
from .errors import AudioError
from .messages import first_line, unreadable_format_text

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

#: Added to "not recognised" errors: headerless PCM has no header to recognise.
RAW_HINT = "; if it is headerless PCM, say so with --raw (and --raw-rate, --raw-channels, --raw-format)"

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
    A format libsndfile cannot decode (m4a, wma, ...: :func:`unreadable_format`) is named,
    with the ffmpeg pipe that converts it.
    """
    named = unreadable_format(head)
    if named:
        raise AudioError(unreadable_format_text(named, None))
    if len(head) >= SNIFF_BYTES and not _could_be_audio(head):
        raise AudioError("cannot read audio: Format not recognised (its first bytes begin no "
                         f"audio format ecdc reads){RAW_HINT}")


#: Bytes of an input's start that :func:`unreadable_format` looks at (FLAC's STREAMINFO ends at 42).
FORMAT_HEAD_BYTES = 64

# The ASF header object's GUID, which every .wma / .wmv file starts with.
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
# Magic words at the start of formats libsndfile has no decoder for.
_FOREIGN_MAGIC = ((b"\x1aE\xdf\xa3", "Matroska/WebM audio (.mka, .webm)"), (b"MAC ", "Monkey's Audio (.ape)"),
                  (b"wvpk", "WavPack (.wv)"), (b"TTA1", "TTA (.tta)"), (b"#!AMR", "AMR (.amr)"),
                  (b"ADIF", "AAC (.aac, ADIF)"), (b"DSD ", "DSD audio (.dsf)"), (b"FRM8", "DSD audio (.dff)"),
                  (_ASF_GUID, "Windows Media (.wma, ASF)"))


def unreadable_format(head: bytes) -> str | None:
    """The name of the format ``head`` (an input's first bytes) begins, when it is one this
    libsndfile cannot decode (m4a, wma, ...), so that the error can say what the file is and
    how to convert it; None for anything else (libsndfile's own error then stands).

    Also a FLAC stream whose STREAMINFO says 0 samples (unknown, as ffmpeg writes FLAC to a
    pipe): libsndfile opens it but fails on the first read ("Internal psf_fseek() failed"),
    seekable or not. MP3 only when this libsndfile was built without it.
    """
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B ", b"M4P "):
            return "MPEG-4 audio (.m4a: AAC or ALAC)"
        return "a QuickTime movie (.mov)" if brand == b"qt  " else "an MPEG-4 file (.mp4, .m4a: AAC)"
    for magic, name in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return name
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "AAC (.aac, ADTS)"  # the MPEG sync word with layer 0, which MPEG audio never has
    # STREAMINFO comes first: 34 bytes, a sample rate (20 bits from byte 18), then a 36-bit sample count.
    if head[:4] == b"fLaC" and len(head) >= 26 and head[4] & 0x7F == 0 and head[5:8] == b"\x00\x00\x22":
        rate = head[18] << 12 | head[19] << 4 | head[20] >> 4
        if rate and head[21] & 0x0F == 0 and not any(head[22:26]):
            return "FLAC with an unknown length (STREAMINFO says 0 samples, as ffmpeg writes FLAC to a pipe)"
    if "MP3" not in soundfile.available_formats() and (
            head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)):
        return "MP3 (this libsndfile was built without it)"
    return None


def unreadable_error(source: object, reason: str) -> AudioError:
    """The error for audio libsndfile refused (opening it, or reading it) with ``reason``:
    it names the format where the input's first bytes tell one libsndfile cannot decode
    (:func:`unreadable_format`). ``source`` is a path or a seekable file object."""
    head = _head_of(source)
    named = unreadable_format(head) if head else None
    if named:
        path = source if isinstance(source, str) else getattr(source, "name", None)
        return AudioError(unreadable_format_text(named, path if isinstance(path, str) else None))
    return AudioError(f"cannot read audio: {reason}")


def _head_of(source: object) -> bytes:
    """The first :data:`FORMAT_HEAD_BYTES` of a path or seekable file object (b"" if unreadable)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(FORMAT_HEAD_BYTES)
        if isinstance(source, io.IOBase) and source.seekable():
            at = source.tell()
            source.seek(0)
            head = source.read(FORMAT_HEAD_BYTES)
            source.seek(at)
            return head if isinstance(head, bytes) else b""
    except (OSError, ValueError):
        pass
    return b""


def buffer_stream(stream: BinaryIO, head: bytes = b"", limit: int | None = MAX_BUFFERED_INPUT) -> io.BytesIO:
    """All of a pipe or device (after ``head``, already read from it) in memory, for
    libsndfile to seek in; its format is sniffed first (:func:`check_audio_head`).

    More than ``limit`` bytes (None: no limit) is refused in one line saying what to do,
    rather than read without end.
    """
    buf = io.BytesIO()
    buf.write(head)
    try:
        if len(head) < FORMAT_HEAD_BYTES:
            buf.write(read_upto(stream, FORMAT_HEAD_BYTES - len(head)))
        check_audio_head(buf.getvalue()[:FORMAT_HEAD_BYTES])
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


# -- channel layout ---------------------------------------------------------------------
#
# A layout is the speaker of each channel, as WAVE_FORMAT_EXTENSIBLE speaker bits
# (``SPEAKER_FRONT_LEFT`` = 0x1, ...), 0 for a channel with no speaker assigned. A WAV
# channel mask lists the speakers of the channels in bit order; channels beyond its bits
# have none. Where the input does not say (no mask, a mask of 0, any format but WAV), the
# layout is ffmpeg's default for the channel count (av_channel_layout_default).

#: WAVE_FORMAT_EXTENSIBLE speaker bits, in the order channels take them, with ffmpeg's names.
SPEAKERS = ("FL", "FR", "FC", "LFE", "BL", "BR", "FLC", "FRC", "BC", "SL", "SR",
            "TC", "TFL", "TFC", "TFR", "TBL", "TBC", "TBR")
#: The speaker bits defined by Microsoft (0x1 .. 0x20000); a mask with others is not valid.
KNOWN_SPEAKER_BITS = (1 << len(SPEAKERS)) - 1
FL, FR, FC, LFE = 0x1, 0x2, 0x4, 0x8
#: ffmpeg's default layout for each channel count (mono, stereo, 2.1, 4.0, 5.0, 5.1, 6.1,
#: 7.1); other counts have no default, so their channels have no speakers.
DEFAULT_MASKS = {1: 0x4, 2: 0x3, 3: 0xB, 4: 0x107, 5: 0x37, 6: 0x3F, 7: 0x70F, 8: 0x63F}

_HALF_POWER = float(np.sqrt(0.5))  # -3 dB
# (left, right) gain of each speaker in a downmix to stereo: ITU-R BS.775 (centre and
# surrounds at -3 dB, LFE dropped), extended to the other speakers by their side: left or
# right ones at -3 dB to their side (front-of-centre ones at 0 dB, as front left and
# right), ones on the centre line behind or above at -3 dB split -3 dB to each side
# (-6 dB), and a channel with no speaker like the centre.
_STEREO_GAINS = {
    "FL": (1.0, 0.0), "FR": (0.0, 1.0), "FC": (_HALF_POWER, _HALF_POWER), "LFE": (0.0, 0.0),
    "BL": (_HALF_POWER, 0.0), "BR": (0.0, _HALF_POWER), "FLC": (1.0, 0.0), "FRC": (0.0, 1.0),
    "BC": (0.5, 0.5), "SL": (_HALF_POWER, 0.0), "SR": (0.0, _HALF_POWER), "TC": (0.5, 0.5),
    "TFL": (_HALF_POWER, 0.0), "TFC": (0.5, 0.5), "TFR": (0.0, _HALF_POWER),
    "TBL": (_HALF_POWER, 0.0), "TBC": (0.5, 0.5), "TBR": (0.0, _HALF_POWER),
}
_NO_SPEAKER_GAINS = (_HALF_POWER, _HALF_POWER)

#: The format tag of a WAV 'fmt ' chunk that carries a channel mask (WAVE_FORMAT_EXTENSIBLE);
#: also what wavstream's reader and writer use.
WAVE_FORMAT_EXTENSIBLE = 0xFFFE


def default_channel_mask(channels: int) -> int:
    """ffmpeg's default speaker mask for ``channels`` channels; 0 where it has none."""
    return DEFAULT_MASKS.get(int(channels), 0)


def channel_layout(channels: int, mask: int | None = None) -> tuple[int, ...]:
    """The speaker bit of each of ``channels`` channels (0: none) that ``mask`` gives them.

    No mask (or 0) means the default for the count. Bits past the ``channels`` lowest set
    ones are ignored, and channels past the mask's bits get no speaker, as Microsoft says
    for WAVE_FORMAT_EXTENSIBLE.
    """
    mask = int(mask or 0) & KNOWN_SPEAKER_BITS or default_channel_mask(channels)
    bits = [1 << i for i in range(len(SPEAKERS)) if mask >> i & 1][:channels]
    return tuple(bits) + (0,) * (channels - len(bits))


def layout_mask(layout: tuple[int, ...]) -> int:
    """The channel mask that describes ``layout`` (the speakers of its leading assigned
    channels, which is all a mask can say); 0 if its first channel has none."""
    mask = 0
    for bit in layout:
        if not bit or bit <= mask:  # unassigned, or out of bit order: the mask ends here
            break
        mask |= bit
    return mask


def describe_layout(layout: tuple[int, ...]) -> str:
    """``FL+FR+FC+LFE+BL+BR`` (ffmpeg's speaker names; ``?`` for a channel with none)."""
    return "+".join(SPEAKERS[bit.bit_length() - 1] if bit else "?" for bit in layout)


def _stereo_gains(bit: int) -> tuple[float, float]:
    return _STEREO_GAINS[SPEAKERS[bit.bit_length() - 1]] if bit else _NO_SPEAKER_GAINS


@functools.lru_cache(maxsize=64)
def mix_matrix(src: tuple[int, ...], dst: tuple[int, ...]) -> np.ndarray:
    """The ``[len(dst), len(src)]`` gains that turn audio in layout ``src`` into ``dst``.

    * To stereo (from more than two channels): ITU-R BS.775, ``L = FL + 0.7071 FC +
      0.7071 BL`` (or SL) and ``R`` likewise for 5.1, LFE dropped; other speakers by
      ``_STEREO_GAINS``. Both rows are then divided by the larger row sum, so the mix of
      full-scale input never exceeds full scale (5.1: ``L = 0.4142 FL + 0.2929 FC +
      0.2929 BL``).
    * To mono (from more than one channel): the mean of that stereo mix (5.1: ``M =
      0.2071 (FL + FR) + 0.2929 FC + 0.1464 (BL + BR)``); from stereo, the mean of the two.
    * From mono: to the centre if ``dst`` has one, else to front left and right at full
      level (as mono to stereo always has), else to the first channel.
    * Otherwise speakers ``dst`` has are copied, unassigned channels go to unassigned
      channels in turn, LFE that ``dst`` lacks is dropped, and the rest fold into ``dst``'s
      front left/right by the stereo gains (into its centre if it has no front pair), all
      divided by the largest row sum if it is over 1. A channel of ``dst`` with no source
      is silent: a decoder never invents audio for a speaker.
    """
    matrix = np.zeros((len(dst), len(src)), dtype=np.float64)
    if len(dst) <= 2 and len(src) > len(dst):
        stereo = np.array([_stereo_gains(bit) for bit in src], dtype=np.float64).T
        stereo /= max(1.0, float(stereo.sum(axis=1).max()))
        return _frozen(stereo if len(dst) == 2 else stereo.mean(axis=0, keepdims=True))
    if len(src) == 1:
        if FC in dst:
            matrix[dst.index(FC), 0] = 1.0
        elif FL in dst and FR in dst:
            matrix[[dst.index(FL), dst.index(FR)], 0] = 1.0
        else:
            matrix[0, 0] = 1.0
        return _frozen(matrix)
    spare = [i for i, bit in enumerate(dst) if not bit]  # unassigned outputs, in order
    for j, bit in enumerate(src):
        if bit and bit in dst:
            matrix[dst.index(bit), j] = 1.0
        elif not bit and spare:
            matrix[spare.pop(0), j] = 1.0
        elif bit == LFE:
            continue
        elif FL in dst and FR in dst:
            left, right = _stereo_gains(bit)
            matrix[dst.index(FL), j] += left
            matrix[dst.index(FR), j] += right
        elif FC in dst:
            matrix[dst.index(FC), j] += sum(_stereo_gains(bit)) / 2
    matrix /= max(1.0, float(matrix.sum(axis=1).max(initial=0.0)))
    return _frozen(matrix)


def _frozen(matrix: np.ndarray) -> np.ndarray:
    """float32 and read-only: :func:`mix_matrix` hands the same cached array to every caller."""
    out = matrix.astype(np.float32)
    out.setflags(write=False)
    return out


def remix(wav: np.ndarray, src: tuple[int, ...], dst: tuple[int, ...]) -> np.ndarray:
    """``[C, T]`` audio in layout ``src`` as ``dst``'s channels (:func:`mix_matrix`).

    Between one and two channels this is :func:`to_channels` (the mean, or the copy),
    so mono and stereo convert exactly as they always have.
    """
    if len(src) <= 2 and len(dst) <= 2:
        return to_channels(wav, len(dst))
    if wav.shape[0] != len(src):
        raise AudioError(f"audio has {wav.shape[0]} channels, its layout {len(src)}")
    return np.ascontiguousarray(mix_matrix(src, dst) @ np.asarray(wav, dtype=np.float32))


def coded_layout(header: EcdcHeader) -> tuple[int, ...]:
    """The speakers of the channels a file codes: the input's where every input channel is
    coded (SEPARATE, two-channel DUAL, MONO, JOINT of as many channels as the model), else
    the default mono or stereo of the mix that was coded."""
    coded = header.channels * header.streams
    if coded == header.original_channels:
        return channel_layout(coded, header.channel_mask)
    return channel_layout(coded)


def decoded_layout(header: EcdcHeader, channels: int | None = None) -> tuple[int, ...]:
    """The speakers of the channels a decode writes.

    Without ``channels``: the coded channels, or the original count where it is fewer
    (mono coded as stereo by a stereo model decodes to mono), never more: channels that
    were not coded are not invented. The original layout applies where the count is the
    original's, also when ``channels`` asks for it (5.1 downmixed to mono, decoded with
    ``--channels 6``, is the mono mix in the centre channel of 5.1); any other
    ``channels`` gets the default layout of that count.
    """
    coded = header.channels * header.streams
    count = int(channels) if channels else min(header.original_channels, coded)
    if count == header.original_channels:
        return channel_layout(count, header.channel_mask)
    return channel_layout(count)


def wav_channel_mask(head: bytes) -> int | None:
    """The channel mask in the WAVE_FORMAT_EXTENSIBLE ``fmt `` chunk of a RIFF, RIFX or
    RF64 file starting with ``head``; None for another format, a plain ``fmt `` chunk, or
    a ``fmt `` chunk not within ``head`` (only ``head`` is parsed: bounded, no allocation
    from the sizes it claims)."""
    if not is_wav_head(head):
        return None
    endian = ">" if head[:4] == b"RIFX" else "<"
    pos = 12
    while pos + 8 <= len(head):
        cid = head[pos:pos + 4]
        (size,) = struct.unpack_from(endian + "I", head, pos + 4)
        body = pos + 8
        if cid == b"fmt ":
            return fmt_channel_mask(head[body:body + min(size, 40)], endian)
        if cid == b"data":
            return None
        pos = body + size + (size & 1)
    return None


def fmt_channel_mask(fmt: bytes, endian: str = "<") -> int | None:
    """The channel mask of a WAV ``fmt `` chunk's body if it is WAVE_FORMAT_EXTENSIBLE
    (None otherwise, or if too short to hold one)."""
    if len(fmt) < 24:
        return None
    (tag,) = struct.unpack_from(endian + "H", fmt)
    (extension,) = struct.unpack_from(endian + "H", fmt, 16)  # cbSize: 22 when the mask is there
    if tag != WAVE_FORMAT_EXTENSIBLE or extension < 22:
        return None
    (mask,) = struct.unpack_from(endian + "I", fmt, 20)
    return int(mask)


def read_channel_mask(source: str | os.PathLike | BinaryIO) -> int | None:
    """:func:`wav_channel_mask` of a file (a path, or a seekable file object, read from its
    start as libsndfile reads it, whose position is kept), reading at most its first 64 KiB;
    None where it cannot be read."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(_WAV_HEAD)
        else:
            start = source.tell()
            source.seek(0)
            head = source.read(_WAV_HEAD)
            source.seek(start)
    except (AttributeError, OSError, ValueError):
        return None
    return wav_channel_mask(head) if isinstance(head, bytes) else None


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

