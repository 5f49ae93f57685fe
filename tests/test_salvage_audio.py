"""``ecdc decompress --salvage``: the audio recovered from a damaged file.

test_salvage.py checks which chunks the reader recovers; these tests check what
the decoder makes of them: outside the gap the audio is the clean decode's, the gap
is silence, the length is the original's, and the command line reports the damage.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from ecdc.cli import main
from ecdc.codec import Codec
from ecdc.container import EcdcReader

from conftest import TINY_MONO, TINY_STEREO, random_model, test_signal
from test_salvage import spans

# Clean and salvaged decodes run the same streaming decoder over the same chunks up
# to the gap, so only float rounding separates them there.
ATOL = 1e-4


def corrupt_code_chunk(data: bytes, index: int) -> bytes:
    """Flip one payload byte of code chunk ``index`` (its CRC then fails)."""
    code_spans = [s for s in spans(data) if s[0] == ord("C")]
    _, start, end = code_spans[index]
    bad = bytearray(data)
    bad[(start + end) // 2] ^= 0x40
    return bytes(bad)


def decode(codec: Codec, data: bytes, salvage: bool) -> tuple[np.ndarray, EcdcReader]:
    reader = EcdcReader(io.BytesIO(data), salvage=salvage)
    blocks = list(codec.decode_blocks(reader))
    return np.concatenate(blocks, axis=1), reader


@pytest.fixture(scope="module")
def mono_codec() -> Codec:
    return Codec(random_model(TINY_MONO), bytes(16))


@pytest.fixture(scope="module")
def stereo_codec() -> Codec:
    return Codec(random_model(TINY_STEREO, seed=1), bytes(16))


def test_causal_model_gap_is_silence_and_the_rest_is_recovered(mono_codec: Codec) -> None:
    wav = test_signal(5.3, 24000)
    data = mono_codec.compress(wav, 24000, bandwidth=6.0)
    clean, _ = decode(mono_codec, data, salvage=False)
    bad = corrupt_code_chunk(data, 2)
    salvaged, reader = decode(mono_codec, bad, salvage=True)

    assert salvaged.shape == clean.shape == wav.shape
    [gap] = reader.gaps
    start, stop = gap.start_sample, gap.start_sample + gap.num_samples
    assert (gap.first_chunk, gap.n_chunks) == (2, 1)
    assert 0 < start < stop < wav.shape[1]
    assert reader.damage and reader.damage[0].startswith("code chunk 2 ")
    # Before the gap: exactly the clean decode. The gap: silence.
    np.testing.assert_allclose(salvaged[:, :start], clean[:, :start], atol=ATOL)
    assert not salvaged[:, start:stop].any()
    # After it the decoder restarts without the state the lost chunk would have left,
    # so the first moments differ; a quarter of a second on it is the clean decode.
    after = stop + 6000
    np.testing.assert_allclose(salvaged[:, after:], clean[:, after:], atol=1e-3)
    assert np.abs(salvaged[:, stop:after]).max() > 0  # audio, not more silence


def test_segmented_model_loses_one_segment(stereo_codec: Codec) -> None:
    wav = test_signal(4.5, 48000, channels=2)
    data = stereo_codec.compress(wav, 48000, bandwidth=6.0)
    clean, _ = decode(stereo_codec, data, salvage=False)
    salvaged, reader = decode(stereo_codec, corrupt_code_chunk(data, 1), salvage=True)

    assert salvaged.shape == clean.shape == wav.shape
    [gap] = reader.gaps
    seg_len, stride = 48000, stereo_codec.model.segment_stride
    assert (gap.start_sample, gap.num_samples) == (stride, stride)
    np.testing.assert_allclose(salvaged[:, :stride], clean[:, :stride], atol=ATOL)
    assert not salvaged[:, stride:2 * stride].any()
    # Segments are decoded independently: once past the overlap with the lost one,
    # the rest is the clean decode.
    after = stride + seg_len
    np.testing.assert_allclose(salvaged[:, after:], clean[:, after:], atol=ATOL)


def test_truncated_file_keeps_what_was_recovered(mono_codec: Codec) -> None:
    # The header states the length, but nothing intact after the cut proves it: the
    # output is the recovered audio, not padded to the stated length (test_claims.py).
    wav = test_signal(3.2, 24000)
    data = mono_codec.compress(wav, 24000, bandwidth=3.0)
    clean, _ = decode(mono_codec, data, salvage=False)
    code_spans = [s for s in spans(data) if s[0] == ord("C")]
    cut = data[:code_spans[-1][1] + 20]  # halfway into the last code chunk; end marker gone
    salvaged, reader = decode(mono_codec, cut, salvage=True)
    assert reader.gaps == [] and any("not replaced by silence" in d for d in reader.damage)
    intact = 3 * 75 * 320  # three whole chunks of 75 frames survive
    assert salvaged.shape[1] == intact < clean.shape[1]
    # The last hop of the cut would have been completed by the lost frames.
    np.testing.assert_allclose(salvaged[:, :intact - 320], clean[:, :intact - 320], atol=ATOL)


# --------------------------------------------------------------------------- command line


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def damaged_file(tmp_path: Path, tiny_mono_ckpt: Path) -> tuple[Path, Path]:
    src = tmp_path / "speech.wav"
    soundfile.write(str(src), test_signal(4.2, 24000).T, 24000, subtype="PCM_16")
    assert run("compress", "-q", "--checkpoint", tiny_mono_ckpt, src).exit_code == 0
    good = tmp_path / "speech.ecdc"
    bad = tmp_path / "damaged.ecdc"
    bad.write_bytes(corrupt_code_chunk(good.read_bytes(), 1))
    return good, bad


def test_cli_refuses_damage_and_points_to_salvage(damaged_file, tiny_mono_ckpt: Path) -> None:
    _, bad = damaged_file
    before = bad.read_bytes()
    result = run("decompress", "-q", "--checkpoint", tiny_mono_ckpt, bad)
    assert result.exit_code != 0
    [line] = result.output.strip().splitlines()
    assert "CRC32 mismatch" in line and "; --salvage decodes the intact parts" in line
    assert not bad.with_suffix(".wav").exists()
    assert list(bad.parent.glob("*.tmp*")) == [] and list(bad.parent.glob(".*")) == []
    assert bad.read_bytes() == before


def test_cli_salvage_writes_the_recovered_audio(damaged_file, tiny_mono_ckpt: Path) -> None:
    good, bad = damaged_file
    assert run("decompress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", good.with_name("clean.wav"),
               good).exit_code == 0
    result = run("decompress", "-q", "--salvage", "--checkpoint", tiny_mono_ckpt, bad)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert all(line.startswith(f"ecdc: warning: {bad}: ") for line in lines), lines
    assert "code chunk 1 (1.00-2.00 s): CRC mismatch" in lines[0]
    assert "1.00 s of it silence" in lines[-1]
    clean, _ = soundfile.read(str(good.with_name("clean.wav")), dtype="float32")
    salvaged, rate = soundfile.read(str(bad.with_suffix(".wav")), dtype="float32")
    assert rate == 24000 and salvaged.shape == clean.shape
    np.testing.assert_allclose(salvaged[:24000], clean[:24000], atol=2 / 32768)
    assert not salvaged[24000:48000].any()


def test_cli_salvage_of_an_intact_file_is_silent(damaged_file, tiny_mono_ckpt: Path) -> None:
    good, _ = damaged_file
    result = run("decompress", "-q", "--salvage", "--checkpoint", tiny_mono_ckpt, "-o",
                 good.with_name("s.wav"), good)
    assert result.exit_code == 0 and result.output == ""
