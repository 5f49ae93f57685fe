"""Shared fixtures: tiny models with random weights and generated audio (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile
import torch

from ecdc.models.encodec import EncodecConfig, EncodecModel

TINY_MONO = EncodecConfig(
    name="tiny_mono", sample_rate=24000, channels=1, causal=True, norm="weight_norm",
    bandwidths=(1.5, 3.0, 6.0, 12.0, 24.0), normalize=False, segment=None,
    n_filters=4, dimension=16, lstm_layers=1,
)
TINY_STEREO = EncodecConfig(
    name="tiny_stereo", sample_rate=48000, channels=2, causal=False, norm="time_group_norm",
    bandwidths=(3.0, 6.0, 12.0, 24.0), normalize=True, segment=1.0,
    n_filters=4, dimension=16, lstm_layers=1,
)


def random_model(config: EncodecConfig, seed: int = 0) -> EncodecModel:
    """A model with random weights and random (so non-degenerate) codebooks."""
    torch.manual_seed(seed)
    model = EncodecModel(config)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("_codebook.embed"):
            value.copy_(torch.randn_like(value) * 0.1)
        elif key.endswith("_codebook.embed_avg"):
            value.copy_(state[key[: -len("_avg")]])
        elif key.endswith("_codebook.inited"):
            value.fill_(1)
    model.load_state_dict(state)
    return model.eval()


def save_checkpoint(model: EncodecModel, path: Path) -> Path:
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, str(path))
    return path


def test_signal(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: a few harmonics with vibrato plus a little noise, [C, T]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = []
    for c in range(channels):
        f0 = 140.0 * (1 + 0.3 * c) * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        sig = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6))
        out.append(sig + 0.01 * rng.standard_normal(t.shape))
    return np.asarray(out, dtype=np.float32)


test_signal.__test__ = False  # not a test despite the name


def run_as_nobody(action: Callable[[], str]) -> str:
    """``action()`` in a forked child that dropped root (user and group 65534); its
    result, or the exception it raised as "Type: message". Root ignores file modes, so
    permission tests need this."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                result = action()
            except BaseException as exc:
                result = f"{type(exc).__name__}: {exc}"
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture(scope="session")
def tiny_mono_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(random_model(TINY_MONO), tmp_path_factory.mktemp("ckpt") / "tiny_mono.th")


@pytest.fixture(scope="session")
def tiny_stereo_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(random_model(TINY_STEREO, seed=1), tmp_path_factory.mktemp("ckpt") / "tiny_stereo.th")


@pytest.fixture
def wav_file(tmp_path) -> Path:
    """A 1.3 s 16-bit stereo wav at 44.1 kHz (so resampling and downmix are exercised)."""
    path = tmp_path / "in.wav"
    soundfile.write(str(path), test_signal(1.3, 44100, channels=2).T, 44100, subtype="PCM_16")
    return path


def write_config_sidecar(config: EncodecConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict()))
