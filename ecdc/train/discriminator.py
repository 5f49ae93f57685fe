"""EnCodec's multi-scale STFT discriminator (MS-STFTD, Défossez et al. 2022, section 3.4).

Each scale looks at the complex STFT of the waveform (real and imaginary parts as input
channels), which lets it judge phase as well as magnitude; five window lengths cover
both fine temporal and fine spectral detail.

Layout: the spectrogram enters the 2-D convs as ``[B, 2C, frames, freq]`` (time first, as
in Meta's reference), so a ``(3, 9)`` kernel spans 3 frames by 9 frequency bins, the
``(1, 2)`` stride halves the frequency axis only, and the dilations 1, 2, 4 act on time.

Width: Meta's reference (``encodec/msstftd.py``, and audiocraft's copy) has a
``filters_scale`` growth factor, but its default is 1, so every layer has ``filters``
channels; the same default is kept here (``filters_scale=2`` doubles the width at each
dilated layer, capped at ``max_filters``). With the defaults (``channels=1``,
``filters=32``, five scales) the discriminator has 472,490 parameters, 94,498 per scale,
counting weight norm's magnitude and direction tensors separately; ``channels=2`` has
481,130 (96,226 per scale). Meta's reference builds its first conv without weight norm
(its ``NormConv2d`` defaults to ``norm='none'`` and that call does not pass ``norm``),
giving 472,330; here every conv is weight-normed, as the paper describes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ecdc.train.losses import complex_stft


def _same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return ((kernel_size[0] - 1) * dilation[0] // 2, (kernel_size[1] - 1) * dilation[1] // 2)


def _conv(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
) -> nn.Module:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
        padding=_same_padding(kernel_size, dilation),
    )
    return weight_norm(conv)


class STFTDiscriminator(nn.Module):
    """One scale of the MS-STFTD: ``[B, C, T]`` waveform -> (logits, feature maps).

    Logits are ``[B, 1, frames, freq']`` with ``frames = 1 + (T - n_fft) // hop_length``
    (uncentred STFT, as Meta's) and ``freq'`` the ``n_fft // 2 + 1`` bins halved three
    times (rounding up). The feature maps are the LeakyReLU outputs of the five layers
    before the logit conv.
    """

    window: Tensor

    def __init__(
        self,
        channels: int = 1,
        filters: int = 32,
        n_fft: int = 1024,
        hop_length: int | None = None,
        win_length: int | None = None,
        kernel_size: tuple[int, int] = (3, 9),
        stride: tuple[int, int] = (1, 2),
        dilations: tuple[int, ...] = (1, 2, 4),
        filters_scale: int = 1,
        max_filters: int = 1024,
        negative_slope: float = 0.2,
        normalized: bool = True,
    ) -> None:
        super().__init__()
        if channels <= 0 or filters <= 0 or filters_scale <= 0 or max_filters <= 0:
            raise ValueError("channels, filters, filters_scale and max_filters must be positive")
        win_length = n_fft if win_length is None else win_length
        hop_length = win_length // 4 if hop_length is None else hop_length
        if not 0 < win_length <= n_fft or hop_length <= 0:
            raise ValueError(f"bad STFT sizes: n_fft={n_fft}, win_length={win_length}, hop_length={hop_length}")
        if len(kernel_size) != 2 or len(stride) != 2:
            raise ValueError("kernel_size and stride must be (time, freq) pairs")
        self.channels = channels
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.normalized = normalized
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

        def width(depth: int) -> int:
            return min(filters * filters_scale**depth, max_filters)

        layers = [_conv(2 * channels, width(0), kernel_size)]
        for depth, dilation in enumerate(dilations, start=1):
            layers.append(_conv(width(depth - 1), width(depth), kernel_size, stride=stride, dilation=(dilation, 1)))
        square = (kernel_size[0], kernel_size[0])
        last = len(dilations)
        layers.append(_conv(width(last), width(last + 1), square))
        self.convs = nn.ModuleList(layers)
        self.conv_post = _conv(width(last + 1), 1, square)
        self.activation = nn.LeakyReLU(negative_slope)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, T] audio, got {tuple(x.shape)}")
        spec = complex_stft(x, self.n_fft, self.hop_length, self.window, center=False, normalized=self.normalized)
        z = torch.cat([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2C, frames, freq]
        fmaps = []
        for conv in self.convs:
            z = self.activation(conv(z))
            fmaps.append(z)
        return self.conv_post(z), fmaps


class MultiScaleSTFTDiscriminator(nn.Module):
    """The MS-STFTD: one ``STFTDiscriminator`` per window length in ``n_ffts``.

    Hop = window / 4 at every scale (the paper's 2048/512 ... 128/32). ``forward`` returns
    ``(logits, fmaps)``: a list with one logits tensor per scale and a list with each
    scale's list of feature maps, in ``n_ffts`` order. Extra keyword arguments go to every
    ``STFTDiscriminator``. See the module docstring for the parameter count.
    """

    def __init__(
        self,
        channels: int = 1,
        filters: int = 32,
        n_ffts: tuple[int, ...] = (2048, 1024, 512, 256, 128),
        **kwargs: object,
    ) -> None:
        super().__init__()
        if len(n_ffts) == 0:
            raise ValueError("need at least one STFT scale")
        self.channels = channels
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(channels, filters, n_fft=n_fft, **kwargs) for n_fft in n_ffts  # type: ignore[arg-type]
        )

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        logits: list[Tensor] = []
        fmaps: list[list[Tensor]] = []
        for disc in self.discriminators:
            logit, fmap = disc(x)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps
