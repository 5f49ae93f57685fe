"""Bad and unusual audio input at the ecdc.audio level: each case converts or is one AudioError.

docs/ROBUSTNESS.md lists these cases and points here.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ecdc import audio
from ecdc.errors import AudioError, EcdcError

from conftest import run_as_nobody


def sine(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]).astype(np.float32)


def write(path: Path, wav: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str | None = None) -> Path:
    soundfile.write(str(path), wav.T, rate, subtype=subtype, format=fmt)
    return path


def one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, EcdcError) and "\n" not in msg and msg
    for needle in needles:
        assert needle.lower() in msg.lower(), msg
    return msg


# --------------------------------------------------------------------------- empty and tiny


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError) as info:
        audio.read_audio(path)
    one_line_error(info, "empty")
    with pytest.raises(AudioError) as info:
        audio.read_audio_bytes(b"")
    one_line_error(info, "empty")


@pytest.mark.parametrize("channels", [1, 2])
def test_zero_length_wav_reads_as_zero_samples(tmp_path: Path, channels: int) -> None:
    path = write(tmp_path / "zero.wav", np.zeros((channels, 0), np.float32), 44100)
    wav, rate = audio.read_audio(path)
    assert wav.shape == (channels, 0) and wav.dtype == np.float32 and rate == 44100
    assert audio.resample(wav, 44100, 24000).shape == (channels, 0)
    assert audio.to_channels(wav, 1).shape == (1, 0)
    out = tmp_path / "out.wav"
    audio.write_audio(out, wav, 24000)
    assert soundfile.info(str(out)).frames == 0


@pytest.mark.parametrize("n", [1, 3, 100, 319])
def test_shorter_than_one_frame(tmp_path: Path, n: int) -> None:
    src = sine(440, 48000, 1)[:, :n]
    wav, rate = audio.read_audio(write(tmp_path / "short.wav", src, 48000, "FLOAT"))
    np.testing.assert_array_equal(wav, src)
    out = audio.resample(wav, 48000, 24000)
    assert out.shape[0] == 1 and n // 2 <= out.shape[1] <= -(-n // 2)


# --------------------------------------------------------------------------- sample values


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_with_their_position(tmp_path: Path, bad: float) -> None:
    src = sine(440, 8000, 1, channels=2)
    src[1, 4000] = bad
    path = write(tmp_path / "nan.wav", src, 8000, "FLOAT")
    with pytest.raises(AudioError) as info:
        audio.read_audio(path)
    one_line_error(info, "NaN or infinite", "0.500 s", "channel 2")


def test_check_finite_counts_from_the_block_offset() -> None:
    block = np.zeros((1, 100), np.float32)
    block[0, 10] = np.nan
    with pytest.raises(AudioError, match=r"first at 2\.010 s"):
        audio.check_finite(block, 1000, offset=2000)
    audio.check_finite(np.zeros((2, 5), np.float32), 1000)


@pytest.mark.parametrize("subtype, step", [
    ("PCM_U8", 1 / 128), ("PCM_16", 1 / 32768), ("PCM_24", 1 / 2**23), ("PCM_32", 1 / 2**31),
    ("FLOAT", 0.0), ("DOUBLE", 0.0),
])
def test_sample_formats_convert_exactly(tmp_path: Path, subtype: str, step: float) -> None:
    src = np.array([[0.0, 0.25, -0.25, 0.5, -1.0, 0.999, -0.5]], np.float32)
    wav, rate = audio.read_audio(write(tmp_path / f"{subtype}.wav", src, 16000, subtype))
    assert wav.dtype == np.float32 and wav.shape == src.shape and rate == 16000
    np.testing.assert_allclose(wav, src, atol=step + 1e-7)


def test_many_channels_keep_their_order_and_mix_down(tmp_path: Path) -> None:
    levels = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32)
    src = np.repeat(levels[:, None], 50, axis=1)
    wav, _ = audio.read_audio(write(tmp_path / "six.wav", src, 48000, "FLOAT"))
    np.testing.assert_array_equal(wav, src)
    np.testing.assert_allclose(audio.to_channels(wav, 1)[:, 0], [levels.mean()])
    # Down to stereo: even channels feed the left, odd ones the right.
    np.testing.assert_allclose(audio.to_channels(wav, 2)[:, 0], [0.3, 0.4], rtol=1e-6)
    assert audio.to_channels(wav, 2).dtype == np.float32


def test_to_channels_up_and_invalid() -> None:
    mono = np.arange(4, dtype=np.float32)[None]
    np.testing.assert_array_equal(audio.to_channels(mono, 2), np.vstack([mono, mono]))
    three = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(audio.to_channels(three, 4), three[[0, 1, 2, 0]])
    with pytest.raises(AudioError):
        audio.to_channels(mono, 0)


# --------------------------------------------------------------------------- sample rates


@pytest.mark.parametrize("rate", [1000, 4000, 8000, 192000, 384000])
@pytest.mark.parametrize("target", [24000, 48000])
def test_extreme_sample_rates_resample_correctly(tmp_path: Path, rate: int, target: int) -> None:
    freq = 100.0 if rate <= 1000 else 440.0
    src = sine(freq, rate, 0.5)
    wav, got_rate = audio.read_audio(write(tmp_path / "in.wav", src, rate, "FLOAT"))
    assert got_rate == rate
    out = audio.resample(wav, rate, target)
    n = src.shape[1] * target / rate
    assert out.dtype == np.float32 and out.shape[0] == 1 and int(n) <= out.shape[1] <= int(n) + 1
    # The tone survives at the same frequency and level (edges aside).
    ideal = sine(freq, target, out.shape[1] / target)[:, :out.shape[1]]
    mid = slice(out.shape[1] // 8, -out.shape[1] // 8)
    np.testing.assert_allclose(out[0, mid], ideal[0, mid], atol=0.01)


@pytest.mark.parametrize("rate", [1, 500, 999, 1_000_001, 2_000_000])
def test_sample_rates_out_of_range_are_refused(tmp_path: Path, rate: int) -> None:
    path = write(tmp_path / "odd.wav", np.zeros((1, 100), np.float32), rate)
    with pytest.raises(AudioError) as info:
        audio.read_audio(path)
    one_line_error(info, f"{rate} Hz", "1000..1000000")


def test_resample_rejects_nonsense_rates() -> None:
    with pytest.raises(AudioError):
        audio.resample(np.zeros((1, 10), np.float32), 0, 24000)


# --------------------------------------------------------------------------- what the path is


def test_directory_given_as_a_file(tmp_path: Path) -> None:
    (tmp_path / "dir.wav").mkdir()
    with pytest.raises(AudioError) as info:
        audio.read_audio(tmp_path / "dir.wav")
    one_line_error(info, "directory")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError) as info:
        audio.read_audio(str(tmp_path / "nope.wav"))
    one_line_error(info, "no such file")


def _fifo(tmp_path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this platform")
    path = tmp_path / "pipe.wav"
    os.mkfifo(path)
    return path


def test_named_pipe_is_read_whole(tmp_path: Path) -> None:
    src = sine(440, 16000, 0.3, channels=2)
    buf = io.BytesIO()
    soundfile.write(buf, src.T, 16000, subtype="FLOAT", format="WAV")
    path = _fifo(tmp_path)

    def writer() -> None:
        with open(path, "wb") as f:
            f.write(buf.getvalue())

    t = threading.Thread(target=writer)
    t.start()
    try:
        wav, rate = audio.read_audio(path)
    finally:
        t.join(timeout=10)
    assert rate == 16000
    np.testing.assert_array_equal(wav, src)


def test_named_pipe_with_no_data(tmp_path: Path) -> None:
    path = _fifo(tmp_path)
    t = threading.Thread(target=lambda: open(path, "wb").close())
    t.start()
    try:
        with pytest.raises(AudioError) as info:
            audio.read_audio(path)
    finally:
        t.join(timeout=10)
    one_line_error(info, "empty")


def _read_as_nobody(path: Path) -> str:
    """read_audio(path) as an unprivileged user; its outcome as text."""

    def read() -> str:
        audio.read_audio(path)
        return "ok"

    return run_as_nobody(read)


def test_unreadable_file() -> None:
    # Root reads any file whatever its mode, so as root the check runs in a child that
    # has dropped to "nobody"; otherwise chmod 000 is enough.
    base = Path(tempfile.mkdtemp(prefix="ecdc-perm-"))
    try:
        base.chmod(0o755)
        path = write(base / "secret.wav", np.zeros((1, 10), np.float32), 8000)
        path.chmod(0o000)
        if os.geteuid() != 0:
            with pytest.raises(AudioError) as info:
                audio.read_audio(path)
            one_line_error(info, "permission denied")
            return
        assert _read_as_nobody(path) == "AudioError: permission denied"
        # A directory nobody may enter gives the same one-line answer.
        base.chmod(0o700)
        path.chmod(0o644)
        assert _read_as_nobody(path) == "AudioError: permission denied"
    finally:
        base.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- damaged and misnamed


def test_truncated_wav_converts_what_is_there_with_a_warning(tmp_path: Path) -> None:
    # As libsndfile and the CLI's streaming reader (test_pipes.py::test_reader_truncation) do.
    src = sine(440, 8000, 1)
    path = write(tmp_path / "full.wav", src, 8000)
    data = path.read_bytes()
    short = tmp_path / "short.wav"
    short.write_bytes(data[:len(data) - 1000])
    with pytest.warns(audio.TruncatedAudioWarning) as record:
        wav, rate = audio.read_audio(short)
    assert wav.shape == (1, 7500) and rate == 8000
    np.testing.assert_allclose(wav, src[:, :7500], atol=1 / 32768)
    (warning,) = record
    msg = str(warning.message)
    assert "\n" not in msg and "promises 8000" in msg and "only 7500" in msg
    with pytest.warns(audio.TruncatedAudioWarning):
        assert audio.read_audio_bytes(data[:len(data) - 1000])[0].shape == (1, 7500)
    # Even a partial last sample frame counts; extra bytes after the data do not.
    short.write_bytes(data[:-1])
    with pytest.warns(audio.TruncatedAudioWarning, match="7999 are present"):
        audio.read_audio(short)
    short.write_bytes(data + b"\x00" * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert audio.read_audio(short)[0].shape == (1, 8000)


def test_streaming_wav_with_unknown_sizes_is_read(tmp_path: Path) -> None:
    src = sine(440, 8000, 0.25)
    path = write(tmp_path / "stream.wav", src, 8000)
    data = bytearray(path.read_bytes())
    data_at = data.index(b"data")
    for placeholder in (0xFFFFFFFF,):
        struct.pack_into("<I", data, 4, placeholder)
        struct.pack_into("<I", data, data_at + 4, placeholder)
        wav, _ = audio.read_audio_bytes(bytes(data))
        assert wav.shape == src.shape


def test_wav_truncation_walks_other_chunks() -> None:
    fmt = struct.pack("<HHIIHH", 1, 2, 8000, 32000, 4, 16)
    def wav(data_size: int, present: int, extra: bytes = b"") -> bytes:
        return (b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                + extra + b"data" + struct.pack("<I", data_size) + bytes(present))
    odd = b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # odd size: padded to even
    for extra in (b"", odd):
        assert audio.wav_truncation(wav(400, 400, extra), len(wav(400, 400, extra))) is None
        bad = wav(400, 396, extra)
        assert "99 are present" in audio.wav_truncation(bad, len(bad))
        assert audio.wav_truncation(wav(0xFFFFFFFF, 10, extra), 100) is None
    assert audio.wav_truncation(b"fLaC" + bytes(100), 104) is None
    assert audio.wav_truncation(b"RIFF\x00\x00\x00\x00WAVE" + b"junk" + struct.pack("<I", 10**6), 30) is None


@pytest.mark.parametrize("name, fmt, subtype", [
    ("actually_wav.mp3", "WAV", "PCM_16"),
    ("actually_wav.flac", "WAV", "PCM_16"),
    ("actually_flac.wav", "FLAC", "PCM_16"),
    ("no_extension", "WAV", "PCM_16"),
])
def test_wrong_extension_is_read_by_content(tmp_path: Path, name: str, fmt: str, subtype: str) -> None:
    src = sine(440, 16000, 0.2)
    buf = io.BytesIO()
    soundfile.write(buf, src.T, 16000, subtype=subtype, format=fmt)
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    wav, rate = audio.read_audio(path)
    assert rate == 16000
    np.testing.assert_allclose(wav, src, atol=1 / 32768 + 1e-7)


@pytest.mark.parametrize("payload", [b"this is not audio\n" * 20, b"RIFF\x10\x00\x00\x00WAVEjunk", bytes(300)])
def test_not_audio(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "fake.wav"
    path.write_bytes(payload)
    with pytest.raises(AudioError) as info:
        audio.read_audio(path)
    one_line_error(info, "cannot read audio")


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32"])
def test_write_audio_saturates_and_never_wraps(tmp_path: Path, subtype: str) -> None:
    loud = np.array([[2.0, -2.0, 1.0, -1.0, 1e9, -1e9, np.inf, -np.inf, np.nan, 0.5]], np.float32)
    out = tmp_path / "loud.wav"
    audio.write_audio(out, loud, 8000, subtype=subtype)
    got = soundfile.read(str(out), dtype="float64", always_2d=True)[0][:, 0]
    assert (got[[0, 2, 4, 6]] >= 0.99).all()  # positive full scale, not wrapped to negative
    assert (got[[1, 3, 5, 7]] == -1.0).all()
    assert got[8] == 0.0  # NaN is written as silence
    assert abs(got[9] - 0.5) < 1 / 64


def test_write_audio_float_keeps_values(tmp_path: Path) -> None:
    src = np.array([[2.0, -3.0, 0.25]], np.float32)
    out = tmp_path / "float.wav"
    audio.write_audio(out, src, 8000, subtype="FLOAT")
    np.testing.assert_array_equal(soundfile.read(str(out), dtype="float32", always_2d=True)[0].T, src)


def test_write_audio_errors_are_audio_errors(tmp_path: Path) -> None:
    with pytest.raises(AudioError):
        audio.write_audio(tmp_path / "x.wav", np.zeros((1, 10), np.float32), 8000, subtype="NOPE")
    with pytest.raises(AudioError):
        audio.write_audio(tmp_path / "missing_dir" / "x.wav", np.zeros((1, 10), np.float32), 8000)


def test_file_objects_are_read_too() -> None:
    src = sine(440, 8000, 0.1)
    buf = io.BytesIO()
    soundfile.write(buf, src.T, 8000, subtype="FLOAT", format="WAV")
    buf.seek(0)
    wav, rate = audio.read_audio(buf)
    np.testing.assert_array_equal(wav, src)
