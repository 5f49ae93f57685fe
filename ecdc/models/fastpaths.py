"""Faster formulations of a few SEANet layers for inference, and when each may be used.

Each function here computes what a torch call computes, on plain tensors; the layers in
:mod:`ecdc.models.modules` and :mod:`ecdc.models.seanet` decide whether to call it.

Exact (same bits as the torch call, used whenever no autograd graph is recorded):

* :func:`reflect_pad_by_copy`: ``F.pad(..., mode="reflect")`` as three copies. Padding
  only moves values, so any way of moving them gives the same bits; 3-7x faster on CPU
  than torch's reflection kernel, which took ~6 % of an encoder pass.

Reassociating (the same sums in another order: equal to torch's results to float
rounding, ~1e-7 relative, *not* bit for bit). They apply only at CPU float32 inference
(:func:`is_cpu_inference`) and only in layers whose ``allow_reassociation`` is on, which
:class:`~ecdc.models.EncodecModel` sets for its decoder alone: the encoder must reproduce
the reference's latents to the last bit, or near-ties in the RVQ would flip codes, while
nothing downstream of the decoder depends on the last bits of the audio.

* :func:`conv1d_small_output`: a conv with few output rows (the decoder's last layer,
  32 channels -> 1 or 2) as one matrix product and ``kernel_size`` shifted sums, where
  oneDNN's direct convolution is 3-4x slower. Applies when
  :func:`conv1d_small_output_applies`.
* :func:`conv_transpose1d_double_kernel`: a transposed conv with ``kernel_size ==
  2 * stride`` (every upsampling layer of the SEANet decoder) as one matrix product and
  one shifted add, up to 2.5x faster. Applies when :func:`double_kernel_applies`.
* :func:`conv1x1_pair_sum`: a residual block's two 1x1 convs (shortcut and branch) as two
  matrix products into one output, saving a pass and an allocation.
"""

from __future__ import annotations

import torch
from torch import nn


def reflect_pad_by_copy(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``F.pad(x, (left, right), mode="reflect")`` as one copy plus two small flipped ones.

    Bit-identical (see the module docstring). Needs ``x.shape[-1] > max(left, right)``.
    """
    length = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], left + length + right)
    out[..., left : left + length] = x
    if left:
        out[..., :left] = x[..., 1 : left + 1].flip(-1)
    if right:
        out[..., left + length :] = x[..., length - 1 - right : length - 1].flip(-1)
    return out


def is_cpu_inference(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` runs on ``x`` where the reassociating paths are meant for:
    eval mode, no autograd, a CPU float32 ``[B, C, T]`` tensor."""
    return (not module.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dim() == 3 and x.dtype == torch.float32)


def matmul_2d_3d(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` for ``w`` ``[M, K]`` and ``x`` ``[B, K, N]`` -> contiguous ``[B, M, N]``.

    Not ``torch.matmul``: for a ``w`` that requires grad (a plain parameter) it folds the
    batch into an ``x^T w^T`` product and then copies the transposed result, 2-3x slower.
    """
    w = w.detach()
    if x.shape[0] == 1:
        return torch.mm(w, x[0]).unsqueeze(0)
    return torch.bmm(w.expand(x.shape[0], *w.shape), x)


def conv1d_small_output_applies(conv: nn.Conv1d, x: torch.Tensor) -> bool:
    """Whether :func:`conv1d_small_output` can stand in for ``conv(x)``: CPU inference, a
    plain conv (stride 1, no padding or groups) with at most 16 output rows in all
    (``out_channels * kernel_size``)."""
    return (is_cpu_inference(conv, x) and conv.stride[0] == 1 and conv.groups == 1
            and conv.padding[0] == 0 and conv.out_channels * conv.kernel_size[0] <= 16)


def conv1d_small_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        dilation: int = 1) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, dilation=dilation)`` (stride 1, no padding) as one
    matrix product over the input and ``kernel_size`` shifted sums of its few output rows.

    Equal to it up to float rounding (see the module docstring).
    """
    b, c_in, length = x.shape
    c_out, _, k = weight.shape
    t = length - (k - 1) * dilation
    taps = matmul_2d_3d(weight.permute(2, 0, 1).reshape(k * c_out, c_in), x)  # [B, k*C_out, L]
    taps = taps.view(b, k, c_out, length)
    y = taps[:, 0, :, :t].clone() if bias is None else taps[:, 0, :, :t] + bias.view(1, -1, 1)
    for i in range(1, k):
        y += taps[:, i, :, i * dilation : i * dilation + t]
    return y


def double_kernel_applies(conv: nn.ConvTranspose1d, x: torch.Tensor) -> bool:
    """Whether :func:`conv_transpose1d_double_kernel` can stand in for ``conv(x)``: CPU
    inference, plain geometry with ``kernel_size == 2 * stride``."""
    return (
        is_cpu_inference(conv, x)
        and conv.kernel_size[0] == 2 * conv.stride[0]
        and conv.padding[0] == 0
        and conv.output_padding[0] == 0
        and conv.dilation[0] == 1
        and conv.groups == 1
    )


def conv_transpose1d_double_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   stride: int) -> torch.Tensor:
    """``F.conv_transpose1d(x, weight, bias, stride)`` for ``kernel_size == 2 * stride``.

    Each input frame then spreads over exactly two output blocks of ``stride`` samples, so
    the transposed conv is one matrix product ``W^T x`` (``[C_out * 2 * stride, T]``) plus
    one shifted add of its two halves: up to 2.5x faster on CPU than torch's kernel
    (measured on the 24 kHz decoder's layers; the gain grows with the number of frames).
    Equal to torch's result up to float rounding (see the module docstring).
    """
    b, c_in, t = x.shape
    c_out = weight.shape[1]
    s = stride
    cols = matmul_2d_3d(weight.reshape(c_in, c_out * 2 * s).t(), x)  # [B, C_out * 2s, T]
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


def conv1x1_pair_sum(bias: torch.Tensor, w_x: torch.Tensor, x: torch.Tensor, w_h: torch.Tensor,
                     h: torch.Tensor) -> torch.Tensor:
    """``conv1x1(x, w_x) + conv1x1(h, w_h)`` with the two biases summed into ``bias``
    (``[C_out, 1]``), for weights ``[C_out, C_in]``: ``(w_x x + bias) + w_h h``, the second
    product accumulated in place. Equal to the separate convs up to float rounding."""
    if x.shape[0] == 1:
        out = torch.addmm(bias, w_x, x[0])
        return out.addmm_(w_h, h[0]).unsqueeze(0)
    out = matmul_2d_3d(w_x, x).add_(bias)
    return out.add_(matmul_2d_3d(w_h, h))
