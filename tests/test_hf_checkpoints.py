"""transformers' EncodecModel checkpoints: ecdc reads them as they are and codes like transformers.

Randomly initialised EncodecModels with the facebook/* configurations (codebooks filled
with well-separated vectors, so no code can flip on rounding) are saved with
``save_pretrained``; ecdc's codes must equal transformers' ``encode``, its decoded audio
its ``decode`` within 1e-4, and (24/48 kHz) the same weights in Meta's layout must give
the same codes and the same fingerprint. The hf: names are resolved in a fake Hugging Face
cache, offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from ecdc.errors import WeightsError  # noqa: E402
from ecdc.hf import config_from_hf, snapshot_dir  # noqa: E402
from ecdc.models.encodec import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ  # noqa: E402
from ecdc.weights import load_weights  # noqa: E402

from conftest import test_signal  # noqa: E402

#: The facebook/* snapshots' configurations (transformers' conversion script).
HF_CONFIGS = {
    "24khz": dict(),
    "48khz": dict(sampling_rate=48_000, audio_channels=2, chunk_length_s=1.0, overlap=0.01,
                  norm_type="time_group_norm", normalize=True, target_bandwidths=[3.0, 6.0, 12.0, 24.0],
                  use_causal_conv=False),
    "32khz": dict(upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2], num_filters=64, sampling_rate=32_000,
                  codebook_size=2048, use_causal_conv=False, normalize=False, use_conv_shortcut=False),
}
OURS = {"24khz": ENCODEC_24KHZ, "48khz": ENCODEC_48KHZ, "32khz": ENCODEC_32KHZ}
SECONDS = {"24khz": 1.0, "48khz": 1.5, "32khz": 1.0}


def hf_model(kind: str, seed: int = 0):
    """A random transformers EncodecModel; each codebook holds well-separated random
    vectors at the scale of the encoder's output, so the codes vary and no distance is
    near a tie."""
    torch.manual_seed(seed)
    model = transformers.EncodecModel(transformers.EncodecConfig(**HF_CONFIGS[kind])).eval()
    with torch.no_grad():
        scale = model.encoder(audio(kind)).std().item()
        for layer in model.quantizer.layers:
            book = layer.codebook
            book.embed.copy_(torch.randn_like(book.embed) * scale)
            book.embed_avg.copy_(book.embed)
            book.cluster_size.fill_(1.0)
            book.inited.fill_(1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (transformers model, its save_pretrained directory), built once."""
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            model = hf_model(kind)
            directory = tmp_path_factory.mktemp(f"hf_{kind}")
            model.save_pretrained(directory)
            cache[kind] = (model, directory)
        return cache[kind]
    return get


def audio(kind: str) -> torch.Tensor:
    config = OURS[kind]
    return torch.from_numpy(test_signal(SECONDS[kind], config.sample_rate, config.channels))[None]


@pytest.mark.parametrize("kind", ["24khz", "48khz", "32khz"])
def test_codes_and_audio_match_transformers(saved, kind):
    reference, directory = saved(kind)
    ours, _ = load_weights(checkpoint=str(directory))
    assert ours.config == OURS[kind]
    wav = audio(kind)
    bandwidth = OURS[kind].bandwidths[-1]
    with torch.no_grad():
        encoded = reference.encode(wav, bandwidth=bandwidth)
        theirs = encoded.audio_codes  # [segments, B, K, F]
        assert len(torch.unique(theirs)) > 30  # codes that say something, not one code everywhere
        segments = ours.encode(wav, bandwidth)
        assert len(segments) == theirs.shape[0]
        for i, segment in enumerate(segments):
            frames = segment.codes.shape[-1]
            assert torch.equal(segment.codes, theirs[i, ..., :frames]), f"segment {i}"
            if encoded.audio_scales[i] is not None:
                assert torch.equal(segment.scale, encoded.audio_scales[i].view(-1))
        decoded = reference.decode(theirs, encoded.audio_scales,
                                   last_frame_pad_length=encoded.last_frame_pad_length).audio_values
        ours_decoded = ours.decode(segments)
    n = min(decoded.shape[-1], ours_decoded.shape[-1], wav.shape[-1])
    assert n >= wav.shape[-1] * 0.9
    assert (decoded[..., :n] - ours_decoded[..., :n]).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["24khz", "48khz"])
def test_meta_layout_of_the_same_weights_codes_and_hashes_alike(saved, tmp_path, kind):
    """The transformers snapshot and Meta's layout of its weights (a bare state dict, as
    Meta's .th files are) are one model: same codes, same fingerprint."""
    _, directory = saved(kind)
    from_hf, fingerprint_hf = load_weights(checkpoint=str(directory))
    meta_file = tmp_path / "weights.th"
    torch.save(from_hf.state_dict(), meta_file)
    assert not any(k.startswith(("encoder.layers", "quantizer.layers")) for k in from_hf.state_dict())
    from_meta, fingerprint_meta = load_weights(checkpoint=str(meta_file))
    assert from_meta.config == from_hf.config == OURS[kind]
    assert fingerprint_meta == fingerprint_hf
    wav = audio(kind)
    bandwidth = OURS[kind].bandwidths[1]
    for a, b in zip(from_hf.encode(wav, bandwidth), from_meta.encode(wav, bandwidth), strict=True):
        assert torch.equal(a.codes, b.codes)


def test_bin_with_old_weight_norm_names_is_the_same_model(saved, tmp_path):
    """pytorch_model.bin as older transformers wrote it (weight_g / weight_v, as the hub's
    snapshots hold): loaded weights-only, same fingerprint as the safetensors copy."""
    reference, directory = saved("24khz")
    _, fingerprint = load_weights(checkpoint=str(directory))
    old = {k.replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v"): v
           for k, v in reference.state_dict().items()}
    assert any(k.endswith("weight_g") for k in old)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_bytes((directory / "config.json").read_bytes())
    torch.save(old, bin_dir / "pytorch_model.bin")
    model, fingerprint_bin = load_weights(checkpoint=str(bin_dir))
    assert fingerprint_bin == fingerprint
    wav = audio("24khz")
    assert torch.equal(model.encode(wav, 6.0)[0].codes, reference.encode(wav, bandwidth=6.0).audio_codes[0])


def fake_cache(root: Path, repo: str, snapshot: Path, revision: str = "0123abcd" * 5) -> Path:
    """A Hugging Face hub cache holding ``snapshot`` as ``repo``'s main revision."""
    folder = root / ("models--" + repo.replace("/", "--"))
    target = folder / "snapshots" / revision
    target.mkdir(parents=True)
    for item in snapshot.iterdir():
        (target / item.name).symlink_to(item)  # the hub links snapshots to blobs, like this
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return target


def test_hf_names_resolve_in_a_fake_cache_offline(saved, tmp_path, monkeypatch):
    _, directory = saved("24khz")
    target = fake_cache(tmp_path / "hub", "facebook/encodec_24khz", directory)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert snapshot_dir("hf:facebook/encodec_24khz") == target
    model, fingerprint = load_weights("hf:facebook/encodec_24khz")
    assert model.config == ENCODEC_24KHZ
    assert fingerprint == load_weights(checkpoint=str(directory))[1]
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # $HF_HOME/hub
    assert snapshot_dir("hf:facebook/encodec_24khz") == target
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache.*never downloads"):
        snapshot_dir("hf:facebook/encodec_48khz")
    with pytest.raises(WeightsError, match="not a Hugging Face model name"):
        snapshot_dir("hf:../../etc")


@pytest.mark.parametrize("changes, fragment", [
    ({"kernel_size": 5}, "kernel_size"),
    ({"codebook_dim": 64}, "codebook_dim"),
    ({"model_type": "wav2vec2"}, "not an EncodecModel"),
    ({"sampling_rate": "fast"}, "sample_rate"),
    ({"codebook_size": 1000}, "power of two"),
])
def test_bad_configs_are_refused_by_field(changes, fragment):
    with pytest.raises(WeightsError, match=fragment):
        config_from_hf({"model_type": "encodec", **changes}, "config.json")


def test_foreign_key_is_refused_in_one_line(saved, tmp_path):
    reference, directory = saved("24khz")
    from safetensors.torch import save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((directory / "config.json").read_bytes())
    save_file({**reference.state_dict(), "extra.weight": torch.zeros(2)}, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError, match="not a parameter of a transformers EncodecModel"):
        load_weights(checkpoint=str(bad))


def ecdc(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)


def test_cli_round_trip_with_a_directory_and_an_hf_name(saved, tmp_path):
    """compress --checkpoint DIR, decompress --model hf:... (the same weights from the fake
    cache), and ecdc models lists the cached snapshot."""
    reference, directory = saved("24khz")
    fake_cache(tmp_path / "hub", "facebook/encodec_24khz", directory)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "ECDC_CACHE_DIR": str(tmp_path / "ecdc_cache")}
    wav = test_signal(1.0, 24_000)
    src = tmp_path / "in.wav"
    soundfile.write(str(src), wav.T, 24_000, subtype="FLOAT")
    done = ecdc("compress", "-q", "-b", "6", "--checkpoint", directory, "-o", tmp_path / "x.ecdc", src, env=env)
    assert done.returncode == 0, done.stderr
    done = ecdc("decompress", "-q", "--model", "hf:facebook/encodec_24khz", "-o", tmp_path / "out.wav",
                tmp_path / "x.ecdc", env=env)
    assert done.returncode == 0, done.stderr
    decoded, rate = soundfile.read(str(tmp_path / "out.wav"), dtype="float32", always_2d=True)
    assert rate == 24_000 and decoded.shape[0] == wav.shape[1]
    with torch.no_grad():
        codes = reference.encode(torch.from_numpy(wav)[None], bandwidth=6.0).audio_codes
        expected = reference.decode(codes, [None]).audio_values[0, 0, :wav.shape[1]].numpy()
    assert np.abs(decoded[:, 0] - expected).max() < 1e-3  # through 32-bit float WAV and the streaming decoder
    listed = ecdc("models", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "hf:facebook/encodec_24khz" in listed.stdout
    missing = ecdc("compress", "-q", "--model", "hf:facebook/encodec_48khz", "-o", tmp_path / "y.ecdc", src, env=env)
    lines = [ln for ln in missing.stderr.splitlines() if ln.strip()]
    assert missing.returncode != 0 and len(lines) == 1 and lines[0].startswith("ecdc: error:"), missing.stderr
    assert "not in the local Hugging Face cache" in lines[0]


def test_32khz_files_record_11_bit_codes(saved):
    """The 32 kHz model's header says 11-bit codes, 4 codebooks at 2.2 kbps, 50 Hz frames,
    and its codes (up to 2047) survive the container bit for bit, densely packed."""
    from ecdc.codec import Codec
    from ecdc.container import CodeChunk, StereoMode, read_ecdc, write_ecdc

    _, directory = saved("32khz")
    model, fingerprint = load_weights(checkpoint=str(directory))
    header = Codec(model, fingerprint).header_for(2.2, StereoMode.MONO, 32_000, 1)
    assert (header.model_name, header.bits_per_code, header.num_codebooks, header.hop_length) == \
        ("encodec_32khz", 11, 4, 640)
    assert header.segment_length == 0 and not header.has_scale
    codes = model.encode(audio("32khz"), 2.2)[0].codes.numpy()
    codes[0, :3, 0] = (2047, 1024, 0)  # first frame, codebooks 0-2 (packed frame by frame); a top bit set
    data = write_ecdc(header, [CodeChunk(codes)], 32_000)
    got_header, chunks, total = read_ecdc(data)
    assert got_header == header and total == 32_000
    assert np.array_equal(chunks[0].codes, codes)
    payload = -(-codes.size * 11 // 8)
    assert payload < -(-codes.size * 16 // 8)
    assert data.find(bytes.fromhex("ff0720")) >= 0  # 2047, 1024, 0 at 11 bits each, LSB first (FORMAT.md §9)


def test_damaged_directory_contents_are_one_line_errors(saved, tmp_path):
    """A truncated model.safetensors, an oversized or invalid config.json, a directory
    without weights: each a WeightsError saying what is wrong, nothing allocated from them."""
    _, directory = saved("24khz")
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(WeightsError, match="a directory without config.json"):
        load_weights(checkpoint=str(bad))
    (bad / "config.json").write_bytes((directory / "config.json").read_bytes())
    with pytest.raises(WeightsError, match="without model.safetensors or pytorch_model.bin"):
        load_weights(checkpoint=str(bad))
    (bad / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_weights(checkpoint=str(bad))
    (bad / "config.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(WeightsError, match="not a model config"):
        load_weights(checkpoint=str(bad))
    (bad / "config.json").write_text("[" * 100_000)
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_weights(checkpoint=str(bad))


@pytest.mark.parametrize("kind", ["24khz", "48khz"])
def test_renamed_weights_load_strictly_into_metas_reference(saved, kind):
    """The names ecdc gives a transformers snapshot's tensors are Meta's own: they load
    strictly into Meta's reference EncodecModel (encodec 0.1.1), whose codes are then
    transformers' codes of the same weights."""
    from ecdc.hf import load_hf_checkpoint

    from refstub import import_encodec

    encodec = import_encodec()
    reference, directory = saved(kind)
    _, state_dict, _, _ = load_hf_checkpoint(directory)
    build = {"24khz": encodec.EncodecModel.encodec_model_24khz,
             "48khz": encodec.EncodecModel.encodec_model_48khz}[kind]
    meta = build(pretrained=False).eval()
    meta.load_state_dict(state_dict, strict=True)
    bandwidth = OURS[kind].bandwidths[0]
    meta.set_target_bandwidth(bandwidth)
    wav = audio(kind)
    with torch.no_grad():
        frames = meta.encode(wav)
        theirs = reference.encode(wav, bandwidth=bandwidth).audio_codes
    assert len(frames) == theirs.shape[0]
    for i, (codes, _) in enumerate(frames):
        assert torch.equal(codes, theirs[i, ..., :codes.shape[-1]])


def test_cli_refuses_the_32khz_model_in_one_line_until_it_streams(saved, tmp_path):
    """compress streams in bounded memory, which ecdc's engines cannot do yet for a
    non-causal unsegmented model: one error line, no output, no traceback."""
    _, directory = saved("32khz")
    src = tmp_path / "in.wav"
    soundfile.write(str(src), test_signal(0.5, 32_000).T, 32_000)
    done = ecdc("compress", "-q", "-b", "2.2", "--checkpoint", directory, "-o", tmp_path / "x.ecdc", src, env={})
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("ecdc: error:"), done.stderr
    assert "streaming needs a causal or a segmented model" in lines[0]
    assert not (tmp_path / "x.ecdc").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.wav"]
