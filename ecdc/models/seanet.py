"""SEANet encoder and decoder, the convolutional halves of EnCodec.

Layers live in one ``nn.Sequential`` called ``model`` in the same order as Meta's, because
the state-dict keys are ``encoder.model.<index>....``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .modules import SConv1d, SConvTranspose1d, SLSTM

# Fixed by the published architecture; not exposed in EncodecConfig.
KERNEL_SIZE = 7
LAST_KERNEL_SIZE = 7
RESIDUAL_KERNEL_SIZE = 3
DILATION_BASE = 2
COMPRESS = 2


def _elu() -> nn.Module:
    return nn.ELU(alpha=1.0)


class SEANetResnetBlock(nn.Module):
    """ELU-conv(k=3, dilated)-ELU-conv(k=1) branch plus a k=1 conv shortcut."""

    def __init__(self, dim: int, dilation: int = 1, causal: bool = False, norm: str = "weight_norm",
                 pad_mode: str = "reflect", compress: int = COMPRESS) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            _elu(),
            SConv1d(dim, hidden, RESIDUAL_KERNEL_SIZE, dilation=dilation, causal=causal,
                    norm=norm, pad_mode=pad_mode),
            _elu(),
            SConv1d(hidden, dim, 1, causal=causal, norm=norm, pad_mode=pad_mode),
        )
        self.shortcut = SConv1d(dim, dim, 1, causal=causal, norm=norm, pad_mode=pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


def _check(n_filters: int, ratios: Sequence[int], n_residual_layers: int, lstm_layers: int) -> None:
    if n_filters < 1:
        raise ValueError(f"n_filters must be positive, got {n_filters}")
    if not ratios or any(r < 1 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of positive ints, got {list(ratios)}")
    if n_residual_layers < 0 or lstm_layers < 0:
        raise ValueError("n_residual_layers and lstm_layers must be >= 0")


class SEANetEncoder(nn.Module):
    """Audio ``[B, channels, T]`` -> latent ``[B, dimension, ceil(T / prod(ratios))]``.

    ``ratios`` are given in decoder (upsampling) order, as in Meta's configs; the encoder
    applies them reversed.
    """

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 n_residual_layers: int = 1, ratios: Sequence[int] = (8, 5, 4, 2),
                 norm: str = "weight_norm", causal: bool = False, lstm_layers: int = 2,
                 pad_mode: str = "reflect") -> None:
        super().__init__()
        _check(n_filters, ratios, n_residual_layers, lstm_layers)
        self.channels = channels
        self.dimension = dimension
        self.ratios = tuple(reversed(ratios))
        conv_kw: dict[str, Any] = dict(causal=causal, norm=norm, pad_mode=pad_mode)

        width = n_filters
        layers: list[nn.Module] = [SConv1d(channels, width, KERNEL_SIZE, **conv_kw)]
        for ratio in self.ratios:
            for j in range(n_residual_layers):
                layers.append(SEANetResnetBlock(width, dilation=DILATION_BASE ** j, **conv_kw))
            layers += [_elu(), SConv1d(width, width * 2, ratio * 2, stride=ratio, **conv_kw)]
            width *= 2
        if lstm_layers:
            layers.append(SLSTM(width, num_layers=lstm_layers))
        layers += [_elu(), SConv1d(width, dimension, LAST_KERNEL_SIZE, **conv_kw)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    """Latent ``[B, dimension, F]`` -> audio ``[B, channels, F * prod(ratios)]`` (untrimmed)."""

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 n_residual_layers: int = 1, ratios: Sequence[int] = (8, 5, 4, 2),
                 norm: str = "weight_norm", causal: bool = False, lstm_layers: int = 2,
                 pad_mode: str = "reflect", trim_right_ratio: float = 1.0) -> None:
        super().__init__()
        _check(n_filters, ratios, n_residual_layers, lstm_layers)
        self.channels = channels
        self.dimension = dimension
        self.ratios = tuple(ratios)
        conv_kw: dict[str, Any] = dict(causal=causal, norm=norm, pad_mode=pad_mode)

        width = n_filters * 2 ** len(self.ratios)
        layers: list[nn.Module] = [SConv1d(dimension, width, KERNEL_SIZE, **conv_kw)]
        if lstm_layers:
            layers.append(SLSTM(width, num_layers=lstm_layers))
        for ratio in self.ratios:
            layers += [
                _elu(),
                SConvTranspose1d(width, width // 2, ratio * 2, stride=ratio, causal=causal,
                                 norm=norm, trim_right_ratio=trim_right_ratio),
            ]
            width //= 2
            for j in range(n_residual_layers):
                layers.append(SEANetResnetBlock(width, dilation=DILATION_BASE ** j, **conv_kw))
        layers += [_elu(), SConv1d(n_filters, channels, LAST_KERNEL_SIZE, **conv_kw)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)
