"""Validation metrics for codec training (computed without gradients)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn import functional as F

from ecdc.train.losses import MelSpectrogram


def _check_audio_pair(reference: Tensor, estimate: Tensor, what: str) -> None:
    if reference.dim() != 3:
        raise ValueError(f"{what}: expected [B, C, T] audio, got {tuple(reference.shape)}")
    if reference.shape != estimate.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(reference.shape)} vs {tuple(estimate.shape)}")


@torch.no_grad()
def si_sdr(reference: Tensor, estimate: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant SDR in dB, ``[B, C, T]`` -> ``[B]`` (averaged over channels).

    Both signals are made zero-mean along time; the SI-SDR
    ``10 log10(||a r||^2 / ||e - a r||^2)`` with ``a = <e, r> / ||r||^2`` is computed
    in its equivalent form ``10 log10(rho^2 / (1 - rho^2))``, ``rho`` the normalised
    correlation of ``r`` and ``e``, in float64. That form is exactly invariant to the
    scale of either signal (a fixed absolute ``eps`` would not be: it caps ``0.5 * r``
    6 dB below ``r``), and ``eps`` regularises both terms, so results lie within about
    ``+-10 log10(1 / eps)`` (+-80 dB for the default): a perfect estimate gives ~+80 dB,
    a silent reference or estimate ~-80 dB.
    """
    _check_audio_pair(reference, estimate, "si_sdr")
    ref = reference.double()
    est = estimate.double()
    ref = ref - ref.mean(dim=-1, keepdim=True)
    est = est - est.mean(dim=-1, keepdim=True)
    dot = (ref * est).sum(dim=-1)
    energy = ref.square().sum(dim=-1) * est.square().sum(dim=-1)
    rho_sq = dot.square() / energy.clamp_min(torch.finfo(torch.float64).tiny)
    rho_sq = rho_sq.clamp(0.0, 1.0)
    sdr = 10.0 * torch.log10((rho_sq + eps) / (1.0 - rho_sq + eps))
    return sdr.mean(dim=1).to(reference.dtype if reference.is_floating_point() else torch.float32)


@functools.lru_cache(maxsize=32)
def _log_mel(sample_rate: int, n_fft: int, n_mels: int) -> MelSpectrogram:
    # Cached on the CPU; MelSpectrogram moves its small buffers to the input's device per call.
    return MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels, power=1.0, log=True)


@torch.no_grad()
def mel_distance(
    reference: Tensor,
    estimate: Tensor,
    sample_rate: int,
    n_mels: int = 64,
    min_exp: int = 5,
    max_exp: int = 11,
) -> Tensor:
    """Multi-scale log-mel L1 distance, a scalar (lower is better, 0 for identical audio).

    The mean over windows ``2^min_exp .. 2^max_exp`` (hop = window / 4) of the mean
    absolute difference between ``log10(1e-5 + S)`` of the two signals, ``S`` the same
    normalised-STFT magnitude mel spectrogram as ``MultiScaleMelLoss`` uses, with
    ``n_mels`` HTK bands from 0 Hz to Nyquist. Log-mels make it track perceived spectral
    error at every loudness, unlike the training loss's linear L1 term; the floor
    (-100 dB) keeps digital silence from dominating.
    """
    _check_audio_pair(reference, estimate, "mel_distance")
    if not 1 <= min_exp <= max_exp:
        raise ValueError(f"need 1 <= min_exp <= max_exp, got {min_exp}, {max_exp}")
    ref = reference.float()
    est = estimate.float()
    total = ref.new_zeros(())
    for exp in range(min_exp, max_exp + 1):
        mel = _log_mel(int(sample_rate), 2**exp, n_mels)
        total = total + F.l1_loss(mel(ref), mel(est))
    return total / (max_exp - min_exp + 1)
