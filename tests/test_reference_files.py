"""Files written by Meta's reference ``encodec`` (format version 0) decode with ecdc."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner

from ecdc.cli import main
from ecdc.codec import Codec, EncodedAudio
from ecdc.errors import UnsupportedFeatureError
from ecdc.models import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecModel
from ecdc.weights import weights_fingerprint

from refstub import import_encodec, make_reference_model, make_test_audio

encodec = import_encodec()
from encodec import binary  # noqa: E402
from encodec.compress import compress_to_file  # noqa: E402

# 6720 samples is a length where the reference's own reader, which counts frames in
# floating point, fails; the 48 kHz clip spans three overlapping 1 s segments.
CASES = {
    "encodec_24khz": (ENCODEC_24KHZ, 6720, 6.0),
    "encodec_48khz": (ENCODEC_48KHZ, 2 * 48000 + 1234, 12.0),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def reference_file(request):
    """(name, reference model, input audio [C, T], bytes the reference wrote)."""
    name = request.param
    config, length, bandwidth = CASES[name]
    ref = make_reference_model(name, seed=7)
    ref.set_target_bandwidth(bandwidth)
    wav = make_test_audio(config.sample_rate, config.channels, length, seed=3)[0]
    buf = io.BytesIO()
    compress_to_file(ref, wav, buf, use_lm=False)
    return name, ref, wav, buf.getvalue()


def _ecdc_codec(ref, name) -> Codec:
    config = {"encodec_24khz": ENCODEC_24KHZ, "encodec_48khz": ENCODEC_48KHZ}[name]
    model = EncodecModel(config)
    model.load_state_dict(ref.state_dict(), strict=True)
    return Codec(model, weights_fingerprint(model.state_dict()))


def test_v0_file_decodes_to_the_reference_audio(reference_file):
    name, ref, wav, data = reference_file
    with torch.no_grad():
        expected = ref.decode(ref.encode(wav[None]))[0, :, : wav.shape[-1]].numpy()
    encoded = EncodedAudio.from_bytes(data)
    assert encoded.header.version == 0 and encoded.header.model_name == name
    assert encoded.num_samples == wav.shape[-1]
    got, rate = _ecdc_codec(ref, name).decode(encoded)
    assert rate == ref.sample_rate
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_v0_codes_equal_what_ecdc_encodes(reference_file):
    """Reading Meta's file and encoding with ecdc give the same codes."""
    name, ref, wav, data = reference_file
    encoded_v0 = EncodedAudio.from_bytes(data)
    ours = _ecdc_codec(ref, name).encode(wav.numpy(), ref.sample_rate, encoded_v0.header.bandwidth)
    v0_codes = np.concatenate([c.codes for c in encoded_v0.chunks], axis=-1)
    our_codes = np.concatenate([c.codes for c in ours.chunks], axis=-1)
    assert np.array_equal(v0_codes, our_codes)
    v0_scales = [c.scale for c in encoded_v0.chunks if c.scale is not None]
    assert v0_scales == [c.scale for c in ours.chunks if c.scale is not None]


def test_cli_decompresses_a_reference_file(tmp_path, reference_file):
    name, ref, wav, data = reference_file
    # A bare state dict named like Meta's release: NAME-<first 8 hex digits of its sha256>.th
    # (ecdc checks the file against the hash its name promises).
    saved = tmp_path / "state.th"
    torch.save(ref.state_dict(), str(saved))
    ckpt = tmp_path / f"{name}-{hashlib.sha256(saved.read_bytes()).hexdigest()[:8]}.th"
    saved.rename(ckpt)
    src = tmp_path / "ref.ecdc"
    src.write_bytes(data)
    result = CliRunner().invoke(main, ["decompress", str(src), "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.stderr
    out, rate = soundfile.read(str(tmp_path / "ref.wav"), always_2d=True)
    assert rate == ref.sample_rate and out.shape == (wav.shape[-1], ref.channels)


def test_lm_files_are_refused_clearly(tmp_path):
    buf = io.BytesIO()
    binary.write_ecdc_header(buf, {"m": "encodec_24khz", "al": 24000, "nc": 8, "lm": True})
    buf.write(bytes(range(256)))
    with pytest.raises(UnsupportedFeatureError, match="--lm"):
        EncodedAudio.from_bytes(buf.getvalue())
    path = tmp_path / "lm.ecdc"
    path.write_bytes(buf.getvalue())
    result = CliRunner().invoke(main, ["decompress", str(path), "--model", "encodec_24khz"])
    assert result.exit_code == 1
    assert "not support" in result.stderr and "--lm" in result.stderr
    assert result.stderr.count("\n") == 1
