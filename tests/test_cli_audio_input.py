"""Unusual audio given to ``ecdc compress``: each is converted correctly or refused in one line.

test_robust_audio.py checks these rules on ``ecdc.audio.read_audio``; the command line reads
through the streaming reader of ``ecdc/wavstream.py``, so the same cases are run here end to
end: compress, then decompress, and compare with what went in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from ecdc.cli import main

from conftest import run_as_nobody, test_signal


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def round_trip(src: Path, ckpt: Path) -> tuple[np.ndarray, int]:
    """compress + decompress through the CLI; the decoded audio [T, C] and its rate."""
    result = run("compress", "-q", "--checkpoint", ckpt, "-o", src.with_name("x.ecdc"), src)
    assert result.exit_code == 0, result.output
    result = run("decompress", "-q", "--checkpoint", ckpt, "-o", src.with_name("x_out.wav"),
                 src.with_name("x.ecdc"))
    assert result.exit_code == 0, result.output
    wav, rate = soundfile.read(str(src.with_name("x_out.wav")), dtype="float32", always_2d=True)
    return wav, rate


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecdc: error: "), lines
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def test_zero_length_audio_round_trips_to_zero_samples(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = tmp_path / "silent.wav"
    soundfile.write(str(src), np.zeros((0, 2), dtype=np.float32), 44100, subtype="PCM_16")
    wav, rate = round_trip(src, tiny_mono_ckpt)
    assert wav.shape == (0, 1) and rate == 44100  # the mono model's one coded channel


@pytest.mark.parametrize("frames", [1, 100, 319])
def test_shorter_than_one_frame_keeps_its_length(tmp_path: Path, tiny_mono_ckpt: Path, frames: int) -> None:
    src = tmp_path / "blip.wav"
    soundfile.write(str(src), test_signal(1.0, 24000)[:, :frames].T, 24000, subtype="PCM_16")
    wav, rate = round_trip(src, tiny_mono_ckpt)
    assert wav.shape == (frames, 1) and rate == 24000


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_with_their_position(tmp_path: Path, tiny_mono_ckpt: Path, bad: float) -> None:
    sig = test_signal(2.0, 16000, channels=2).T.copy()
    sig[24000, 1] = bad  # 1.5 s into the second channel
    src = tmp_path / "bad.wav"
    soundfile.write(str(src), sig, 16000, subtype="FLOAT")
    one_line_error(run("compress", "-q", "--checkpoint", tiny_mono_ckpt, src), "NaN or infinite", "1.500 s")
    assert not src.with_suffix(".ecdc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav"]


def test_more_than_two_channels_come_back_with_their_count(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    sig = np.concatenate([test_signal(1.0, 24000, channels=2, seed=s) for s in range(3)])[:5]
    src = tmp_path / "surround.wav"
    soundfile.write(str(src), sig.T, 24000, subtype="PCM_24")
    wav, rate = round_trip(src, tiny_mono_ckpt)
    # A mono model codes the (BS.775) mix, and that one channel is what comes back: five
    # copies of it would be channels that were never coded (tests/test_multichannel.py).
    assert wav.shape == (24000, 1) and rate == 24000


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_sample_formats(tmp_path: Path, tiny_mono_ckpt: Path, subtype: str) -> None:
    src = tmp_path / "fmt.wav"
    soundfile.write(str(src), test_signal(0.5, 24000).T, 24000, subtype=subtype)
    wav, rate = round_trip(src, tiny_mono_ckpt)
    assert wav.shape == (12000, 1) and rate == 24000 and np.isfinite(wav).all()


@pytest.mark.parametrize("rate", [1000, 8000, 192000, 384000])
def test_very_low_and_high_rates_come_back_at_their_rate(tmp_path: Path, tiny_mono_ckpt: Path, rate: int) -> None:
    src = tmp_path / "rate.wav"
    n = rate // 2 + 7
    soundfile.write(str(src), test_signal(1.0, rate)[:, :n].T, rate, subtype="PCM_16")
    wav, out_rate = round_trip(src, tiny_mono_ckpt)
    assert out_rate == rate and wav.shape == (n, 1)


def test_rate_out_of_range_is_refused(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = tmp_path / "slow.wav"
    soundfile.write(str(src), np.zeros((500, 1), dtype=np.float32), 500, subtype="PCM_16")
    one_line_error(run("compress", "-q", "--checkpoint", tiny_mono_ckpt, src), "500 Hz", "outside")


@pytest.mark.parametrize("name,fmt,subtype", [("song.mp3", "WAV", "PCM_16"), ("speech.wav", "FLAC", "PCM_16"),
                                               ("noext", "OGG", "VORBIS")])
def test_wrong_or_no_extension_is_read_by_content(tmp_path: Path, tiny_mono_ckpt: Path, name: str, fmt: str,
                                                  subtype: str) -> None:
    src = tmp_path / name
    soundfile.write(str(src), test_signal(0.6, 24000).T, 24000, format=fmt, subtype=subtype)
    wav, rate = round_trip(src, tiny_mono_ckpt)
    assert rate == 24000 and wav.shape == (14400, 1)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to switch to an unprivileged user (root ignores file modes)")
def test_unreadable_input_as_an_unprivileged_user(tiny_mono_ckpt: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="ecdc-perm-"))
    try:
        os.chmod(folder, 0o777)
        src = folder / "secret.wav"
        soundfile.write(str(src), test_signal(0.5, 24000).T, 24000, subtype="PCM_16")
        os.chmod(src, 0o000)

        def compress() -> str:
            result = CliRunner().invoke(main, ["compress", "-q", "--checkpoint", str(tiny_mono_ckpt), str(src)])
            return f"{result.exit_code}\n{result.output}"

        code, output = run_as_nobody(compress).split("\n", 1)
        assert code == "1" and output.strip() == f"ecdc: error: {src}: permission denied"
        assert sorted(p.name for p in folder.iterdir()) == ["secret.wav"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
