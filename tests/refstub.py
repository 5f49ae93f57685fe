"""Meta's reference EnCodec (``encodec==0.1.1``) for tests: no torchaudio, no downloads.

``import encodec`` pulls in torchaudio at import time only (for helpers we never call), so a
bare stand-in module is registered when the real one is missing. torchaudio is never a
dependency of ecdc.

The reference's codebooks stay all-zero until k-means runs on a first training batch; with
such a model every code is 0 and parity would prove nothing. :func:`make_reference_model`
therefore fills each stage's codebook with vectors drawn from that stage's residual on
random audio, the way k-means initialisation would seed it.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
import warnings

import torch

REFERENCE_NAMES = ("encodec_24khz", "encodec_48khz")


def install_torchaudio_stub() -> None:
    """Put an empty ``torchaudio`` module in ``sys.modules`` unless the real one imports."""
    if "torchaudio" in sys.modules:
        return
    try:
        importlib.import_module("torchaudio")
    except ImportError:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")


def import_encodec() -> types.ModuleType:
    """The reference ``encodec`` package (skips the calling test module if absent)."""
    install_torchaudio_stub()
    import pytest

    return pytest.importorskip("encodec")


def make_test_audio(sample_rate: int, channels: int, num_samples: int, batch: int = 1,
                    seed: int = 0) -> torch.Tensor:
    """``[batch, channels, num_samples]`` float32: a chirp, modulated sines and noise.

    Varied enough over time that the codes of a random-weight model are diverse.
    """
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    out = torch.zeros(batch, channels, num_samples, dtype=torch.float64)
    nyquist = sample_rate / 2
    for b in range(batch):
        for c in range(channels):
            f0 = 100 + 300 * torch.rand((), generator=gen, dtype=torch.float64)
            f1 = min(8000.0, 0.4 * nyquist)
            duration = max(num_samples / sample_rate, 1e-3)
            # linear chirp f0 -> f1 over the clip
            phase = 2 * math.pi * (f0 * t + (f1 - f0) / (2 * duration) * t ** 2)
            sig = 0.3 * torch.sin(phase)
            for _ in range(4):
                f = 50 + 4000 * torch.rand((), generator=gen, dtype=torch.float64)
                am = 0.5 + 0.5 * torch.sin(2 * math.pi * (0.5 + 3 * torch.rand((), generator=gen)) * t)
                sig = sig + 0.15 * am * torch.sin(2 * math.pi * f * t + 6.28 * torch.rand((), generator=gen))
            sig = sig + 0.05 * torch.randn(num_samples, generator=gen, dtype=torch.float64)
            out[b, c] = sig
    return out.float()


@torch.no_grad()
def init_reference_codebooks(model, seed: int, seconds: float = 4.0, batch: int = 0) -> None:
    """Seed every RVQ stage of a reference model from its own residuals on random audio.

    Stage i's codebook is ``bins`` residual vectors (left after stages < i) picked at random,
    with a little noise so repeats differ. The residual handed to the next stage is computed
    leave-one-out (a vector may not pick the code copied from itself): otherwise it would be
    just that noise, deep codebooks would shrink far below the residuals of unseen audio
    and every deep code would be the same. ``embed_avg`` = ``embed``, ``cluster_size`` =
    vectors won per code, ``inited`` = 1, as after Meta's k-means initialisation.
    """
    gen = torch.Generator().manual_seed(seed)
    if batch <= 0:
        # at least 1200 frames, so codes are drawn from more vectors than they number
        batch = max(1, math.ceil(1200 / (seconds * model.frame_rate)))
    wav = make_test_audio(model.sample_rate, model.channels, int(seconds * model.sample_rate),
                          batch=batch, seed=seed + 1)
    if model.normalize:
        wav = wav / (1e-8 + wav.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt())
    latent = model.encoder(wav)  # [B, D, T]
    samples = latent.transpose(1, 2).reshape(-1, latent.shape[1])  # [N, D]
    n = samples.shape[0]
    for layer in model.quantizer.vq.layers:
        book = layer._codebook
        bins = book.codebook_size
        if n >= bins:
            idx = torch.randperm(n, generator=gen)[:bins]
        else:
            idx = torch.randint(0, n, (bins,), generator=gen)
        spread = samples.std(dim=0, keepdim=True)
        embed = samples[idx] + 0.01 * spread * torch.randn(bins, samples.shape[1], generator=gen)
        dist = -(samples.pow(2).sum(1, keepdim=True) - 2 * samples @ embed.t()
                 + embed.pow(2).sum(1)[None, :])
        dist[idx, torch.arange(bins)] = -math.inf  # leave-one-out
        codes = dist.argmax(dim=-1)
        book.embed.copy_(embed)
        book.embed_avg.copy_(embed)
        book.cluster_size.copy_(torch.bincount(codes, minlength=bins).float())
        book.inited.fill_(1.0)
        samples = samples - embed[codes]


def make_reference_model(name: str, seed: int):
    """Meta's ``encodec.EncodecModel`` for ``name`` with seeded random weights and seeded,
    non-trivial codebooks, in eval mode. Leaves the global RNG state untouched."""
    encodec = import_encodec()
    builders = {
        "encodec_24khz": encodec.EncodecModel.encodec_model_24khz,
        "encodec_48khz": encodec.EncodecModel.encodec_model_48khz,
    }
    if name not in builders:
        raise ValueError(f"unknown reference model {name!r}; expected one of {', '.join(builders)}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # the reference uses the deprecated torch.nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(seed)
        model = builders[name](pretrained=False)  # pretrained=False: builds only, no download
    model.name = name
    model.eval()
    init_reference_codebooks(model, seed)
    return model
