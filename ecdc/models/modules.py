"""Convolution and LSTM building blocks of the EnCodec networks.

Attribute names (``conv.conv.weight_g``, ``convtr.convtr.weight_v``, ``conv.norm.weight``,
``lstm.weight_ih_l0`` ...) are chosen so that Meta's released state dicts load with
``strict=True``; the padding arithmetic reproduces the reference bit for bit, because the
codes a file holds depend on it. The faster inference formulations some layers switch to
are in :mod:`ecdc.models.fastpaths`, with when each applies.
"""

from __future__ import annotations

import math
from typing import Self, cast

import torch
from torch import nn
from torch.nn import functional as F

from ..perf import lstm_threads
from .caching import DerivedTensorCache
from .fastpaths import (
    conv1d_small_output,
    conv1d_small_output_applies,
    conv_transpose1d_double_kernel,
    double_kernel_applies,
    reflect_pad_by_copy,
)

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
    if torch.is_grad_enabled():
        padded = F.pad(x, (left, right), mode="reflect")
    else:
        padded = reflect_pad_by_copy(x, left, right)  # the same bits, faster
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


def _use_cache(module: nn.Module) -> bool:
    """Whether a module may reuse a weight derived from its parameters (see ``_WeightNormMixin``).

    Only in eval mode and when no autograd graph is being recorded (``torch.no_grad`` or
    ``torch.inference_mode``): a training step must backpropagate through the derivation.
    """
    return not module.training and not torch.is_grad_enabled()


class _WeightNormMixin(DerivedTensorCache):
    """Replaces a conv's ``weight`` parameter by ``weight_g`` / ``weight_v`` (dim=0).

    Same names, shapes and initialisation (g = ||w||, v = w) as ``torch.nn.utils.weight_norm``,
    without its deprecated forward-pre-hook machinery.

    At inference (eval mode, no autograd) the normalised weight is computed once and
    reused until ``weight_g`` / ``weight_v`` change (:mod:`ecdc.models.caching`): it is the
    same ``torch._weight_norm`` call on the same tensors, so the values are bit-identical
    to recomputing it per call.
    In training (or whenever grad is enabled) it is recomputed on every call so that
    gradients flow through the reparametrisation.
    """

    _weight_cache: tuple | None = None
    _cache_attrs = ("_weight_cache",)
    weight_g: nn.Parameter  # registered by _split_weight
    weight_v: nn.Parameter

    def _split_weight(self) -> None:
        # A conv's weight is always a Parameter (only a bias may be registered as None).
        weight = cast(nn.Parameter, self._parameters.pop("weight")).detach()
        dims = [1] * (weight.dim() - 1)
        if weight.is_meta:
            # Built on the meta device to be given a state dict's tensors (see
            # ecdc.weights.build_model): shapes only. A norm on meta tensors would run
            # torch's Python decompositions, whose first use imports sympy and ~800
            # modules (~65 MiB of resident memory in every CLI process).
            g = weight.new_empty(weight.shape[0], *dims)
        else:
            g = weight.reshape(weight.shape[0], -1).norm(2, dim=1).view(-1, *dims)
        self.register_parameter("weight_g", nn.Parameter(g.clone()))
        self.register_parameter("weight_v", nn.Parameter(weight.clone()))

    def normed_weight(self) -> torch.Tensor:
        """``weight_g * weight_v / ||weight_v||``, from the cache where :func:`_use_cache` allows."""
        v, g = self.weight_v, self.weight_g
        if not _use_cache(self):
            return _weight_norm(v, g)
        return self.cached("_weight_cache", (v, g), lambda: _weight_norm(v, g))

    def clear_weight_cache(self) -> None:
        self.drop_caches()

    def train(self, mode: bool = True) -> Self:
        self.drop_caches()
        return super().train(mode)


def clear_weight_cache(module: nn.Module) -> None:
    """Drop every cached normalised weight under ``module``.

    Needed only after writing parameters through ``.data`` (which bumps no version
    counter); optimiser steps, ``load_state_dict``, ``.to()`` and ``train()`` / ``eval()``
    invalidate the cache by themselves.
    """
    for m in module.modules():
        if isinstance(m, _WeightNormMixin):
            m.clear_weight_cache()


class WeightNormConv1d(_WeightNormMixin, nn.Conv1d):
    """``nn.Conv1d`` whose weight is reparametrised as ``weight_g * weight_v / ||weight_v||``."""

    def __init__(self, *args, **kwargs) -> None:
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normed_weight(), self.bias)


class WeightNormConvTranspose1d(_WeightNormMixin, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with weight norm over dim 0 (input channels), as Meta's weights."""

    # nn.ConvTranspose1d stores its (integer) padding as a tuple; the ``str | tuple`` of
    # torch's _ConvNd declaration is for the string modes of plain convs.
    padding: tuple[int, ...]

    def __init__(self, *args, **kwargs) -> None:
        nn.ConvTranspose1d.__init__(self, *args, **kwargs)
        self._split_weight()

    # No ``output_size`` argument (nn.ConvTranspose1d's): the layers' padding is fixed.
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.conv_transpose1d(
            x, self.normed_weight(), self.bias, self.stride, self.padding,
            self.output_padding, self.groups, self.dilation,
        )


def conv_weight(conv: nn.Conv1d | nn.ConvTranspose1d) -> torch.Tensor:
    """The weight ``conv`` computes with (normalised, for a weight-normed one), for the
    fast paths that call the kernels themselves (:mod:`ecdc.models.fastpaths`)."""
    return conv.normed_weight() if isinstance(conv, _WeightNormMixin) else conv.weight


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
        conv = self.conv
        if self.allow_reassociation and conv1d_small_output_applies(conv, x):
            return self.norm(conv1d_small_output(x, conv_weight(conv), conv.bias, conv.dilation[0]))
        return self.norm(conv(x))

    #: May compute the same sums in another order (faster; results equal to float
    #: rounding, not bit for bit). Off by default; :class:`~ecdc.models.EncodecModel`
    #: turns it on for its decoder only: the encoder must reproduce the reference's
    #: latents exactly, or near-ties in the RVQ could flip codes.
    allow_reassociation = False


class NormConvTranspose1d(nn.Module):
    """A transposed conv followed by its normalisation (``.convtr`` and ``.norm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 causal: bool = False, norm: str = "none") -> None:
        super().__init__()
        _check_norm(norm, causal)
        cls = WeightNormConvTranspose1d if norm == "weight_norm" else nn.ConvTranspose1d
        self.convtr = cls(in_channels, out_channels, kernel_size, stride)
        self.norm = _norm_module(norm, out_channels)

    #: See :attr:`NormConv1d.allow_reassociation`.
    allow_reassociation = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.convtr
        if self.allow_reassociation and double_kernel_applies(conv, x):
            y = conv_transpose1d_double_kernel(x, conv_weight(conv), conv.bias, conv.stride[0])
        else:
            y = conv(x)
        return self.norm(y)


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

    def _padding(self, length: int) -> tuple[int, int]:
        """(left, right) padding of an input of ``length`` samples, as the reference pads."""
        padding_total = (self.kernel_size - 1) * self.dilation - (self.stride - 1)
        extra = extra_padding_for_conv1d(length, self.kernel_size, self.stride, padding_total)
        if self.causal:
            left, right = padding_total, 0
        else:
            right = padding_total // 2  # odd totals put the extra sample on the left
            left = padding_total - right
        return left, right + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self._padding(x.shape[-1])
        if left or right:
            x = pad1d(x, left, right, mode=self.pad_mode)
        # else (1x1 convs): F.pad would only copy the input
        return self.conv(x)


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


class InferenceLSTM(nn.LSTM):
    """``nn.LSTM`` (same parameters and state-dict names) that can run at inference with
    its own thread count: :func:`ecdc.perf.configure_threads` ``lstm_threads`` or the
    ``ECDC_LSTM_THREADS`` environment variable; by default torch's.

    The LSTM makes one small parallel region per time step, so on a machine whose cores
    are busy with other work its threads keep waiting for each other, and one thread can
    be 10-50x faster than two (see :mod:`ecdc.perf`). Its results do not depend on the
    thread count (checked by tests/test_speed_invariants.py).
    """

    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's signature
        threads = lstm_threads()
        if threads is None or torch.is_grad_enabled() or threads == torch.get_num_threads():
            return super().forward(input, hx)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return super().forward(input, hx)
        finally:
            torch.set_num_threads(previous)


class SLSTM(nn.Module):
    """Multi-layer LSTM over ``[B, C, T]`` tensors with a residual connection."""

    def __init__(self, dimension: int, num_layers: int = 2, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.lstm = InferenceLSTM(dimension, dimension, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, B, C], the LSTM's default layout, made contiguous (same values; the oneDNN
        # kernel reads it faster than the permuted view).
        x = x.permute(2, 0, 1).contiguous()
        y, _ = self.lstm(x)
        if self.skip:
            y = y + x
        return y.permute(1, 2, 0)
