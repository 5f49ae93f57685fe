"""Window geometry of the causal streaming engines (:mod:`ecdc.models.streaming`).

What a window of a causal SEANet's layers computes exactly (:func:`left_context`), how
wide each call must be to take the same kernel code path as a long whole-file pass
(:func:`min_input_width`), and the block-to-block plumbing both engines share: the split
at the LSTM, the LSTM step that carries its state, and the history kept between blocks.
Why the widths matter for identical codes is explained in :mod:`ecdc.models.streaming`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .modules import SLSTM, SConv1d, SConvTranspose1d
from .seanet import SEANetResnetBlock, run_layers

# PyTorch (CPU, float32, batch of one) convolves with oneDNN only above this many input
# elements per call (channels x width); below it a GEMM fallback rounds differently.
ONEDNN_MIN_ELEMENTS = 20480
# ATen's grain size: an elementwise op on n elements runs on ceil(n / grain) threads at most.
ELEMENTWISE_GRAIN = 32768
# Fewest rows given to a GEMM (quantiser distances) or time steps given to the LSTM: MKL
# and oneDNN take other code paths for a handful of rows.
MIN_ROWS = 16

_ELEMENTWISE = (nn.ELU, nn.Identity)


def left_context(modules: Sequence[nn.Module]) -> int:
    """First output index of ``modules`` that is exact when the input window starts late.

    A window that starts inside the signal sees the wrong left padding (reflected instead
    of the real past) and, for transposed convs, misses the previous frames' overlap; the
    returned number of leading outputs are spoilt by that, every later one is exact.
    """
    first_exact = 0  # index of the first exact position at the current layer
    for module in modules:
        first_exact = _first_exact_after(module, first_exact)
    return first_exact


def _first_exact_after(module: nn.Module, e: int) -> int:
    if isinstance(module, _ELEMENTWISE):
        return e
    if isinstance(module, SConv1d):
        if not module.causal:
            raise ModelError("streaming needs causal convolutions")
        pad = (module.kernel_size - 1) * module.dilation - (module.stride - 1)
        # output j reads inputs j*stride - pad .. j*stride + (k-1)*dilation - pad
        return -(-(e + pad) // module.stride)
    if isinstance(module, SConvTranspose1d):
        if not module.causal or module.trim_right_ratio != 1.0:
            raise ModelError("streaming needs causal transposed convolutions")
        # output p sums inputs ceil((p - k + 1) / s) .. p // s; all must be >= e
        return e * module.stride + module.kernel_size - module.stride
    if isinstance(module, SEANetResnetBlock):
        return max(_first_exact_after(module.shortcut, e), _chain(module.block, e))
    raise ModelError(f"cannot stream through a {type(module).__name__}")


def _chain(modules: Iterable[nn.Module], e: int) -> int:
    for module in modules:
        e = _first_exact_after(module, e)
    return e


def min_input_width(modules: Sequence[nn.Module], threads: int) -> int:
    """Fewest input positions for which every call in ``modules`` takes the code path of a
    long input: each conv runs on oneDNN, and each ELU is split over all ``threads``.

    An elementwise op runs on ``min(threads, ceil(n / ELEMENTWISE_GRAIN))`` threads, each
    over one contiguous chunk whose last ``chunk % 16`` elements take a scalar path that,
    for ELU, rounds differently. With all threads busy the chunks of a ``[B, C, T]`` tensor
    follow channel boundaries (for thread counts dividing ``C``), so these few elements sit
    at the end of the time axis in both passes; with fewer threads they could fall
    anywhere. ``scale`` is positions per input position at each layer (strides shrink it,
    transposed strides grow it); padding is ignored, which only errs on the safe side.
    """
    need = 1
    scale = Fraction(1)  # exact: a float 1/40 could round a width onto the threshold
    after_elu = False
    elu_elements = (threads - 1) * ELEMENTWISE_GRAIN + 1

    def require(channels: int, elements: int) -> None:
        nonlocal need
        need = max(need, math.ceil(elements / (channels * scale)))

    def visit(module: nn.Module) -> None:
        nonlocal scale, after_elu
        if isinstance(module, nn.ELU):
            after_elu = True
            return
        if isinstance(module, SEANetResnetBlock):
            for inner in module.block:
                visit(inner)
            after_elu = False  # the shortcut reads the block's input, not an ELU's output
            visit(module.shortcut)
        elif isinstance(module, (SConv1d, SConvTranspose1d)):
            conv = module.conv.conv if isinstance(module, SConv1d) else module.convtr.convtr
            require(conv.in_channels, ONEDNN_MIN_ELEMENTS + 1)
            if after_elu:  # the ELU's output is this conv's input
                require(conv.in_channels, elu_elements)
            if isinstance(module, SConv1d):
                scale /= module.stride
            else:
                scale *= module.stride
        after_elu = False

    for m in modules:
        visit(m)
    return need


def split_at_lstm(seq: nn.Sequential) -> tuple[list[nn.Module], SLSTM | None, list[nn.Module]]:
    """(modules before the LSTM, the LSTM, modules after it); no LSTM puts all before."""
    layers = list(seq)
    for i, layer in enumerate(layers):
        if isinstance(layer, SLSTM):
            return layers[:i], layer, layers[i + 1:]
    return layers, None, []


def lstm_step(slstm: SLSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None,
              last: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """:class:`SLSTM` on ``x`` ``[B, C, T]`` continuing from ``state`` -> (``[T, B, C]``, state).

    The same ops as its forward (which returns the ``[B, C, T]`` view of this). The last
    chunk may be short; it is zero-padded to :data:`MIN_ROWS` steps (the LSTM is causal,
    so the real steps are unchanged) and the returned state is then meaningless.
    """
    xt = x.permute(2, 0, 1).contiguous()  # [T, B, C]
    steps = xt.shape[0]
    inp = xt
    if steps < MIN_ROWS:
        if not last:
            raise RuntimeError("internal error: short LSTM chunk before the end")
        inp = torch.cat([xt, xt.new_zeros(MIN_ROWS - steps, *xt.shape[1:])])
    y, new_state = slstm.lstm(inp, state)
    y = y[:steps]
    if slstm.skip:
        y = y + xt
    return y, new_state


def with_history(hist: torch.Tensor | None, new: torch.Tensor, keep: int, use: int, dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last ``use`` steps of ``hist`` followed by ``new``, the last ``keep`` steps of both).

    ``dim`` is the time axis. A full block needs only the layers' reach as history; a
    short last block takes more, so that its calls are as wide as a full block's.
    """
    full = new if hist is None else torch.cat([hist, new], dim=dim)
    length = full.shape[dim]
    used = length if hist is None else min(hist.shape[dim], use) + new.shape[dim]
    # The kept steps are copied, so that the block they came from can be freed.
    kept = full.narrow(dim, max(0, length - keep), min(keep, length)).clone()
    return full.narrow(dim, length - used, used), kept


def history_to_use(reach: int, history: int, frames: int) -> int:
    """Steps of history to put before ``frames`` new ones: the layers' ``reach``; for a
    short block (the last one, or any in low-latency use), enough more that the call is
    ``history`` wide (full-size calls) but no wider (a block's activations set the peak
    memory)."""
    return max(reach, history - frames)


def run_min_width(layers: Sequence[nn.Module], x: torch.Tensor, width: int, dim: int = -1,
                  scale: int = 1) -> torch.Tensor:
    """The causal ``layers`` on ``x`` zero-padded on the right (along ``dim``) to ``width``
    positions, their output cut back to the real ones (``scale`` outputs per input).

    For a call too narrow for the long-input code path (the start of a low-latency
    decode, which has no history yet): causal layers compute the real positions from
    the real inputs only, and the padded call takes the kernels of a long pass.
    """
    length = x.shape[dim]
    if length < width:
        shape = list(x.shape)
        shape[dim] = width - length
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    out = run_layers(layers, x.movedim(dim, -1))
    return out if length >= width else out[..., :length * scale]
