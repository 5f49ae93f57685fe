"""The ``ecdc`` command line end to end, on tiny random-weight models (no downloads)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from ecdc.cli import main
from ecdc.codec import EncodedAudio, load_model

from conftest import test_signal


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ecdc: error:"), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


def leftovers(directory: Path):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_compress_info_decompress(tmp_path, wav_file, tiny_mono_ckpt):
    result = run("compress", wav_file, "--checkpoint", tiny_mono_ckpt, "-b", "3")
    assert result.exit_code == 0, result.stderr
    ecdc_path = wav_file.with_suffix(".ecdc")
    assert ecdc_path.is_file()

    info = run("info", ecdc_path)
    assert info.exit_code == 0, info.stderr
    assert "tiny_mono" in info.stdout
    assert "3 kbps (4 codebooks x 10 bits x 75 Hz)" in info.stdout
    assert "downmix (original 2)" in info.stdout
    assert "44100" in info.stdout

    out = tmp_path / "out.wav"
    result = run("decompress", ecdc_path, "-o", out, "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    data, rate = soundfile.read(str(out), always_2d=True)
    original, _ = soundfile.read(str(wav_file), always_2d=True)
    # The original rate, and the one coded channel: a stereo input downmixed for a mono model
    # decodes to mono (channels that were not coded are not invented).
    assert rate == 44100 and data.shape[1] == 1
    assert abs(data.shape[0] - original.shape[0]) <= 1
    assert soundfile.info(str(out)).subtype == "PCM_16"
    assert leftovers(tmp_path) == []


def test_payload_size_matches_bandwidth(tmp_path, tiny_mono_ckpt):
    wav = tmp_path / "ten.wav"
    soundfile.write(str(wav), test_signal(10.0, 24000).T, 24000)
    result = run("compress", wav, "--checkpoint", tiny_mono_ckpt, "-b", "6")
    assert result.exit_code == 0, result.stderr
    size = wav.with_suffix(".ecdc").stat().st_size
    payload = 750 * 10  # 6 kbps = 8 codebooks x 10 bits x 75 Hz = 750 bytes/s
    header = 8 + 56 + len("tiny_mono") + 4
    framing = 10 * (5 + 8 + 4) + (5 + 20 + 4)  # ten 1 s code chunks and the end chunk
    assert size == payload + header + framing


def test_stdin_to_stdout_round_trip(wav_file, tiny_mono_ckpt):
    compressed = run("compress", "-", "-o", "-", "--checkpoint", tiny_mono_ckpt, input=wav_file.read_bytes())
    assert compressed.exit_code == 0, compressed.stderr
    assert compressed.stdout_bytes[:4] == b"ECDC"
    decoded = run("decompress", "-", "-o", "-", "--checkpoint", tiny_mono_ckpt, input=compressed.stdout_bytes)
    assert decoded.exit_code == 0, decoded.stderr
    data, rate = soundfile.read(io.BytesIO(decoded.stdout_bytes), always_2d=True)
    assert rate == 44100 and data.shape[1] == 1  # the downmix that was coded


def test_dual_stereo_keeps_channels_apart(tmp_path, tiny_mono_ckpt):
    wav = tmp_path / "lr.wav"
    signal = test_signal(5.0, 24000, channels=2)
    signal[1] = 0.0  # right channel silent
    soundfile.write(str(wav), signal.T, 24000)
    down = run("compress", wav, "-o", tmp_path / "down.ecdc", "--checkpoint", tiny_mono_ckpt)
    dual = run("compress", wav, "-o", tmp_path / "dual.ecdc", "--checkpoint", tiny_mono_ckpt, "--stereo", "dual")
    assert down.exit_code == 0 and dual.exit_code == 0, (down.stderr, dual.stderr)
    down_size = (tmp_path / "down.ecdc").stat().st_size
    dual_size = (tmp_path / "dual.ecdc").stat().st_size
    assert 1.9 * down_size < dual_size < 2.0 * down_size  # twice the codes, the same framing
    assert "dual (original 2)" in run("info", tmp_path / "dual.ecdc").stdout
    encoded = EncodedAudio.from_bytes((tmp_path / "dual.ecdc").read_bytes())
    codes = np.concatenate([c.codes for c in encoded.chunks], axis=-1)
    assert codes.shape[0] == 2
    codec = load_model(str(tiny_mono_ckpt))
    pcm, _ = soundfile.read(str(wav), dtype="float32", always_2d=True)
    for channel in range(2):  # each stream is exactly that channel coded on its own
        alone = codec.encode(pcm[:, channel], 24000, bandwidth=6.0)
        assert np.array_equal(codes[channel], np.concatenate([c.codes[0] for c in alone.chunks], axis=-1))
    result = run("decompress", tmp_path / "dual.ecdc", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    data, _ = soundfile.read(str(tmp_path / "dual.wav"), always_2d=True)
    assert data.shape == (signal.shape[1], 2)


def test_stereo_model_and_output_options(tmp_path, tiny_stereo_ckpt):
    wav = tmp_path / "st.wav"
    soundfile.write(str(wav), test_signal(2.3, 48000, channels=2).T, 48000)
    result = run("compress", wav, "--checkpoint", tiny_stereo_ckpt, "-b", "6")
    assert result.exit_code == 0, result.stderr
    assert "joint" in run("info", wav.with_suffix(".ecdc")).stdout
    out = tmp_path / "mono16k.wav"
    result = run("decompress", wav.with_suffix(".ecdc"), "-o", out, "--rate", 16000, "--channels", 1,
                 "--checkpoint", tiny_stereo_ckpt)
    assert result.exit_code == 0, result.stderr
    data, rate = soundfile.read(str(out), always_2d=True)
    assert rate == 16000 and data.shape[1] == 1
    assert abs(data.shape[0] - int(2.3 * 16000)) <= 1


def test_refuses_to_overwrite_without_force(tmp_path, wav_file, tiny_mono_ckpt):
    target = tmp_path / "x.ecdc"
    target.write_bytes(b"precious")
    result = run("compress", wav_file, "-o", target, "--checkpoint", tiny_mono_ckpt)
    assert_one_line_error(result, str(target), "exists", "-f")
    assert target.read_bytes() == b"precious"
    result = run("compress", wav_file, "-o", target, "--checkpoint", tiny_mono_ckpt, "-f")
    assert result.exit_code == 0, result.stderr
    assert target.read_bytes()[:4] == b"ECDC"


def test_output_equal_to_input_is_refused(wav_file, tiny_mono_ckpt):
    before = wav_file.read_bytes()
    result = run("compress", wav_file, "-o", wav_file, "-f", "--checkpoint", tiny_mono_ckpt)
    assert_one_line_error(result, "input")
    assert wav_file.read_bytes() == before


@pytest.fixture
def good_ecdc(tmp_path, wav_file, tiny_mono_ckpt) -> Path:
    path = tmp_path / "good.ecdc"
    assert run("compress", wav_file, "-o", path, "--checkpoint", tiny_mono_ckpt).exit_code == 0
    return path


def test_corrupt_file_is_detected(tmp_path, good_ecdc, tiny_mono_ckpt):
    data = bytearray(good_ecdc.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.ecdc"
    bad.write_bytes(bytes(data))
    result = run("decompress", bad, "--checkpoint", tiny_mono_ckpt)
    assert_one_line_error(result, str(bad), "crc")
    assert not (tmp_path / "bad.wav").exists()
    assert leftovers(tmp_path) == []
    assert bad.read_bytes() == bytes(data)  # input untouched


def test_truncated_file_is_detected(tmp_path, good_ecdc, tiny_mono_ckpt):
    data = good_ecdc.read_bytes()
    short = tmp_path / "short.ecdc"
    short.write_bytes(data[: len(data) - 7])
    result = run("decompress", short, "--checkpoint", tiny_mono_ckpt)
    assert_one_line_error(result, str(short), "trunc")
    assert not (tmp_path / "short.wav").exists()
    assert leftovers(tmp_path) == []


def test_decoding_with_other_weights_is_refused(tmp_path, good_ecdc):
    from conftest import TINY_MONO, random_model, save_checkpoint

    other = save_checkpoint(random_model(TINY_MONO, seed=42), tmp_path / "other.th")
    result = run("decompress", good_ecdc, "--checkpoint", other)
    assert_one_line_error(result, "weights")


@pytest.mark.parametrize("case", ["missing", "not_audio", "empty", "directory"])
def test_bad_audio_input(tmp_path, tiny_mono_ckpt, case):
    path = tmp_path / "input.wav"
    if case == "not_audio":
        path.write_text("this is not audio\n" * 10)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    result = run("compress", path, "--checkpoint", tiny_mono_ckpt)
    assert_one_line_error(result, str(path))
    assert not (tmp_path / "input.ecdc").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("payload", [b"", b"ECDC", b"RIFF0000WAVEfmt ", b"\x00" * 64])
def test_not_an_ecdc_file(tmp_path, tiny_mono_ckpt, payload):
    path = tmp_path / "junk.ecdc"
    path.write_bytes(payload)
    result = run("decompress", path, "--checkpoint", tiny_mono_ckpt)
    assert_one_line_error(result, str(path))
    assert not (tmp_path / "junk.wav").exists()


def test_unknown_model(wav_file):
    assert_one_line_error(run("compress", wav_file, "--model", "no_such_model"), "no_such_model", "encodec_24khz")


def test_bad_bandwidth_names_the_valid_ones(wav_file, tiny_mono_ckpt):
    result = run("compress", wav_file, "-b", "5", "--checkpoint", tiny_mono_ckpt)
    assert_one_line_error(result, "1.5", "24")
    assert not wav_file.with_suffix(".ecdc").exists()


def test_without_a_model_says_what_to_pass(wav_file, monkeypatch):
    from ecdc import weights

    monkeypatch.setattr(weights, "DEFAULT_MODEL", None)  # an ecdc that bundles no release
    result = run("compress", wav_file)
    assert_one_line_error(result, "--model encodec_24khz", "--checkpoint")


def test_dual_is_refused_for_a_stereo_model(tmp_path, wav_file, tiny_stereo_ckpt):
    result = run("compress", wav_file, "--stereo", "dual", "--checkpoint", tiny_stereo_ckpt)
    assert_one_line_error(result, "dual")


def test_version_and_help():
    from ecdc import __version__

    assert __version__ in run("--version").stdout
    help_text = run("--help").stdout
    for command in ("compress", "decompress", "info"):
        assert command in help_text


def test_real_process_pipes_and_exit_status(tmp_path, wav_file, tiny_mono_ckpt):
    """A real subprocess: binary stdin/stdout pipes, and a clean one-line failure."""
    cmd = [sys.executable, "-m", "ecdc"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    compressed = subprocess.run(cmd + ["compress", "-", "--checkpoint", str(tiny_mono_ckpt)],
                                input=wav_file.read_bytes(), capture_output=True, env=env, timeout=120)
    assert compressed.returncode == 0, compressed.stderr.decode()
    assert EncodedAudio.from_bytes(compressed.stdout).header.model_name == "tiny_mono"
    broken = subprocess.run(cmd + ["decompress", "-", "-o", str(tmp_path / "o.wav"),
                                   "--checkpoint", str(tiny_mono_ckpt)],
                            input=compressed.stdout[:-3], capture_output=True, env=env, timeout=120)
    assert broken.returncode == 1
    stderr = broken.stderr.decode()
    assert stderr.startswith("ecdc: error:") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "o.wav").exists()
