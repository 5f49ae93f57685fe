"""Convolution and LSTM building blocks of the EnCodec networks.

Attribute names (``conv.conv.weight_g``, ``convtr.convtr.weight_v``, ``conv.norm.weight``,
``lstm.weight_ih_l0`` ...) are chosen so that Meta's released state dicts load with
``strict=True``; the padding arithmetic reproduces the reference bit for bit, because the
codes a file holds depend on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

CONV_NORMS = ("none", "weight_norm", "time_group_norm")


def _check_norm(norm: str, causal: bool) -> None:
    if norm not in CONV_NORMS:
        raise ValueError(f"unknown conv norm {norm!r}; expected one of {', '.join(CONV_NORMS)}")
    if norm == "time_group_norm" and causal:
        # GroupNorm over the whole time axis looks at future samples.
        raise ValueError("time_group_norm cannot be used in a causal model")


# --------------------------------------------------------------------------- padding


def extra_padding_for_conv1d(length: int, kernel_size: int, stride: int, padding_total: int = 0) -> int:
    """Right padding that completes the last (partial) window of a strided conv.

    Without it the transposed conv in the decoder could not rebuild every input sample.
    Integer form of the reference's ``ceil((length - k + padding_total) / stride + 1)``.
    """
    span = length - kernel_size + padding_total
    n_frames = -(-span // stride) + 1  # ceil division, exact for any int
    ideal_length = (n_frames - 1) * stride + (kernel_size - padding_total)
    return ideal_length - length


def pad1d(x: torch.Tensor, left: int, right: int, mode: str = "reflect") -> torch.Tensor:
    """``F.pad`` on the last axis that also accepts reflect padding wider than the input.

    Reflect padding needs ``length > pad``; for shorter inputs zeros are appended first
    and removed again afterwards, exactly as the reference does.
    """
    if left < 0 or right < 0:
        raise ValueError(f"negative padding ({left}, {right})")
    if mode in ("zero", "constant"):
        return F.pad(x, (left, right))
    if mode != "reflect":
        raise ValueError(f"unknown pad mode {mode!r}")
    length = x.shape[-1]
    widest = max(left, right)
    extra = 0
    if length <= widest:
        extra = widest - length + 1
        x = F.pad(x, (0, extra))
    padded = F.pad(x, (left, right), mode="reflect")
    return padded[..., : padded.shape[-1] - extra]


def unpad1d(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Drop ``left`` and ``right`` samples from the last axis."""
    if left < 0 or right < 0 or left + right > x.shape[-1]:
        raise ValueError(f"cannot remove ({left}, {right}) samples from length {x.shape[-1]}")
    return x[..., left : x.shape[-1] - right]


# --------------------------------------------------------------------------- weight norm


def _weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``w = g * v / ||v||`` with the norm over every axis but the first (dim=0).

    Uses ``torch._weight_norm``, the kernel behind both of torch's weight-norm utilities
    and hence behind Meta's model: its fused reduction rounds differently from
    ``Tensor.norm`` (~1e-7 on the latent), enough to flip a near-tie in a deep RVQ stage
    and make our codes differ from the reference's. The plain formula is the fallback.
    """
    fused = getattr(torch, "_weight_norm", None)
    if fused is not None:
        return fused(v, g, 0)
    norm = v.reshape(v.shape[0], -1).norm(2, dim=1)
    return v * (g / norm.view(-1, *([1] * (v.dim() - 1))))


class _WeightNormMixin:
    """Replaces a conv's ``weight`` parameter by ``weight_g`` / ``weight_v`` (dim=0).

    Same names, shapes and initialisation (g = ||w||, v = w) as ``torch.nn.utils.weight_norm``,
    without its deprecated forward-pre-hook machinery.
    """

    def _split_weight(self) -> None:
        weight = self._parameters.pop("weight").detach()
        dims = [1] * (weight.dim() - 1)
        g = weight.reshape(weight.shape[0], -1).norm(2, dim=1).view(-1, *dims)
        self.register_parameter("weight_g", nn.Parameter(g.clone()))
        self.register_parameter("weight_v", nn.Parameter(weight.clone()))

    def normed_weight(self) -> torch.Tensor:
        return _weight_norm(self.weight_v, self.weight_g)


class WeightNormConv1d(_WeightNormMixin, nn.Conv1d):
    """``nn.Conv1d`` whose weight is reparametrised as ``weight_g * weight_v / ||weight_v||``."""

    def __init__(self, *args, **kwargs) -> None:
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normed_weight(), self.bias)


class WeightNormConvTranspose1d(_WeightNormMixin, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with weight norm over dim 0 (input channels), as Meta's weights."""

    def __init__(self, *args, **kwargs) -> None:
        nn.ConvTranspose1d.__init__(self, *args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(
            x, self.normed_weight(), self.bias, self.stride, self.padding,
            self.output_padding, self.groups, self.dilation,
        )


def _norm_module(norm: str, channels: int) -> nn.Module:
    if norm == "time_group_norm":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class NormConv1d(nn.Module):
    """A conv followed by its normalisation; holds ``.conv`` and ``.norm`` like the reference."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, causal: bool = False,
                 norm: str = "none") -> None:
        super().__init__()
        _check_norm(norm, causal)
        cls = WeightNormConv1d if norm == "weight_norm" else nn.Conv1d
        self.conv = cls(in_channels, out_channels, kernel_size, stride,
                        dilation=dilation, groups=groups, bias=bias)
        self.norm = _norm_module(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class NormConvTranspose1d(nn.Module):
    """A transposed conv followed by its normalisation (``.convtr`` and ``.norm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 causal: bool = False, norm: str = "none") -> None:
        super().__init__()
        _check_norm(norm, causal)
        cls = WeightNormConvTranspose1d if norm == "weight_norm" else nn.ConvTranspose1d
        self.convtr = cls(in_channels, out_channels, kernel_size, stride)
        self.norm = _norm_module(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.convtr(x))


# --------------------------------------------------------------------------- padded convs


class SConv1d(nn.Module):
    """Conv1d that pads its input itself, causally (all left) or symmetrically.

    The output has ``ceil(T / stride)`` frames, so that the decoder can rebuild at least
    T samples from them.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, causal: bool = False,
                 norm: str = "none", pad_mode: str = "reflect") -> None:
        super().__init__()
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation,
                               groups=groups, bias=bias, causal=causal, norm=norm)
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.causal = causal
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding_total = (self.kernel_size - 1) * self.dilation - (self.stride - 1)
        extra = extra_padding_for_conv1d(x.shape[-1], self.kernel_size, self.stride, padding_total)
        if self.causal:
            left, right = padding_total, 0
        else:
            right = padding_total // 2  # odd totals put the extra sample on the left
            left = padding_total - right
        return self.conv(pad1d(x, left, right + extra, mode=self.pad_mode))


class SConvTranspose1d(nn.Module):
    """ConvTranspose1d that trims its fixed padding: all on the right if causal
    (``trim_right_ratio`` = 1), otherwise split as in :class:`SConv1d`.

    The extra padding added by the encoder is not removed here; callers trim the final
    output to the known length.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 causal: bool = False, norm: str = "none", trim_right_ratio: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= trim_right_ratio <= 1.0:
            raise ValueError(f"trim_right_ratio must be in [0, 1], got {trim_right_ratio}")
        if not causal and trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1 only makes sense for causal convolutions")
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride,
                                          causal=causal, norm=norm)
        self.kernel_size = kernel_size
        self.stride = stride
        self.causal = causal
        self.trim_right_ratio = trim_right_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding_total = self.kernel_size - self.stride
        y = self.convtr(x)
        if self.causal:
            right = math.ceil(padding_total * self.trim_right_ratio)
        else:
            right = padding_total // 2
        return unpad1d(y, padding_total - right, right)


class SLSTM(nn.Module):
    """Multi-layer LSTM over ``[B, C, T]`` tensors with a residual connection."""

    def __init__(self, dimension: int, num_layers: int = 2, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.lstm = nn.LSTM(dimension, dimension, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)  # [T, B, C], the LSTM's default layout
        y, _ = self.lstm(x)
        if self.skip:
            y = y + x
        return y.permute(1, 2, 0)
