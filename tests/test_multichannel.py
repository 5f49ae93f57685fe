"""More than two channels: the WAV channel mask read and restored, the ITU-R BS.775 downmix
for mono and stereo models, ``--stereo separate`` (one code stream per channel), what a
decode gives (never channels that were not coded), and the files of format 1.0 still read."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from ecdc import audio
from ecdc.cli import main
from ecdc.codec import load_model
from ecdc.container import EcdcHeader, EcdcReader, StereoMode, write_ecdc
from ecdc.container.header import MAX_SEPARATE_STREAMS
from ecdc.errors import FormatError, UnsupportedFeatureError
from ecdc.wavstream import open_audio_file, open_audio_stream

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
#: 5.1 with side surrounds, as ffmpeg writes "5.1(side)": FL FR FC LFE SL SR.
MASK_51_SIDE = 0x60F
A = np.float32(np.sqrt(0.5))  # -3 dB


def ecdc(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """The real command line in its own process."""
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], input=stdin, capture_output=True,
                          env=ENV, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return result


def cli(*args, input: bytes | None = None):
    """The command line in this process (for the checks that need no process of their own)."""
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    return result


def write_wavex(path: Path, wav: np.ndarray, rate: int, mask: int) -> Path:
    """16-bit WAVE_FORMAT_EXTENSIBLE with ``mask`` (soundfile cannot set a mask)."""
    channels = wav.shape[0]
    pcm = (np.clip(wav, -1, 32767 / 32768) * 32768).round().astype("<i2").T.tobytes()
    guid = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * 2 * channels, 2 * channels, 16)
    fmt += struct.pack("<HHI", 22, 16, mask) + guid
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def surround(seconds: float = 1.0, rate: int = 24000, channels: int = 6) -> np.ndarray:
    """Distinct audio in every channel (so a mix that drops or swaps one shows)."""
    return np.concatenate([test_signal(seconds, rate, seed=c) * (0.3 + 0.1 * c) for c in range(channels)])


def all_codes(encoded_or_path) -> np.ndarray:
    if isinstance(encoded_or_path, Path):
        with open(encoded_or_path, "rb") as f:
            chunks = list(EcdcReader(f))
    else:
        chunks = encoded_or_path.chunks
    return np.concatenate([c.codes for c in chunks], axis=-1)


# --------------------------------------------------------------------------- layouts and the downmix


def test_default_layouts_are_ffmpegs():
    names = {n: audio.describe_layout(audio.channel_layout(n)) for n in range(1, 10)}
    assert names == {1: "FC", 2: "FL+FR", 3: "FL+FR+LFE", 4: "FL+FR+FC+BC", 5: "FL+FR+FC+BL+BR",
                     6: "FL+FR+FC+LFE+BL+BR", 7: "FL+FR+FC+LFE+BC+SL+SR", 8: "FL+FR+FC+LFE+BL+BR+SL+SR",
                     9: "?+?+?+?+?+?+?+?+?"}
    # A mask takes the lowest bits for the channels it has; channels past its bits have none.
    assert audio.describe_layout(audio.channel_layout(6, MASK_51_SIDE)) == "FL+FR+FC+LFE+SL+SR"
    assert audio.describe_layout(audio.channel_layout(4, 0x3)) == "FL+FR+?+?"
    assert audio.describe_layout(audio.channel_layout(2, 0x3F)) == "FL+FR"
    assert audio.layout_mask(audio.channel_layout(6, MASK_51_SIDE)) == MASK_51_SIDE


def test_51_downmix_is_bs775_normalised():
    wav = surround(0.05)
    fl, fr, fc, lfe, sl, sr = wav
    norm = 1 + 2 * A  # the larger row sum: L = FL + 0.7071 FC + 0.7071 SL
    layout = audio.channel_layout(6, MASK_51_SIDE)
    stereo = audio.remix(wav, layout, audio.channel_layout(2))
    np.testing.assert_allclose(stereo[0], (fl + A * fc + A * sl) / norm, atol=1e-6)
    np.testing.assert_allclose(stereo[1], (fr + A * fc + A * sr) / norm, atol=1e-6)
    mono = audio.remix(wav, layout, audio.channel_layout(1))
    np.testing.assert_allclose(mono[0], (0.5 * (fl + fr) + A * fc + 0.5 * A * (sl + sr)) / norm, atol=1e-6)
    matrix = audio.mix_matrix(layout, audio.channel_layout(1))
    np.testing.assert_allclose(matrix[0], [0.2071068, 0.2071068, 0.2928932, 0, 0.1464466, 0.1464466], atol=1e-6)
    assert matrix[0, 3] == 0  # LFE dropped
    # Full-scale input of any signs cannot clip.
    assert np.abs(audio.mix_matrix(layout, audio.channel_layout(2))).sum(axis=1).max() <= 1 + 1e-6


def test_mono_and_stereo_convert_as_they_always_have():
    stereo = test_signal(0.1, 24000, channels=2)
    assert np.array_equal(audio.remix(stereo, (1, 2), (4,)), audio.to_channels(stereo, 1))
    mono = stereo[:1]
    assert np.array_equal(audio.remix(mono, (4,), (1, 2)), np.vstack([mono, mono]))


def test_upmix_puts_channels_where_they_belong_and_invents_none():
    six = audio.channel_layout(6)
    up = audio.mix_matrix(audio.channel_layout(2), six)  # stereo -> 5.1: FL, FR; the rest silent
    assert up.tolist() == [[1, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0]]
    centre = audio.mix_matrix(audio.channel_layout(1), six)  # mono -> 5.1: the centre
    assert centre[:, 0].tolist() == [0, 0, 1, 0, 0, 0]


# --------------------------------------------------------------------------- reading the mask


def test_channel_mask_is_read_from_files_and_pipes(tmp_path):
    path = write_wavex(tmp_path / "51.wav", surround(0.2), 24000, MASK_51_SIDE)
    assert audio.wav_channel_mask(path.read_bytes()[:200]) == MASK_51_SIDE
    with open_audio_file(str(path)) as source:
        assert source.channel_mask == MASK_51_SIDE
    with open(path, "rb") as f, open_audio_stream(f) as stream:
        assert stream.channel_mask == MASK_51_SIDE
    plain = tmp_path / "plain.wav"
    soundfile.write(str(plain), surround(0.2).T, 24000, subtype="PCM_16")  # WAVE_FORMAT_PCM: no mask
    with open_audio_file(str(plain)) as source:
        assert source.channel_mask is None
    flac = tmp_path / "51.flac"
    soundfile.write(str(flac), surround(0.2).T, 24000)
    with open_audio_file(str(flac)) as source:
        assert source.channel_mask is None
    # Bounded: a fmt chunk that is cut short, or claims more than there is, gives no mask.
    data = path.read_bytes()
    assert audio.wav_channel_mask(data[:40]) is None
    assert audio.wav_channel_mask(data[:12] + b"fmt \xff\xff\xff\xff" + data[20:30]) is None


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def wav51(tmp_path_factory) -> Path:
    return write_wavex(tmp_path_factory.mktemp("mc") / "51.wav", surround(1.0), 24000, MASK_51_SIDE)


def test_51_to_mono_model_is_the_bs775_downmix(tmp_path, wav51, tiny_mono_ckpt):
    out = tmp_path / "51.ecdc"
    ok(ecdc("compress", wav51, "-o", out, "--checkpoint", tiny_mono_ckpt))
    assert "downmix (original 6, FL+FR+FC+LFE+SL+SR)" in cli("info", out).stdout
    with open(out, "rb") as f:
        header = EcdcReader(f).header
    assert header.channel_mask == MASK_51_SIDE and header.stereo_mode == StereoMode.DOWNMIX
    # The codes are those of the BS.775 mono mix (LFE dropped), not of the mean of the channels.
    pcm, _ = soundfile.read(str(wav51), dtype="float32", always_2d=True)
    layout = audio.channel_layout(6, MASK_51_SIDE)
    codec = load_model(str(tiny_mono_ckpt))
    mixed = audio.remix(pcm.T, layout, (audio.FC,))
    assert np.array_equal(all_codes(out), all_codes(codec.encode(mixed, 24000)))
    assert not np.array_equal(all_codes(out), all_codes(codec.encode(pcm.T.mean(axis=0), 24000)))
    # Decoding gives the one coded channel, as plain mono PCM.
    decoded = tmp_path / "51.wav"
    ok(ecdc("decompress", out, "-o", decoded, "--checkpoint", tiny_mono_ckpt))
    info_out = soundfile.info(str(decoded))
    assert info_out.channels == 1 and info_out.format == "WAV" and info_out.frames == pcm.shape[0]
    assert audio.wav_channel_mask(decoded.read_bytes()[:200]) is None
    # --channels 6 asks for the original layout: the mix in the centre, nothing invented elsewhere.
    six = tmp_path / "six.wav"
    # (a process like the mono decode's: decoded audio may round differently at another thread count)
    ok(ecdc("decompress", out, "-o", six, "--channels", 6, "--checkpoint", tiny_mono_ckpt))
    data, _ = soundfile.read(str(six), always_2d=True)
    mono, _ = soundfile.read(str(decoded), always_2d=True)
    assert audio.wav_channel_mask(six.read_bytes()[:200]) == MASK_51_SIDE
    np.testing.assert_array_equal(data[:, 2], mono[:, 0])
    assert not np.delete(data, 2, axis=1).any()


def test_lfe_alone_is_dropped_from_the_downmix(tmp_path, tiny_mono_ckpt):
    wav = np.zeros((6, 24000), dtype=np.float32)
    wav[3] = test_signal(1.0, 24000)[0]  # only the LFE has signal
    src = write_wavex(tmp_path / "lfe.wav", wav, 24000, MASK_51_SIDE)
    assert cli("compress", src, "-o", tmp_path / "lfe.ecdc", "--checkpoint", tiny_mono_ckpt).exit_code == 0
    silent = load_model(str(tiny_mono_ckpt)).encode(np.zeros(24000, np.float32), 24000)
    assert np.array_equal(all_codes(tmp_path / "lfe.ecdc"), all_codes(silent))


def test_separate_codes_every_channel_and_restores_the_mask(tmp_path, wav51, tiny_mono_ckpt):
    out = tmp_path / "sep.ecdc"
    ok(ecdc("compress", wav51, "-o", out, "--stereo", "separate", "--checkpoint", tiny_mono_ckpt))
    info = cli("info", out).stdout
    assert "x 6 channels)" in info and "separate (original 6, FL+FR+FC+LFE+SL+SR)" in info
    assert out.read_bytes()[5] == 1  # format 1.1
    codes = all_codes(out)
    assert codes.shape[0] == 6
    pcm, _ = soundfile.read(str(wav51), dtype="float32", always_2d=True)
    codec = load_model(str(tiny_mono_ckpt))
    for channel in (0, 3, 5):  # each stream is exactly that channel coded on its own
        alone = all_codes(codec.encode(pcm[:, channel], 24000))
        assert np.array_equal(codes[channel], alone[0])
    # dual, separate's older name, codes every channel too, and so does a pipe (whose WAV
    # header is parsed by ecdc, not libsndfile): the same file.
    piped = ok(ecdc("compress", "-", "-o", "-", "--stereo", "dual", "--checkpoint", tiny_mono_ckpt,
                    stdin=wav51.read_bytes())).stdout
    assert piped == out.read_bytes()
    decoded = tmp_path / "sep.wav"
    ok(ecdc("decompress", out, "-o", decoded, "--checkpoint", tiny_mono_ckpt))
    info_out = soundfile.info(str(decoded))
    assert info_out.channels == 6 and info_out.format == "WAVEX" and info_out.frames == pcm.shape[0]
    assert audio.wav_channel_mask(decoded.read_bytes()[:200]) == MASK_51_SIDE
    # --channels 2: the BS.775 stereo mix of the six decoded channels.
    stereo = tmp_path / "stereo.wav"
    assert cli("decompress", out, "-o", stereo, "--channels", 2, "--checkpoint", tiny_mono_ckpt).exit_code == 0
    six, _ = soundfile.read(str(decoded), dtype="float32", always_2d=True)
    two, _ = soundfile.read(str(stereo), dtype="float32", always_2d=True)
    expected = audio.remix(six.T, audio.channel_layout(6, MASK_51_SIDE), audio.channel_layout(2))
    np.testing.assert_allclose(two.T, expected, atol=3 / 32768)  # each side rounded to 16 bits
    assert soundfile.info(str(stereo)).format == "WAV"


def test_too_many_channels_for_separate_is_one_line(tmp_path, tiny_mono_ckpt):
    many = MAX_SEPARATE_STREAMS + 1
    src = tmp_path / "many.wav"
    soundfile.write(str(src), np.zeros((2400, many), np.float32), 24000, subtype="PCM_16")
    result = cli("compress", src, "--stereo", "separate", "--checkpoint", tiny_mono_ckpt)
    err = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(err) == 1 and err[0].startswith("ecdc: error:"), err
    assert f"{many} channels" in err[0] and "downmix" in err[0]
    assert not src.with_suffix(".ecdc").exists()


def test_stereo_model_gets_the_bs775_stereo_mix(tiny_stereo_ckpt):
    wav = surround(1.0, 48000)
    codec = load_model(str(tiny_stereo_ckpt))
    encoded = codec.encode(wav, 48000)
    assert encoded.header.stereo_mode == StereoMode.JOINT and encoded.header.original_channels == 6
    mixed = audio.remix(wav, audio.channel_layout(6), audio.channel_layout(2))
    assert np.array_equal(all_codes(encoded), all_codes(codec.encode(mixed, 48000)))
    decoded, _ = codec.decode(encoded)
    assert decoded.shape[0] == 2  # the coded channels, not six invented from two


# --------------------------------------------------------------------------- the format


def _header(**fields) -> EcdcHeader:
    base = dict(model_name="tiny_mono", weights_fingerprint=bytes(16), sample_rate=24000, channels=1,
                stereo_mode=StereoMode.SEPARATE, bandwidth=1.5, num_codebooks=2, bits_per_code=10,
                hop_length=320, segment_length=0, segment_stride=0, has_scale=False, num_samples=None,
                original_sample_rate=24000, original_channels=6, channel_mask=MASK_51_SIDE)
    return EcdcHeader(**{**base, **fields})


def test_header_round_trip_and_old_readers():
    from ecdc.container import CodeChunk

    header = _header()
    chunk = CodeChunk(np.arange(6 * 2 * 3).reshape(6, 2, 3) % 1024)
    data = write_ecdc(header, [chunk], 960)
    assert data[5] == 1 and data[62] & 0x02  # minor 1; the flag a 1.0 reader refuses as unknown
    import io

    reader = EcdcReader(io.BytesIO(data))
    assert reader.header.channel_mask == MASK_51_SIDE and reader.header.streams == 6
    assert np.array_equal(next(iter(reader)).codes, chunk.codes)
    # Without mask or SEPARATE, a file is byte for byte a 1.0 file.
    plain = write_ecdc(_header(stereo_mode=StereoMode.DOWNMIX, channel_mask=0), [CodeChunk(chunk.codes[:1])], 960)
    assert plain[5] == 0 and struct.unpack_from("<H", plain, 6)[0] == 56 + len("tiny_mono")


def _with_header_byte(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[offset] = value
    (body_len,) = struct.unpack_from("<H", out, 6)
    out[8 + body_len:12 + body_len] = struct.pack("<I", zlib.crc32(bytes(out[:8 + body_len])))
    return bytes(out)


def test_inconsistent_separate_headers_are_refused():
    import io

    from ecdc.container import CodeChunk

    data = write_ecdc(_header(), [CodeChunk(np.zeros((6, 2, 1), np.int64))], 320)
    with pytest.raises(FormatError, match="SEPARATE flag"):
        EcdcReader(io.BytesIO(_with_header_byte(data, 62, 0)))  # SEPARATE without its flag
    with pytest.raises(UnsupportedFeatureError):
        EcdcReader(io.BytesIO(_with_header_byte(data, 62, 0x06)))  # an unknown flag as well
    with pytest.raises(FormatError, match="original_channels"):
        _header(original_channels=MAX_SEPARATE_STREAMS + 1, channel_mask=0).validate()
    with pytest.raises(FormatError, match="channel_mask"):
        _header(original_channels=2, stereo_mode=StereoMode.DUAL, channel_mask=0x7).validate()


def test_dual_file_of_format_10_from_51_still_decodes(tmp_path, tiny_mono_ckpt):
    """The previous version wrote --stereo dual on 5.1 as DUAL with original_channels 6: two
    streams (the channels mixed down to two). It decodes to the two channels it codes."""
    codec = load_model(str(tiny_mono_ckpt))
    two = codec.encode(test_signal(1.0, 24000, channels=2), 24000, stereo="dual")
    assert two.header.stereo_mode == StereoMode.DUAL
    old = write_ecdc(_header(stereo_mode=StereoMode.DUAL, original_channels=6, channel_mask=0,
                             num_codebooks=two.header.num_codebooks, bandwidth=two.header.bandwidth,
                             weights_fingerprint=two.header.weights_fingerprint),
                     two.chunks, two.num_samples, original_samples=two.original_samples)
    assert old[5] == 0
    src = tmp_path / "old.ecdc"
    src.write_bytes(old)
    assert cli("decompress", src, "-o", tmp_path / "old.wav", "--checkpoint", tiny_mono_ckpt).exit_code == 0
    data, _ = soundfile.read(str(tmp_path / "old.wav"), dtype="float32", always_2d=True)
    expected, _ = codec.decode(two)
    assert data.shape == (24000, 2)
    np.testing.assert_allclose(data.T, expected, atol=1.5 / 32768)


def test_golden_release_file_still_decodes(tmp_path):
    golden = REPO / "tests" / "data" / "releases" / "ecdc_24khz_v1.ecdc"
    ok(ecdc("decompress", golden, "-o", tmp_path / "g.wav"))
    data, rate = soundfile.read(str(tmp_path / "g.wav"), dtype="float32", always_2d=True)
    reference = np.load(golden.with_suffix(".npy"))  # what it decoded to when it was made
    assert rate == 24000 and data.shape == reference.T.shape and data.shape[1] == 1
    assert np.abs(data.T - np.clip(reference, -1, 1)).max() < 1e-3
