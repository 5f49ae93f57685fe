"""Tests for ecdc.train.losses (reconstruction, adversarial, feature matching) and ecdc.train.metrics."""

from __future__ import annotations

import math

import pytest
import torch

from ecdc.train.losses import (
    MelSpectrogram,
    MultiScaleMelLoss,
    complex_stft,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    time_l1,
)
from ecdc.train.metrics import mel_distance, si_sdr

SR = 24000


def _audio(batch: int = 2, channels: int = 1, length: int = 4800, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, channels, length, generator=gen)


# --------------------------------------------------------------------------- time L1


def test_time_l1() -> None:
    x = _audio()
    assert time_l1(x, x).item() == 0.0
    assert time_l1(x, x + 0.25).item() == pytest.approx(0.25, rel=1e-5)
    with pytest.raises(ValueError):
        time_l1(x, x[..., :-1])


# --------------------------------------------------------------------------- mel scale / filterbank


def test_htk_mel_scale() -> None:
    assert hz_to_mel(0.0) == 0.0
    assert hz_to_mel(700.0) == pytest.approx(2595.0 * math.log10(2.0))
    assert mel_to_hz(hz_to_mel(1234.5)) == pytest.approx(1234.5)
    freqs = torch.tensor([0.0, 100.0, 8000.0], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(freqs)), freqs)


def test_mel_filterbank_rows_and_columns() -> None:
    n_fft, n_mels = 2048, 64
    fb = mel_filterbank(SR, n_fft, n_mels).double()
    assert fb.shape == (n_mels, n_fft // 2 + 1)
    assert fb.min() >= 0 and fb.max() <= 1
    # Every filter sees some bins at this resolution, and its row sum is its half-width in bins.
    edges = mel_to_hz(torch.linspace(0, hz_to_mel(SR / 2), n_mels + 2, dtype=torch.float64))
    bin_hz = (SR / 2) / (n_fft // 2)
    half_width_bins = (edges[2:] - edges[:-2]) / 2 / bin_hz
    assert (fb.sum(dim=1) > 0).all()
    wide = half_width_bins > 4  # narrow triangles are sampled too coarsely for a tight check
    torch.testing.assert_close(fb.sum(dim=1)[wide], half_width_bins[wide], rtol=0.05, atol=0)
    # Triangles overlap into a partition of unity between the first and last centre.
    freqs = torch.linspace(0, SR / 2, n_fft // 2 + 1, dtype=torch.float64)
    inside = (freqs >= edges[1]) & (freqs <= edges[-2])
    torch.testing.assert_close(fb.sum(dim=0)[inside], torch.ones(int(inside.sum()), dtype=torch.float64))
    # Each filter peaks at its centre frequency.
    peak_hz = freqs[fb.argmax(dim=1)]
    assert ((peak_hz - edges[1:-1]).abs() < bin_hz).all()


def test_mel_filterbank_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError):
        mel_filterbank(SR, 512, 64, f_min=100.0, f_max=50.0)
    with pytest.raises(ValueError):
        mel_filterbank(SR, 512, 64, f_max=SR)


# --------------------------------------------------------------------------- STFT / MelSpectrogram


def test_complex_stft_frames_and_normalisation() -> None:
    x = _audio(length=4000)
    window = torch.hann_window(256)
    centred = complex_stft(x, 256, 64, window)
    assert centred.shape == (2, 1, 129, 1 + 4000 // 64)
    uncentred = complex_stft(x, 256, 64, window, center=False)
    assert uncentred.shape == (2, 1, 129, 1 + (4000 - 256) // 64)
    # White noise of variance s^2 has E|X_k|^2 = s^2 per bin once normalised by sqrt(sum w^2).
    noise = torch.randn(1, 1, 200_000, generator=torch.Generator().manual_seed(1))
    power = complex_stft(noise, 256, 64, window).abs().square()[..., 1:-1, :].mean()
    assert power.item() == pytest.approx(1.0, rel=0.03)
    # Too short to reflect-pad: falls back to zeros rather than failing.
    assert complex_stft(torch.randn(1, 1, 100), 2048, 512, torch.hann_window(2048)).shape == (1, 1, 1025, 1)


def test_mel_spectrogram_of_a_pure_tone_peaks_in_its_band() -> None:
    n_fft, n_mels = 2048, 64
    mel = MelSpectrogram(SR, n_fft=n_fft, n_mels=n_mels)
    edges = mel_to_hz(torch.linspace(0, hz_to_mel(SR / 2), n_mels + 2, dtype=torch.float64))
    t = torch.arange(SR) / SR
    for band in (10, 30, 50):
        freq = float(edges[band + 1])  # the centre of mel band `band`
        tone = torch.sin(2 * math.pi * freq * t).reshape(1, 1, -1)
        spec = mel(tone)
        assert spec.shape == (1, 1, n_mels, 1 + SR // (n_fft // 4))
        assert int(spec[0, 0, :, 5:-5].mean(dim=-1).argmax()) == band


def test_mel_spectrogram_power_and_log() -> None:
    x = _audio()
    power = MelSpectrogram(SR, n_fft=512, power=2.0)(x)
    magnitude = MelSpectrogram(SR, n_fft=512, power=1.0)(x)
    assert power.shape == magnitude.shape == (2, 1, 64, 1 + 4800 // 128)
    assert (power >= 0).all() and (magnitude >= 0).all()
    logged = MelSpectrogram(SR, n_fft=512, power=1.0, log=True, floor=1e-5)(x)
    torch.testing.assert_close(logged, torch.log10(magnitude + 1e-5))


# --------------------------------------------------------------------------- multi-scale mel loss


def test_multiscale_mel_loss_zero_for_identical_and_grows_with_noise() -> None:
    loss = MultiScaleMelLoss(SR)
    assert len(loss.mels) == 7 and [m.n_fft for m in loss.mels] == [2**i for i in range(5, 12)]
    assert all(m.hop_length == m.n_fft // 4 for m in loss.mels)
    x = _audio(length=6000)
    assert loss(x, x.clone()).item() == 0.0
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    values = [loss(x, x + level * noise).item() for level in (0.001, 0.01, 0.1, 0.5)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 0


def test_multiscale_mel_loss_convention_and_gradient() -> None:
    x = _audio(channels=2, length=3000)
    y = _audio(channels=2, length=3000, seed=5)
    loss = MultiScaleMelLoss(SR, n_mels=32, min_exp=6, max_exp=8)
    expected = 0.0
    for mel in loss.mels:
        sx, sy = mel(x), mel(y)
        l1 = (sx - sy).abs().mean()
        l2 = (torch.log10(sx + 1e-5) - torch.log10(sy + 1e-5)).square().mean()
        expected += (l1 + l2).item() / 3
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-5)
    literal = MultiScaleMelLoss(SR, n_mels=32, min_exp=6, max_exp=8, log_l2=False)
    expected_literal = sum(
        ((m(x) - m(y)).abs().mean() + (m(x) - m(y)).square().mean()).item() for m in literal.mels
    ) / 3
    assert literal(x, y).item() == pytest.approx(expected_literal, rel=1e-5)
    y.requires_grad_(True)
    loss(x, y).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_multiscale_mel_loss_gradient_is_finite_on_silence() -> None:
    x = torch.zeros(1, 1, 2000)
    y = torch.zeros(1, 1, 2000, requires_grad=True)
    MultiScaleMelLoss(SR)(x, y).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


# --------------------------------------------------------------------------- adversarial


def test_hinge_losses_on_hand_picked_logits() -> None:
    real = [torch.tensor([2.0, 0.5])]
    fake = [torch.tensor([-2.0, 0.5])]
    # relu(1 - [2, .5]) = [0, .5] -> .25 ; relu(1 + [-2, .5]) = [0, 1.5] -> .75
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(1.0)
    # relu(1 - [-2, .5]) = [3, .5] -> 1.75
    assert hinge_generator_loss(fake).item() == pytest.approx(1.75)
    # Two scales: the mean over scales, each scale a mean over its own elements.
    real2 = real + [torch.tensor([[0.0, 0.0, 0.0]])]  # relu(1 - 0) = 1
    fake2 = fake + [torch.tensor([[3.0, -1.0, -3.0]])]  # relu(1 + .) = [4, 0, 0] -> 4/3
    assert hinge_discriminator_loss(real2, fake2).item() == pytest.approx((1.0 + 1.0 + 4 / 3) / 2)
    # generator: relu(1 - [3, -1, -3]) = [0, 2, 4] -> 2
    assert hinge_generator_loss(fake2).item() == pytest.approx((1.75 + 2.0) / 2)
    # Confident, correct discriminator: zero loss.
    assert hinge_discriminator_loss([torch.tensor([1.5, 3.0])], [torch.tensor([-1.0, -4.0])]).item() == 0.0
    with pytest.raises(ValueError):
        hinge_discriminator_loss(real2, fake)
    with pytest.raises(ValueError):
        hinge_generator_loss([])


def test_feature_matching_on_hand_made_maps() -> None:
    real = [[torch.tensor([1.0, -3.0]), torch.tensor([[2.0, 2.0]])], [torch.tensor([4.0])]]
    assert feature_matching_loss(real, [[t.clone() for t in s] for s in real]).item() == 0.0
    fake = [[torch.tensor([2.0, -1.0]), torch.tensor([[2.0, 0.0]])], [torch.tensor([2.0])]]
    # scale 0: mean|.| = [1, 2] -> 1.5 over mean|real| 2 -> .75 ; [0, 2] -> 1 over 2 -> .5
    # scale 1: 2 / 4 -> .5 ; mean over the three (scale, layer) terms
    expected = (0.75 + 0.5 + 0.5) / 3
    assert feature_matching_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # Relative: scaling both sides leaves it unchanged.
    scaled_real = [[100 * t for t in s] for s in real]
    scaled_fake = [[100 * t for t in s] for s in fake]
    assert feature_matching_loss(scaled_real, scaled_fake).item() == pytest.approx(expected, rel=1e-6)


def test_feature_matching_detaches_real_features() -> None:
    real = torch.tensor([1.0, 2.0], requires_grad=True)
    fake = torch.tensor([0.0, 0.0], requires_grad=True)
    feature_matching_loss([[real]], [[fake]]).backward()
    assert real.grad is None
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        feature_matching_loss([[real]], [[fake, fake]])


# --------------------------------------------------------------------------- metrics


def test_si_sdr_identity_and_scale_invariance() -> None:
    ref = _audio(batch=3, channels=2, length=8000)
    same = si_sdr(ref, ref.clone())
    assert same.shape == (3,)
    assert (same > 70).all()
    torch.testing.assert_close(si_sdr(ref, 0.5 * ref), same, atol=0.1, rtol=0)
    torch.testing.assert_close(si_sdr(ref, 3.0 * ref + 0.2), same, atol=0.1, rtol=0)  # offset removed too


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_si_sdr_matches_a_known_snr(snr_db: float) -> None:
    gen = torch.Generator().manual_seed(7)
    ref = torch.randn(2, 1, 32000, generator=gen)
    noise = torch.randn(2, 1, 32000, generator=gen)
    ref = ref - ref.mean(-1, keepdim=True)
    noise = noise - noise.mean(-1, keepdim=True)
    gain = (ref.square().sum(-1, keepdim=True) / noise.square().sum(-1, keepdim=True) / 10 ** (snr_db / 10)).sqrt()
    measured = si_sdr(ref, ref + gain * noise)
    assert (measured - snr_db).abs().max().item() < 0.5, measured


def test_si_sdr_of_silence_is_finite() -> None:
    ref = _audio()
    assert torch.isfinite(si_sdr(ref, torch.zeros_like(ref))).all()
    assert (si_sdr(ref, torch.zeros_like(ref)) < -70).all()


def test_mel_distance() -> None:
    ref = _audio(length=6000)
    assert mel_distance(ref, ref.clone(), SR).item() == 0.0
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
    small = mel_distance(ref, ref + 0.01 * noise, SR)
    large = mel_distance(ref, ref + 0.1 * noise, SR)
    assert small.dim() == 0 and 0 < small.item() < large.item()
    with torch.enable_grad():
        est = (ref + 0.1 * noise).requires_grad_(True)
        assert not mel_distance(ref, est, SR).requires_grad
