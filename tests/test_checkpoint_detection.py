"""A bare state dict's architecture is recognised from its keys and shapes (issue 13, item 2).

Meta's checkpoints hold no config, so ``--checkpoint weights.th`` used to work only under a
registered model's file name or beside a ``.json`` sidecar. Meta's 24 kHz and 48 kHz layouts
differ (channels, norm, number of codebooks), so the weights say which one they are; a state
dict of neither gets one line saying what it holds and what is closest.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from ecdc import weights
from ecdc.codec import Codec, EncodedAudio
from ecdc.errors import WeightsError
from ecdc.models.encodec import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecConfig

from conftest import random_model, test_signal, write_config_sidecar

REPO = Path(__file__).resolve().parents[1]


def meta_state_dict(config: EncodecConfig, seed: int) -> dict[str, torch.Tensor]:
    """Meta's layout of ``config`` with seeded random weights and random codebooks.

    From Meta's reference EnCodec (``tests/refstub.py``) when it is installed, so the keys
    are truly Meta's; else from ecdc's model, whose keys are the same (it loads Meta's files).
    Fills the codebooks directly rather than by refstub's k-means-like seeding, which would
    take seconds for a layout test.
    """
    import refstub

    refstub.install_torchaudio_stub()
    try:
        import encodec
    except ImportError:
        return {k: v.clone() for k, v in random_model(config, seed).state_dict().items()}
    builder = {"encodec_24khz": encodec.EncodecModel.encodec_model_24khz,
               "encodec_48khz": encodec.EncodecModel.encodec_model_48khz}[config.name]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the reference's deprecated weight_norm
        torch.manual_seed(seed)
        model = builder(pretrained=False)
        with torch.no_grad():
            for layer in model.quantizer.vq.layers:
                book = layer._codebook
                book.embed.copy_(torch.randn_like(book.embed) * 0.1)
                book.embed_avg.copy_(book.embed)
                book.cluster_size.fill_(1.0)
                book.inited.fill_(1.0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def meta_files(tmp_path_factory) -> dict[str, Path]:
    """Meta-layout checkpoints of both models under names that say nothing, no sidecars."""
    directory = tmp_path_factory.mktemp("meta")
    files = {}
    for config, name, seed in ((ENCODEC_24KHZ, "some_odd_name.bin", 11), (ENCODEC_48KHZ, "weights.th", 12)):
        path = directory / name
        torch.save(meta_state_dict(config, seed), str(path))
        files[config.name] = path
    return files


def _codes(codec: Codec, signal: np.ndarray, rate: int) -> list[np.ndarray]:
    return [chunk.codes for chunk in codec.encode(signal, rate, bandwidth=6.0).chunks]


@pytest.mark.parametrize("config", [ENCODEC_24KHZ, ENCODEC_48KHZ], ids=lambda c: c.name)
def test_meta_state_dict_is_recognised_under_any_name(meta_files, config):
    path = meta_files[config.name]
    assert not path.with_suffix(".json").exists()
    detected, fingerprint = weights.load_weights(checkpoint=str(path))
    named, named_fingerprint = weights.load_weights(config.name, checkpoint=str(path))
    assert detected.config == named.config == config
    assert fingerprint == named_fingerprint
    signal = test_signal(0.4, config.sample_rate, channels=config.channels, seed=3)
    codes = _codes(Codec(detected, fingerprint), signal, config.sample_rate)
    assert len(np.unique(np.concatenate([c.ravel() for c in codes]))) > 1  # not a degenerate model
    expected = _codes(Codec(named, named_fingerprint), signal, config.sample_rate)
    assert len(codes) == len(expected) and all(np.array_equal(a, b) for a, b in zip(codes, expected))


def test_inference_only_state_dict_is_recognised():
    """Without the codebooks' training statistics (as ecdc's releases store them)."""
    state = weights.inference_state_dict(random_model(ENCODEC_24KHZ, 2).state_dict())
    assert weights.detect_config(state, "x") == ENCODEC_24KHZ


def _one_line_error(path: Path, **kw) -> str:
    with pytest.raises(WeightsError) as info:
        weights.load_weights(checkpoint=str(path), **kw)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def _foreign(directory: Path) -> Path:
    """A resnet-like state dict of random tensors."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,),
              "layer1.0.conv1.weight": (64, 64, 3, 3), "fc.weight": (1000, 512), "fc.bias": (1000,)}
    state = {key: torch.randn(*shape, generator=gen) for key, shape in shapes.items()}
    path = directory / "resnet.pth"
    torch.save(state, str(path))
    return path


def test_foreign_state_dict_is_one_line_saying_what_it_holds(tmp_path):
    message = _one_line_error(_foreign(tmp_path))
    assert "a state dict of 6 tensors that matches no known EnCodec layout" in message
    assert "shares no key with encodec_24khz or encodec_48khz" in message
    assert "--model" in message


def test_reshaped_tensor_is_named_with_the_closest_layout(tmp_path, meta_files):
    state = torch.load(str(meta_files["encodec_24khz"]), weights_only=True)
    key = "decoder.model.15.conv.conv.weight_v"
    state[key] = state[key].reshape(-1)
    path = tmp_path / "almost.th"
    torch.save(state, str(path))
    message = _one_line_error(path)
    assert f"a state dict of {len(state)} tensors that matches no known EnCodec layout" in message
    assert f"(closest: encodec_24khz, 1 shape differs, e.g. {key} is [224], expected [1, 32, 7])" in message
    assert "--model" in message


def test_missing_tensor_is_counted(tmp_path, meta_files):
    state = torch.load(str(meta_files["encodec_48khz"]), weights_only=True)
    del state["quantizer.vq.layers.15._codebook.embed"], state["encoder.model.0.conv.norm.bias"]
    path = tmp_path / "short.th"
    torch.save(state, str(path))
    assert "(closest: encodec_48khz, 2 keys missing, e.g. no encoder.model.0.conv.norm.bias)" in _one_line_error(path)


def test_explicit_model_wins_but_must_fit(meta_files):
    message = _one_line_error(meta_files["encodec_24khz"], name="encodec_48khz")
    assert "do not fit model 'encodec_48khz'" in message


def test_embedded_config_and_sidecar_win_over_detection(tmp_path, meta_files):
    state = torch.load(str(meta_files["encodec_24khz"]), weights_only=True)
    embedded = dataclasses.replace(ENCODEC_24KHZ, name="my_24khz")
    torch.save({"config": embedded.to_dict(), "state_dict": state}, str(tmp_path / "own.th"))
    assert weights.load_weights(checkpoint=str(tmp_path / "own.th"))[0].config == embedded
    torch.save(state, str(tmp_path / "bare.th"))
    beside = dataclasses.replace(ENCODEC_24KHZ, name="sidecar_24khz")
    write_config_sidecar(beside, tmp_path / "bare.json")
    assert weights.load_weights(checkpoint=str(tmp_path / "bare.th"))[0].config == beside


def test_weights_win_over_a_misleading_file_name(tmp_path, meta_files):
    path = tmp_path / "encodec_48khz.th"
    path.write_bytes(meta_files["encodec_24khz"].read_bytes())
    assert weights.load_weights(checkpoint=str(path))[0].config == ENCODEC_24KHZ


def test_what_is_not_a_state_dict_keeps_its_errors(tmp_path):
    torch.save([torch.zeros(1)], str(tmp_path / "list.th"))
    assert "checkpoint is not a state dict" in _one_line_error(tmp_path / "list.th")
    torch.save({"a": 1}, str(tmp_path / "dict.th"))
    assert "neither a state dict nor ecdc's checkpoint layout" in _one_line_error(tmp_path / "dict.th")


def _ecdc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ecdc", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_round_trip_with_meta_weights_under_an_odd_name(tmp_path, meta_files):
    path = meta_files["encodec_24khz"]
    wav, ecdc_file, out = tmp_path / "x.wav", tmp_path / "y.ecdc", tmp_path / "z.wav"
    signal = test_signal(0.6, 24000, seed=5)
    soundfile.write(str(wav), signal.T, 24000, subtype="FLOAT")
    done = _ecdc("compress", str(wav), "--checkpoint", str(path), "-o", str(ecdc_file))
    assert done.returncode == 0, done.stderr[-2000:]
    done = _ecdc("decompress", str(ecdc_file), "--checkpoint", str(path), "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    decoded, rate = soundfile.read(str(out), always_2d=True)
    assert rate == 24000 and decoded.shape[0] == signal.shape[1]

    with open(ecdc_file, "rb") as f:
        written = EncodedAudio.read(f)
    assert written.header.model_name == "encodec_24khz"
    model, fingerprint = weights.load_weights("encodec_24khz", checkpoint=str(path))
    assert written.header.weights_fingerprint == fingerprint
    expected = _codes(Codec(model, fingerprint), signal, 24000)
    got = [chunk.codes for chunk in written.chunks]
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_cli_foreign_state_dict_is_one_error_line(tmp_path):
    path = _foreign(tmp_path)
    wav = tmp_path / "x.wav"
    soundfile.write(str(wav), test_signal(0.2, 24000).T, 24000)
    done = _ecdc("compress", str(wav), "--checkpoint", str(path), "-o", str(tmp_path / "y.ecdc"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecdc: error: "), done.stderr[-2000:]
    assert "matches no known EnCodec layout" in lines[0] and "--model" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "y.ecdc").exists()
