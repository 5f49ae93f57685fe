"""EnCodec's training losses (Défossez et al. 2022, section 3.4).

* ``time_l1``: the time-domain reconstruction term l_t.
* ``MultiScaleMelLoss``: the frequency-domain term l_f over mel spectrograms with windows
  2^5 .. 2^11 samples.
* ``hinge_discriminator_loss`` / ``hinge_generator_loss``: the adversarial terms of the
  multi-scale STFT discriminator (``ecdc.train.discriminator``).
* ``feature_matching_loss``: the relative feature-matching term l_feat.

torchaudio is not a dependency, so the mel filterbank and the STFT framing live here too
(``mel_filterbank``, ``complex_stft``, ``MelSpectrogram``); the discriminator and the
validation metrics reuse them.
"""

from __future__ import annotations

import math
from typing import overload

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# --------------------------------------------------------------------------- mel scale


@overload
def hz_to_mel(freq: float) -> float: ...
@overload
def hz_to_mel(freq: Tensor) -> Tensor: ...
def hz_to_mel(freq: float | Tensor) -> float | Tensor:
    """HTK mel scale, ``2595 log10(1 + f / 700)`` (torchaudio's default ``mel_scale="htk"``)."""
    if isinstance(freq, Tensor):
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    return 2595.0 * math.log10(1.0 + freq / 700.0)


@overload
def mel_to_hz(mel: float) -> float: ...
@overload
def mel_to_hz(mel: Tensor) -> Tensor: ...
def mel_to_hz(mel: float | Tensor) -> float | Tensor:
    """Inverse of ``hz_to_mel``."""
    if isinstance(mel, Tensor):
        return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Triangular mel filters as a ``[n_mels, n_fft // 2 + 1]`` float32 matrix (rows = filters).

    Same construction as torchaudio's ``melscale_fbanks(norm=None, mel_scale="htk")``:
    ``n_mels + 2`` edges equally spaced in mel between ``f_min`` and ``f_max``, filter ``m``
    rising linearly (in Hz) from edge ``m`` to 1 at edge ``m + 1`` and falling back to 0 at
    edge ``m + 2``. Filters are not area-normalised, so between the first and the last
    centre frequency the filters sum to exactly 1 at every FFT bin (a partition of unity),
    and a filter's row sum is its half-width in FFT bins. With few FFT bins and many mels
    (e.g. a 32-sample window) some low filters fall between bins and are all zero; that is
    harmless for a loss (they contribute 0 on both sides) and torchaudio does the same.
    The FFT bin frequencies are ``linspace(0, sample_rate / 2, n_fft // 2 + 1)``.
    """
    if sample_rate <= 0 or n_fft <= 0 or n_mels <= 0:
        raise ValueError(f"sample_rate, n_fft and n_mels must be positive, got {sample_rate}, {n_fft}, {n_mels}")
    nyquist = sample_rate / 2
    f_max = nyquist if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= nyquist:
        raise ValueError(f"need 0 <= f_min < f_max <= {nyquist}, got f_min={f_min}, f_max={f_max}")
    freqs = torch.linspace(0.0, nyquist, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(float(f_min)), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    return torch.minimum(rising, falling).clamp_min(0.0).to(torch.float32)


# --------------------------------------------------------------------------- STFT


def complex_stft(
    x: Tensor,
    n_fft: int,
    hop_length: int,
    window: Tensor,
    *,
    center: bool = True,
    normalized: bool = True,
) -> Tensor:
    """Complex STFT of ``[..., T]`` as ``[..., n_fft // 2 + 1, frames]``.

    ``center=True`` reflect-pads ``n_fft // 2`` samples on both sides (zero-pads instead
    when the signal is too short to reflect), giving ``1 + T // hop_length`` frames;
    ``center=False`` gives ``1 + (T - n_fft) // hop_length`` frames and needs
    ``T >= n_fft``. ``normalized`` divides by ``sqrt(sum(window ** 2))`` (torchaudio's
    ``normalized=True``), so a stationary signal has about the same per-bin magnitude at
    every window length, which keeps the scales of a multi-scale loss comparable.
    A window shorter than ``n_fft`` is centred in the frame, as ``torch.stft`` does. The
    window is moved to ``x``'s device; half-precision input is computed in float32.
    """
    if x.dim() < 1:
        raise ValueError("complex_stft needs at least one (time) dimension")
    lead, length = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, 1, length)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # torch.stft has no half-precision kernels everywhere (e.g. under autocast)
    window = window.to(device=flat.device, dtype=flat.dtype)
    if center:
        pad = n_fft // 2
        mode = "reflect" if length > pad else "constant"
        flat = F.pad(flat, (pad, pad), mode=mode)
    elif length < n_fft:
        raise ValueError(f"signal of {length} samples is shorter than the {n_fft}-sample STFT window")
    spec = torch.stft(
        flat[:, 0], n_fft=n_fft, hop_length=hop_length, win_length=window.shape[-1], window=window,
        center=False, normalized=False, onesided=True, return_complex=True,
    )
    if normalized:
        spec = spec / window.pow(2).sum().sqrt()
    return spec.reshape(*lead, spec.shape[-2], spec.shape[-1])


def _magnitude(spec: Tensor, power: float) -> Tensor:
    # |z|^2 via re^2 + im^2 keeps a finite gradient at z = 0 for the power spectrogram.
    if power == 2.0:
        return spec.real.square() + spec.imag.square()
    mag = spec.abs()
    return mag if power == 1.0 else mag.pow(power)


class MelSpectrogram(nn.Module):
    """Mel spectrogram without torchaudio: hann-window STFT, ``|X|^power``, HTK mel filters.

    Input ``[..., T]`` (typically ``[B, C, T]``), output ``[..., n_mels, frames]``.
    ``power=2.0`` (the default, like torchaudio) gives a power spectrogram, ``power=1.0`` a
    magnitude one. ``normalized`` and ``center`` are as in ``complex_stft``; unlike
    torchaudio, ``normalized`` defaults to True here (EnCodec's mel loss uses a normalised
    STFT). ``log=True`` returns ``log10(floor + mel)``.
    """

    window: Tensor
    filterbank: Tensor

    def __init__(
        self,
        sample_rate: int,
        n_fft: int = 1024,
        hop_length: int | None = None,
        win_length: int | None = None,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        power: float = 2.0,
        normalized: bool = True,
        center: bool = True,
        log: bool = False,
        floor: float = 1e-5,
    ) -> None:
        super().__init__()
        win_length = n_fft if win_length is None else win_length
        hop_length = win_length // 4 if hop_length is None else hop_length
        if not 0 < win_length <= n_fft:
            raise ValueError(f"need 0 < win_length <= n_fft, got win_length={win_length}, n_fft={n_fft}")
        if hop_length <= 0:
            raise ValueError(f"hop_length must be positive, got {hop_length}")
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        if log and floor <= 0:
            raise ValueError(f"the log floor must be positive, got {floor}")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.power = float(power)
        self.normalized = normalized
        self.center = center
        self.log = log
        self.floor = floor
        # Not persistent: both are functions of the constructor arguments, and keeping them
        # out of state dicts lets checkpoints load whatever the filterbank code becomes.
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        spec = complex_stft(x, self.n_fft, self.hop_length, self.window, center=self.center, normalized=self.normalized)
        magnitude = _magnitude(spec, self.power)
        # .to() is a no-op once the module sits on x's device; it lets a cached CPU
        # instance (see ecdc.train.metrics) serve inputs on any device.
        mel = torch.matmul(self.filterbank.to(device=magnitude.device, dtype=magnitude.dtype), magnitude)
        if self.log:
            mel = torch.log10(mel + self.floor)
        return mel


# --------------------------------------------------------------------------- reconstruction


def _check_pair(x: Tensor, y: Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")


def time_l1(x: Tensor, y: Tensor) -> Tensor:
    """The paper's l_t: mean absolute difference between the two waveforms."""
    _check_pair(x, y, "time_l1")
    return F.l1_loss(x, y)


class MultiScaleMelLoss(nn.Module):
    """The paper's frequency-domain loss l_f over windows ``2^min_exp .. 2^max_exp``.

    Convention (the paper leaves the normalisation loose; this one is fixed here)::

        loss = 1/|s| * sum_i [ mean |S_i(x) - S_i(y)|  +  alpha * mean (L_i(x) - L_i(y))^2 ]

    with ``i`` over the ``|s| = max_exp - min_exp + 1`` scales (window ``2^i``, hop
    ``2^i // 4``, hann window, centred frames), ``S_i`` the ``n_mels``-band magnitude
    (``power=1``) mel spectrogram of a normalised STFT, and the means taken over every
    element (batch, channel, band, frame), i.e. ``F.l1_loss`` and ``F.mse_loss``.
    By default ``L_i = log10(floor + S_i)``: the L2 term compares log-mels, as Meta's
    audiocraft does, so quiet bands are not drowned by loud ones; ``log_l2=False``
    gives the paper's literal formula (L2 on ``S_i`` itself). alpha = 1 as in the paper.
    The result is a mean over scales, not a sum, so it does not depend on how many scales
    are used (under EnCodec's gradient balancer the overall scale does not matter).
    """

    def __init__(
        self,
        sample_rate: int,
        n_mels: int = 64,
        min_exp: int = 5,
        max_exp: int = 11,
        alpha: float = 1.0,
        f_min: float = 0.0,
        f_max: float | None = None,
        log_l2: bool = True,
        floor: float = 1e-5,
        power: float = 1.0,
        normalized: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= min_exp <= max_exp:
            raise ValueError(f"need 1 <= min_exp <= max_exp, got {min_exp}, {max_exp}")
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        if log_l2 and floor <= 0:
            raise ValueError(f"the log floor must be positive, got {floor}")
        self.alpha = float(alpha)
        self.log_l2 = log_l2
        self.floor = floor
        self.mels = nn.ModuleList(
            MelSpectrogram(
                sample_rate, n_fft=2**i, hop_length=2**i // 4, n_mels=n_mels, f_min=f_min, f_max=f_max,
                power=power, normalized=normalized, center=True,
            )
            for i in range(min_exp, max_exp + 1)
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``x`` and ``y`` ``[B, C, T]`` (any matching shapes ``[..., T]``); a scalar."""
        _check_pair(x, y, "MultiScaleMelLoss")
        batch = x.shape[0] if x.dim() > 1 else 1
        both = torch.cat([x, y]) if x.dim() > 1 else torch.stack([x, y])
        total = x.new_zeros(())
        for mel in self.mels:
            spec_x, spec_y = mel(both).split(batch)
            total = total + F.l1_loss(spec_x, spec_y)
            if self.alpha:
                if self.log_l2:
                    spec_x = torch.log10(spec_x + self.floor)
                    spec_y = torch.log10(spec_y + self.floor)
                total = total + self.alpha * F.mse_loss(spec_x, spec_y)
        return total / len(self.mels)


# --------------------------------------------------------------------------- adversarial


def _check_scales(first: list, second: list, what: str) -> None:
    if len(first) == 0:
        raise ValueError(f"{what}: no discriminator scales given")
    if len(first) != len(second):
        raise ValueError(f"{what}: {len(first)} scales vs {len(second)}")


def hinge_discriminator_loss(real_logits: list[Tensor], fake_logits: list[Tensor]) -> Tensor:
    """Discriminator hinge loss, mean over scales k of
    ``mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(x_hat)))``.

    Pass logits of a detached reconstruction, so this loss does not reach the generator.
    """
    _check_scales(real_logits, fake_logits, "hinge_discriminator_loss")
    total = real_logits[0].new_zeros(())
    for real, fake in zip(real_logits, fake_logits):
        total = total + F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return total / len(real_logits)


def hinge_generator_loss(fake_logits: list[Tensor]) -> Tensor:
    """The paper's adversarial generator loss l_g: mean over scales of ``mean(relu(1 - D_k(x_hat)))``."""
    if len(fake_logits) == 0:
        raise ValueError("hinge_generator_loss: no discriminator scales given")
    total = fake_logits[0].new_zeros(())
    for fake in fake_logits:
        total = total + F.relu(1.0 - fake).mean()
    return total / len(fake_logits)


def feature_matching_loss(
    real_fmaps: list[list[Tensor]], fake_fmaps: list[list[Tensor]], *, eps: float = 1e-8
) -> Tensor:
    """The paper's relative feature-matching loss l_feat.

    Mean over every (scale k, layer l) pair of
    ``mean|D_k^l(x) - D_k^l(x_hat)| / (mean|D_k^l(x)| + eps)``: both numerator and
    denominator are element means, so each term is a scale-free relative error and layers
    with large activations do not dominate. Real features are detached (they are targets);
    the gradient flows through the fake ones only.
    """
    _check_scales(real_fmaps, fake_fmaps, "feature_matching_loss")
    total: Tensor | None = None
    count = 0
    for k, (real_layers, fake_layers) in enumerate(zip(real_fmaps, fake_fmaps)):
        if len(real_layers) != len(fake_layers):
            raise ValueError(f"feature_matching_loss: scale {k} has {len(real_layers)} vs {len(fake_layers)} layers")
        for real, fake in zip(real_layers, fake_layers):
            _check_pair(real, fake, f"feature_matching_loss (scale {k})")
            real = real.detach()
            term = (real - fake).abs().mean() / (real.abs().mean() + eps)
            total = term if total is None else total + term
            count += 1
    if total is None:
        raise ValueError("feature_matching_loss: no feature maps given")
    return total / count
