"""Output formats and raw PCM (issue 14, items 3 and 10), driven through the real CLI.

``decompress -o out.flac`` writes FLAC (and so on for each suffix libsndfile writes),
``--format`` chooses explicitly (stdout too), ``--bits`` picks 16/24-bit or float samples;
what cannot be written is refused in one line before the model loads, leaving nothing.
``compress --raw`` reads headerless PCM (opusenc's options and defaults) and codes it
exactly as the same samples in a WAV file.

Each behaviour is run at least once as a user runs it, ``python -m ecdc`` in a subprocess
(pipes, exit codes, stderr); the other cases of a parametrized test run the same
command line in this process (:func:`cli` with ``in_process``), which costs no
interpreter and torch start-up.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from ecdc import outputformats, wavstream
from ecdc.choices import OUTPUT_FORMAT_CHOICES, RAW_FORMAT_CHOICES
from ecdc.cli import main
from ecdc.outputformats import OUTPUT_FORMATS, output_format, output_format_for, writable_formats
from ecdc.wavstream import RAW_INPUT_FORMATS, WavStreamWriter, encode_samples

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]
RATE = 44100  #: of the test audio: neither Opus nor the tiny 24 kHz model runs at it


@dataclass
class Ran:
    """What one command line did."""

    returncode: int
    stdout: bytes
    stderr: bytes


def ecdc(*args: object, input: bytes | None = None, in_process: bool = False) -> Ran:
    """``python -m ecdc ARGS`` in a subprocess, as a user runs it (stdout a pipe); or, with
    ``in_process``, the same command line through click's test runner."""
    argv = [str(a) for a in args]
    if in_process:
        result = CliRunner().invoke(main, argv, input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Ran(result.exit_code, result.stdout_bytes, result.stderr_bytes)
    proc = subprocess.run([sys.executable, "-m", "ecdc", *argv], cwd=REPO, capture_output=True, timeout=300,
                          input=input)
    return Ran(proc.returncode, proc.stdout, proc.stderr)


def one_error_line(proc: Ran) -> str:
    """The only line on stderr, which must be an ``ecdc: error:`` line (no traceback)."""
    lines = [ln for ln in proc.stderr.decode().splitlines() if ln.strip()]
    assert proc.returncode == 1, proc.stderr.decode()
    assert len(lines) == 1 and lines[0].startswith("ecdc: error: "), lines
    return lines[0]


def run_in_process(*args: object) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def coded(tmp_path_factory: pytest.TempPathFactory, tiny_mono_ckpt: Path) -> tuple[Path, np.ndarray]:
    """A .ecdc file of 0.5 s at 44.1 kHz, and the float audio it decodes to (the API's)."""
    import ecdc as api

    folder = tmp_path_factory.mktemp("coded")
    soundfile.write(folder / "in.wav", test_signal(0.5, RATE).T, RATE, subtype="PCM_16")
    run_in_process("compress", folder / "in.wav", "-q", "-o", folder / "in.ecdc", "--checkpoint", tiny_mono_ckpt)
    codec = api.load_model(checkpoint=str(tiny_mono_ckpt))
    audio, rate = api.decompress_file(folder / "in.ecdc", folder / "ref.wav", model=codec)
    assert rate == RATE
    return folder / "in.ecdc", audio


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- item 3: output formats

LOSSLESS_CASES = [  # (suffix, --bits, libsndfile format, subtype, in a subprocess)
    (".wav", None, "WAV", "PCM_16", False),
    (".wav", "24", "WAV", "PCM_24", False),
    (".wav", "32f", "WAV", "FLOAT", False),
    (".flac", None, "FLAC", "PCM_16", False),
    (".flac", "24", "FLAC", "PCM_24", True),
    (".aiff", None, "AIFF", "PCM_16", False),
    (".aif", "32f", "AIFF", "FLOAT", False),
]


@pytest.mark.parametrize("suffix, bits, major, subtype, in_subprocess", LOSSLESS_CASES)
def test_lossless_suffix_writes_its_format_with_the_samples(tmp_path: Path, coded, tiny_mono_ckpt: Path,
                                                            suffix: str, bits: str | None, major: str,
                                                            subtype: str, in_subprocess: bool) -> None:
    src, audio = coded
    out = tmp_path / f"out{suffix}"
    proc = ecdc("decompress", src, "-q", "-o", out, "--checkpoint", tiny_mono_ckpt, *(["--bits", bits] if bits else []),
                in_process=not in_subprocess)
    assert proc.returncode == 0, proc.stderr.decode()
    info = soundfile.info(str(out))
    assert (info.format, info.subtype, info.samplerate, info.frames) == (major, subtype, RATE, audio.shape[1])
    got, _ = soundfile.read(str(out), dtype="float32", always_2d=True)
    step = {"PCM_16": 2.0 ** -15, "PCM_24": 2.0 ** -23, "FLOAT": 0.0}[subtype]
    assert np.abs(got.T - np.clip(audio, -1, 1)).max() <= step  # the decoded audio, at that precision
    assert leftovers(tmp_path) == [out.name]


@pytest.mark.parametrize("suffix, codec, rate", [(".ogg", "VORBIS", RATE), (".opus", "OPUS", 48000),
                                                 (".mp3", "MPEG_LAYER_III", RATE)])
def test_lossy_suffix_writes_its_format(tmp_path: Path, coded, tiny_mono_ckpt: Path, suffix: str, codec: str,
                                        rate: int) -> None:
    """Opus takes no 44.1 kHz: without --rate it is written at 48 kHz, as opusdec decodes."""
    if OUTPUT_SUFFIX_FORMAT[suffix] not in writable_formats():
        pytest.skip(f"this libsndfile does not write {suffix}")
    src, audio = coded
    out = tmp_path / f"out{suffix}"
    proc = ecdc("decompress", src, "-q", "-o", out, "--checkpoint", tiny_mono_ckpt, in_process=suffix != ".opus")
    assert proc.returncode == 0, proc.stderr.decode()
    info = soundfile.info(str(out))
    assert (info.subtype, info.samplerate, info.channels) == (codec, rate, 1)
    if codec != "MPEG_LAYER_III":  # MP3 frames pad the end
        assert info.frames == round(audio.shape[1] * rate / RATE)


OUTPUT_SUFFIX_FORMAT = outputformats.OUTPUT_SUFFIXES


@pytest.mark.parametrize("bits, dtype", [(None, "<i2"), ("32f", "<f4")])
def test_raw_output_is_headerless_samples(tmp_path: Path, coded, tiny_mono_ckpt: Path, bits: str | None,
                                          dtype: str) -> None:
    src, audio = coded
    out = tmp_path / "out.pcm"
    proc = ecdc("decompress", src, "-q", "-o", out, "--checkpoint", tiny_mono_ckpt, *(["--bits", bits] if bits else []),
                in_process=bits is None)
    assert proc.returncode == 0, proc.stderr.decode()
    samples = np.frombuffer(out.read_bytes(), dtype=dtype)
    expected = wavstream.to_pcm16(audio)[0] if dtype == "<i2" else audio[0]
    assert np.array_equal(samples, expected)


def test_stdout_takes_format_and_bits_through_a_pipe(coded, tiny_mono_ckpt: Path) -> None:
    """FLAC must seek to finish its header, so to a pipe it is spooled and sent whole: it
    reads back complete, with its length known."""
    src, audio = coded
    proc = ecdc("decompress", src, "-q", "-o", "-", "--format", "flac", "--bits", "24", "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:4] == b"fLaC"
    info = soundfile.info(io.BytesIO(proc.stdout))
    assert (info.format, info.subtype, info.frames) == ("FLAC", "PCM_24", audio.shape[1])


def test_batch_format_decides_each_outputs_suffix(tmp_path: Path, coded, tiny_mono_ckpt: Path) -> None:
    src, _ = coded
    inputs = [tmp_path / "a.ecdc", tmp_path / "b.ecdc"]
    for path in inputs:
        path.write_bytes(src.read_bytes())
    proc = ecdc("decompress", *inputs, "-q", "-o", tmp_path / "out", "--format", "FLAC", "--checkpoint", tiny_mono_ckpt,
                in_process=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert leftovers(tmp_path / "out") == ["a.flac", "b.flac"]
    assert soundfile.info(str(tmp_path / "out" / "a.flac")).format == "FLAC"


REFUSALS = [  # (output name, options, what the one line says)
    ("out.m4a", [], "libsndfile has no MPEG-4 AAC encoder"),
    ("out.xyz", [], "cannot tell an output format from the suffix '.xyz'"),
    ("out.flac", ["--bits", "32f"], "flac cannot hold 32-bit float samples: --bits 16 or 24"),
    ("out.ogg", ["--bits", "24"], "--bits does not apply to ogg, a lossy format"),
    ("out.opus", ["--rate", "44100"], "opus takes sample rates of 8000, 12000, 16000, 24000, 48000 Hz, not 44100"),
]


@pytest.mark.parametrize("name, options, says", REFUSALS)
def test_unwritable_output_is_refused_before_the_model_loads(tmp_path: Path, coded, name: str, options: list[str],
                                                             says: str) -> None:
    """The checkpoint named does not exist: had the model been loaded first, that would be the error."""
    src, _ = coded
    out = tmp_path / name
    proc = ecdc("decompress", src, "-o", out, *options, "--checkpoint", tmp_path / "absent.th",
                in_process=name != "out.m4a")
    line = one_error_line(proc)
    assert line.startswith(f"ecdc: error: {out}: ") and says in line, line
    assert leftovers(tmp_path) == []


def test_too_many_channels_for_the_format_is_refused_before_any_output(tmp_path: Path, coded,
                                                                       tiny_mono_ckpt: Path) -> None:
    """Known only once the header is read and the model loaded: still before the output exists."""
    src, _ = coded
    out = tmp_path / "out.mp3"
    if "mp3" not in writable_formats():
        out = tmp_path / "out.flac"
    channels = "3" if out.suffix == ".mp3" else "9"
    proc = ecdc("decompress", src, "-o", out, "--channels", channels, "--checkpoint", tiny_mono_ckpt, in_process=True)
    line = one_error_line(proc)
    assert "holds at most" in line and f"not {channels}" in line, line
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_through_libsndfile_is_one_line(coded, tiny_mono_ckpt: Path) -> None:
    """libsndfile writes FLAC through Python callbacks: their ENOSPC used to be printed as
    "Exception ignored from cffi callback" tracebacks on top of the error."""
    src, _ = coded
    proc = ecdc("decompress", src, "-o", "/dev/full", "--format", "flac", "-f", "--checkpoint", tiny_mono_ckpt)
    line = one_error_line(proc)
    assert "/dev/full" in line and "No space left on device" in line, line


def test_raw_contradicts_another_format(tmp_path: Path, coded) -> None:
    src, _ = coded
    proc = ecdc("decompress", src, "--raw", "--format", "flac", "-o", tmp_path / "x.flac", in_process=True)
    assert proc.returncode == 2 and b"--raw (headerless PCM) contradicts --format flac" in proc.stderr
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- item 10: raw input


def raw_bytes(audio: np.ndarray, raw_format: str) -> bytes:
    """``[C, T]`` float audio as interleaved headerless PCM, as ffmpeg ``-f FORMAT`` writes it."""
    subtype = {"s16le": "PCM_16", "s24le": "PCM_24", "f32le": "FLOAT"}[raw_format]
    return encode_samples(audio, subtype)


@pytest.mark.parametrize("raw_format, rate, channels, via_stdin", [
    ("s16le", 48000, 2, True),  # opusenc's defaults: no --raw-* option given
    ("s24le", 16000, 1, False),
    ("f32le", 22050, 3, False),
])
def test_raw_input_codes_as_the_same_samples_in_a_wav(tmp_path: Path, tiny_mono_ckpt: Path, raw_format: str,
                                                      rate: int, channels: int, via_stdin: bool) -> None:
    audio = test_signal(0.4, rate, channels=channels, seed=3) * 0.9
    pcm = raw_bytes(audio, raw_format)
    subtype = {"s16le": "PCM_16", "s24le": "PCM_24", "f32le": "FLOAT"}[raw_format]
    soundfile.write(tmp_path / "same.wav", audio.T, rate, subtype=subtype)
    run_in_process("compress", tmp_path / "same.wav", "-q", "-o", tmp_path / "from_wav.ecdc",
                   "--checkpoint", tiny_mono_ckpt)
    if via_stdin:
        proc = ecdc("compress", "--raw", "-", "-q", "-o", tmp_path / "from_raw.ecdc", "--checkpoint", tiny_mono_ckpt,
                    input=pcm)
    else:
        (tmp_path / "in.pcm").write_bytes(pcm)
        proc = ecdc("compress", tmp_path / "in.pcm", "-q", "-o", tmp_path / "from_raw.ecdc", "--raw-format",
                    raw_format, "--raw-rate", rate, "--raw-chan" if channels == 3 else "--raw-channels", channels,
                    "--checkpoint", tiny_mono_ckpt, in_process=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "from_raw.ecdc").read_bytes() == (tmp_path / "from_wav.ecdc").read_bytes()


def test_raw_bytes_on_stdin_without_raw_suggest_it(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    pcm = raw_bytes(test_signal(0.2, 48000, channels=2), "s16le")
    proc = ecdc("compress", "-", "-o", tmp_path / "x.ecdc", "--checkpoint", tiny_mono_ckpt, input=pcm)
    line = one_error_line(proc)
    assert line.startswith("ecdc: error: <stdin>: cannot read audio"), line
    assert "say so with --raw" in line and "BytesIO" not in line, line
    assert leftovers(tmp_path) == []


def test_a_raw_file_without_raw_suggests_it(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    """libsndfile takes a .raw name as headerless and wants its rate; the line says how to give it."""
    src = tmp_path / "take.raw"
    src.write_bytes(raw_bytes(test_signal(0.2, 48000, channels=2), "s16le"))
    proc = ecdc("compress", src, "-o", tmp_path / "x.ecdc", "--checkpoint", tiny_mono_ckpt, in_process=True)
    line = one_error_line(proc)
    assert line.startswith(f"ecdc: error: {src}: cannot read audio") and "say so with --raw" in line, line
    assert leftovers(tmp_path) == ["take.raw"]


# --------------------------------------------------------------------------- the pieces, in process


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_streamed_samples_are_libsndfiles(subtype: str) -> None:
    """The streaming writer converts float exactly as libsndfile does (clipping included)."""
    audio = np.concatenate([test_signal(0.1, 8000, channels=2), np.array([[1.5, -1.5], [1.0, -1.0]])], axis=1)
    audio = audio.astype(np.float32)
    theirs = io.BytesIO()
    top = {"PCM_16": 32767 / 32768, "PCM_24": 8388607 / 8388608}.get(subtype)
    clipped = audio if top is None else np.clip(audio, -1, np.float32(top))  # libsndfile would wrap
    soundfile.write(theirs, clipped.T, 8000, subtype=subtype, format="RAW")
    assert encode_samples(audio, subtype) == theirs.getvalue()


@pytest.mark.parametrize("subtype", ["PCM_24", "FLOAT"])
def test_wide_samples_become_rf64_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 subtype: str) -> None:
    monkeypatch.setattr(wavstream, "RF64_THRESHOLD", 1000)
    audio = test_signal(0.1, 8000, channels=3)
    path = tmp_path / "big.wav"
    with open(path, "wb") as f:
        writer = WavStreamWriter(f, 8000, 3, subtype=subtype)
        writer.write(audio[:, :300])
        writer.write(audio[:, 300:])
        writer.close()
    assert path.read_bytes()[:4] == b"RF64"
    info = soundfile.info(str(path))
    assert (info.subtype, info.channels, info.frames) == (subtype, 3, audio.shape[1])


def test_suffixes_and_names_agree_with_the_command_line() -> None:
    assert tuple(OUTPUT_FORMATS) == OUTPUT_FORMAT_CHOICES
    assert tuple(RAW_INPUT_FORMATS) == RAW_FORMAT_CHOICES
    assert {s: output_format_for(f"x{s.upper()}").name for s in (".wave", ".oga", ".aifc", ".pcm")} == {
        ".wave": "wav", ".oga": "ogg", ".aifc": "aiff", ".pcm": "raw"}
    assert output_format_for("-").name == output_format_for("noext").name == "wav"
    assert output_format("FLAC").suffix == ".flac"


def test_raw_input_drops_a_trailing_partial_frame() -> None:
    audio = test_signal(0.01, 8000, channels=2)
    data = raw_bytes(audio, "s24le") + b"\x01\x02\x03\x04"  # 4 bytes of a 6-byte frame
    source = wavstream.RawPcmSource(io.BytesIO(data), wavstream.RawInput(8000, 2, "s24le"), size=len(data),
                                    block_frames=17)
    assert source.frames == audio.shape[1]
    got = np.concatenate(list(source.blocks()), axis=1)
    assert got.shape == audio.shape and np.abs(got - audio).max() <= 2.0 ** -23
