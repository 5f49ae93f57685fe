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

from ..perf import lstm_threads

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
        padded = _reflect_pad_by_copy(x, left, right)
    return padded[..., : padded.shape[-1] - extra]


def _reflect_pad_by_copy(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``F.pad(x, (left, right), mode="reflect")`` as one copy plus two small flipped ones.

    The same values bit for bit (padding only moves data), 3-7x faster on CPU than
    torch's reflection kernel for the encoder's activations, where that kernel took about
    6 % of the whole pass. Needs ``x.shape[-1] > max(left, right)``.
    """
    length = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], left + length + right)
    out[..., left : left + length] = x
    if left:
        out[..., :left] = x[..., 1 : left + 1].flip(-1)
    if right:
        out[..., left + length :] = x[..., length - 1 - right : length - 1].flip(-1)
    return out


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


def _tensor_key(t: torch.Tensor) -> tuple:
    """Changes whenever ``t`` is modified in place or replaced (``.to``, ``load_state_dict``).

    The version counter is bumped by every in-place op (optimiser steps, ``copy_``); the
    data pointer, device and dtype catch moves and casts. Writes through ``.data`` bump
    no counter: call :func:`clear_weight_cache` after those.
    """
    return (id(t), t._version, t.data_ptr(), t.device, t.dtype, t.shape)


class _WeightNormMixin:
    """Replaces a conv's ``weight`` parameter by ``weight_g`` / ``weight_v`` (dim=0).

    Same names, shapes and initialisation (g = ||w||, v = w) as ``torch.nn.utils.weight_norm``,
    without its deprecated forward-pre-hook machinery.

    At inference (eval mode, no autograd) the normalised weight is computed once and
    reused until ``weight_g`` / ``weight_v`` change: it is the same ``torch._weight_norm``
    call on the same tensors, so the values are bit-identical to recomputing it per call.
    In training (or whenever grad is enabled) it is recomputed on every call so that
    gradients flow through the reparametrisation.
    """

    _weight_cache: tuple | None = None

    def _split_weight(self) -> None:
        weight = self._parameters.pop("weight").detach()
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
        v, g = self.weight_v, self.weight_g
        if not _use_cache(self):
            return _weight_norm(v, g)
        key = (_tensor_key(v), _tensor_key(g))
        cached = self._weight_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        # A plain tensor even when called under inference mode, so that the cache can be
        # used later outside it.
        with torch.inference_mode(False), torch.no_grad():
            weight = _weight_norm(v, g)
        self._weight_cache = (key, weight)
        return weight

    def clear_weight_cache(self) -> None:
        self._weight_cache = None

    def train(self, mode: bool = True):
        self._weight_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._weight_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight_cache = None
        return super()._load_from_state_dict(*args, **kwargs)


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
        conv = self.conv
        if self.allow_reassociation and _small_output_ok(conv, x):
            weight = conv.normed_weight() if isinstance(conv, _WeightNormMixin) else conv.weight
            return self.norm(conv1d_small_output(x, weight, conv.bias, conv.dilation[0]))
        return self.norm(conv(x))

    #: May compute the same sums in another order (faster; results equal to float
    #: rounding, not bit for bit). Off by default; :class:`~ecdc.models.EncodecModel`
    #: turns it on for its decoder only: the encoder must reproduce the reference's
    #: latents exactly, or near-ties in the RVQ could flip codes.
    allow_reassociation = False


def set_reassociation(module: nn.Module, allow: bool) -> None:
    """Let every layer under ``module`` use its faster, not bit-exact formulation
    (``allow``) or only the reference's exact arithmetic."""
    from .seanet import SEANetResnetBlock  # circular at import time

    for m in module.modules():
        if isinstance(m, (NormConv1d, NormConvTranspose1d, SEANetResnetBlock)):
            m.allow_reassociation = bool(allow)


def _inference_cpu(module: nn.Module, x: torch.Tensor) -> bool:
    return (not module.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dim() == 3 and x.dtype == torch.float32)


def _small_output_ok(conv: nn.Conv1d, x: torch.Tensor) -> bool:
    return (_inference_cpu(conv, x) and conv.stride[0] == 1 and conv.groups == 1
            and conv.padding[0] == 0 and conv.out_channels * conv.kernel_size[0] <= 16)


def _matmul_2d_3d(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` for ``w`` ``[M, K]`` and ``x`` ``[B, K, N]`` -> contiguous ``[B, M, N]``.

    Not ``torch.matmul``: for a ``w`` that requires grad (a plain parameter) it folds the
    batch into an ``x^T w^T`` product and then copies the transposed result, 2-3x slower.
    """
    w = w.detach()
    if x.shape[0] == 1:
        return torch.mm(w, x[0]).unsqueeze(0)
    return torch.bmm(w.expand(x.shape[0], *w.shape), x)


def conv1d_small_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        dilation: int = 1) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, dilation=dilation)`` (stride 1, no padding) as one
    matrix product over the input and ``kernel_size`` shifted sums of its few output rows.

    For convs with few outputs (the decoder's last layer: 32 channels -> 1 or 2), where
    oneDNN's direct convolution is 3-4x slower. Equal to it up to float rounding.
    """
    b, c_in, length = x.shape
    c_out, _, k = weight.shape
    t = length - (k - 1) * dilation
    taps = _matmul_2d_3d(weight.permute(2, 0, 1).reshape(k * c_out, c_in), x)  # [B, k*C_out, L]
    taps = taps.view(b, k, c_out, length)
    y = taps[:, 0, :, :t].clone() if bias is None else taps[:, 0, :, :t] + bias.view(1, -1, 1)
    for i in range(1, k):
        y += taps[:, i, :, i * dilation : i * dilation + t]
    return y


def conv_transpose1d_double_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   stride: int) -> torch.Tensor:
    """``F.conv_transpose1d(x, weight, bias, stride)`` for ``kernel_size == 2 * stride``.

    The SEANet decoder's upsampling layers all have this shape. Each input frame then
    spreads over exactly two output blocks of ``stride`` samples, so the transposed conv is
    one matrix product ``W^T x`` (``[C_out * 2 * stride, T]``) plus one shifted add of its
    two halves: up to 2.5x faster on CPU than torch's kernel (measured on the 24 kHz
    decoder's layers; the gain grows with the number of frames). Same
    sums, in a different order: values agree with torch's to float rounding (~1e-7
    relative), not bit for bit.
    """
    b, c_in, t = x.shape
    c_out = weight.shape[1]
    s = stride
    cols = _matmul_2d_3d(weight.reshape(c_in, c_out * 2 * s).t(), x)  # [B, C_out * 2s, T]
    cols = cols.view(b, c_out, 2, s, t)
    first = cols[:, :, 0].transpose(2, 3)  # [B, C_out, T, s]: frame t's first block
    second = cols[:, :, 1].transpose(2, 3)  # ... and its second, which lands one block later
    y = x.new_empty(b, c_out, t + 1, s)
    if bias is None:
        y[:, :, :t].copy_(first)
        y[:, :, t].zero_()
    else:
        torch.add(first, bias.view(1, -1, 1, 1), out=y[:, :, :t])
        y[:, :, t] = bias.view(1, -1, 1)
    y[:, :, 1:] += second
    return y.view(b, c_out, (t + 1) * s)


def _fast_transpose_ok(conv: nn.ConvTranspose1d, x: torch.Tensor) -> bool:
    """Whether :func:`conv_transpose1d_double_kernel` applies: inference on CPU, plain
    geometry with ``kernel_size == 2 * stride``. Training keeps torch's kernel (as do
    layers whose ``allow_reassociation`` is off)."""
    return (
        _inference_cpu(conv, x)
        and conv.kernel_size[0] == 2 * conv.stride[0]
        and conv.padding[0] == 0
        and conv.output_padding[0] == 0
        and conv.dilation[0] == 1
        and conv.groups == 1
    )


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
        if self.allow_reassociation and _fast_transpose_ok(conv, x):
            weight = conv.normed_weight() if isinstance(conv, _WeightNormMixin) else conv.weight
            y = conv_transpose1d_double_kernel(x, weight, conv.bias, conv.stride[0])
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
