"""Audio I/O, resampling and channel layout; numpy only, no torch.

Audio is handled as float32 arrays shaped ``[channels, samples]``. Reading goes through
soundfile (wav, flac, ogg/opus, ...), resampling through libsoxr, so neither torchaudio
nor ffmpeg is needed.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Tuple, Union

import numpy as np
import soundfile
import soxr

from .errors import AudioError

PathOrFile = Union[str, os.PathLike, BinaryIO]

#: Largest PCM_16 value as a float, so clipping never wraps around to the other sign.
_PCM16_MAX = 32767 / 32768


def read_audio(source: PathOrFile) -> Tuple[np.ndarray, int]:
    """Read any file soundfile can decode; return (``[C, T]`` float32, sample rate)."""
    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot read audio: {_first_line(exc)}") from None
    except IsADirectoryError:
        raise AudioError("is a directory, not an audio file") from None
    except FileNotFoundError:
        raise AudioError("no such file") from None
    except PermissionError:
        raise AudioError("permission denied") from None
    wav = np.ascontiguousarray(data.T)
    if not np.isfinite(wav).all():
        raise AudioError("audio contains NaN or infinite samples")
    return wav, int(rate)


def read_audio_bytes(data: bytes) -> Tuple[np.ndarray, int]:
    """Decode an in-memory audio file (stdin is read whole when it is not seekable)."""
    if not data:
        raise AudioError("empty input")
    return read_audio(io.BytesIO(data))


def write_audio(target: PathOrFile, wav: np.ndarray, sample_rate: int,
                subtype: str = "PCM_16", format: str = "WAV") -> None:
    """Write ``[C, T]`` audio; integer formats are clipped so loud peaks saturate, not wrap."""
    out = np.asarray(wav, dtype=np.float32)
    if subtype.startswith("PCM"):
        out = np.clip(out, -1.0, _PCM16_MAX)
    try:
        soundfile.write(target, out.T, sample_rate, subtype=subtype, format=format)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot write audio: {_first_line(exc)}") from None


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
