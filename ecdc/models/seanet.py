"""SEANet encoder and decoder, the convolutional halves of EnCodec.

Layers live in one ``nn.Sequential`` called ``model`` in the same order as Meta's, because
the state-dict keys are ``encoder.model.<index>....``. :func:`set_reassociation` lets a
network's layers use the faster, not bit-exact formulations of :mod:`ecdc.models.fastpaths`
(the decoder's default; never the encoder's).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence, cast

import torch
from torch import nn
from torch.nn import functional as F

from .fastpaths import conv1x1_pair_sum, is_cpu_inference
from .modules import SLSTM, NormConv1d, NormConvTranspose1d, SConv1d, SConvTranspose1d, conv_weight

# Fixed by the published architecture; not exposed in EncodecConfig.
KERNEL_SIZE = 7
LAST_KERNEL_SIZE = 7
RESIDUAL_KERNEL_SIZE = 3
DILATION_BASE = 2
COMPRESS = 2


def _elu() -> nn.Module:
    return nn.ELU(alpha=1.0)


class SEANetResnetBlock(nn.Module):
    """ELU-conv(k=3, dilated)-ELU-conv(k=1) branch plus a k=1 conv shortcut (or, with
    ``conv_shortcut=False``, the identity: Meta's ``true_skip``, the 32 kHz model's)."""

    def __init__(self, dim: int, dilation: int = 1, causal: bool = False, norm: str = "weight_norm",
                 pad_mode: str = "reflect", compress: int = COMPRESS, conv_shortcut: bool = True) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            _elu(),
            SConv1d(dim, hidden, RESIDUAL_KERNEL_SIZE, dilation=dilation, causal=causal,
                    norm=norm, pad_mode=pad_mode),
            _elu(),
            SConv1d(hidden, dim, 1, causal=causal, norm=norm, pad_mode=pad_mode),
        )
        self.shortcut: nn.Module = (SConv1d(dim, dim, 1, causal=causal, norm=norm, pad_mode=pad_mode)
                                    if conv_shortcut else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.shortcut(x) + self.block(x)
        # Inference: the same ops, with the second ELU and the sum done in place on
        # tensors this block owns (a + b == b + a exactly, so the result is identical).
        elu1, conv1, elu2, conv2 = cast("tuple[nn.ELU, SConv1d, nn.ELU, SConv1d]", self.block)
        h = conv1(F.elu(x, alpha=elu1.alpha))
        # In place on a fresh tensor: the same memory layout as the reference's
        # out-of-place ELU, hence the same bits (ELU's vectorised and scalar paths round
        # differently, so the layout an ELU is computed in matters).
        h = F.elu_(h, alpha=elu2.alpha)
        if not isinstance(self.shortcut, SConv1d):  # identity: x + y == y + x exactly; x is not ours
            return conv2(h).add_(x)
        if self.allow_reassociation and _fused_1x1_ok(conv2, self.shortcut, x, h):
            return _fused_1x1(self.shortcut, x, conv2, h)
        out = self.shortcut(x)
        return out.add_(conv2(h))

    #: See :attr:`NormConv1d.allow_reassociation` (set on the decoder's blocks).
    allow_reassociation = False


def _fused_1x1_ok(conv: SConv1d, shortcut: nn.Module, x: torch.Tensor, h: torch.Tensor) -> bool:
    """Both 1x1 convs of a residual block can be done as two matrix products into one
    output (plain convs, no normalisation module, inference on CPU)."""
    if not isinstance(shortcut, SConv1d):
        return False
    for c, inp in ((conv, h), (shortcut, x)):
        inner = c.conv.conv
        if (c.kernel_size != 1 or c.stride != 1 or inner.groups != 1 or inner.bias is None
                or not isinstance(c.conv.norm, nn.Identity) or not is_cpu_inference(inner, inp)):
            return False
    return True


def _fused_1x1(shortcut: nn.Module, x: torch.Tensor, conv: SConv1d, h: torch.Tensor) -> torch.Tensor:
    """``shortcut(x) + conv(h)`` for 1x1 convs, by :func:`~ecdc.models.fastpaths.conv1x1_pair_sum`."""
    # Both are convs with biases: checked by _fused_1x1_ok.
    shortcut = cast(SConv1d, shortcut)
    bias = (cast(torch.Tensor, shortcut.conv.conv.bias) + cast(torch.Tensor, conv.conv.conv.bias)).view(-1, 1)
    w_s = conv_weight(shortcut.conv.conv).detach()[:, :, 0]
    w_c = conv_weight(conv.conv.conv).detach()[:, :, 0]
    return conv1x1_pair_sum(bias, w_s, x, w_c, h)


def set_reassociation(module: nn.Module, allow: bool) -> None:
    """Let every layer under ``module`` use its faster, not bit-exact formulation
    (``allow``; see :mod:`ecdc.models.fastpaths`) or only the reference's exact arithmetic."""
    for m in module.modules():
        if isinstance(m, (NormConv1d, NormConvTranspose1d, SEANetResnetBlock)):
            m.allow_reassociation = bool(allow)


def run_layers(layers: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply SEANet ``layers`` in order, like ``nn.Sequential``, with identical results.

    At inference an ELU works in place on the previous layer's fresh output (never on the
    caller's tensor), saving an allocation and a pass over the activation.
    """
    inference = not torch.is_grad_enabled()
    for i, layer in enumerate(layers):
        if inference and i > 0 and isinstance(layer, nn.ELU):
            x = F.elu_(x, alpha=layer.alpha)
        else:
            x = layer(x)
    return x


def run_layers_batched(layers: Iterable[nn.Module], x: torch.Tensor, conv_batch: int) -> torch.Tensor:
    """:func:`run_layers` on a batch of independent items, with every layer but the LSTMs
    given at most ``conv_batch`` items at a time; each LSTM gets the whole batch.

    Why: an LSTM step is a matrix product over the batch whose cost is dominated by reading
    its weights, so 16 items cost little more than 4 (6.2 against 9.7 ms per 48 kHz segment
    measured on 2 cores), while convolutions over many items at once spill out of the cache.
    Each item's result is the one the same sub-batch gives in :func:`run_layers` (the LSTM
    gives the same bits for any batch of 4 or more items).
    """
    if x.shape[0] <= conv_batch:
        return run_layers(layers, x)
    group: list[nn.Module] = []
    for layer in [*layers, None]:
        if layer is not None and not isinstance(layer, SLSTM):
            group.append(layer)
            continue
        if group:
            x = torch.cat([run_layers(group, x[i:i + conv_batch]) for i in range(0, x.shape[0], conv_batch)])
            group = []
        if layer is not None:
            x = layer(x)
    return x


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
                 pad_mode: str = "reflect", conv_shortcut: bool = True) -> None:
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
                layers.append(SEANetResnetBlock(width, dilation=DILATION_BASE ** j, conv_shortcut=conv_shortcut,
                                                **conv_kw))
            layers += [_elu(), SConv1d(width, width * 2, ratio * 2, stride=ratio, **conv_kw)]
            width *= 2
        if lstm_layers:
            layers.append(SLSTM(width, num_layers=lstm_layers))
        layers += [_elu(), SConv1d(width, dimension, LAST_KERNEL_SIZE, **conv_kw)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.model, x)


class SEANetDecoder(nn.Module):
    """Latent ``[B, dimension, F]`` -> audio ``[B, channels, F * prod(ratios)]`` (untrimmed).

    ``exact=False`` allows faster, not bit-exact inference arithmetic (see :meth:`set_exact`).
    """

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 n_residual_layers: int = 1, ratios: Sequence[int] = (8, 5, 4, 2),
                 norm: str = "weight_norm", causal: bool = False, lstm_layers: int = 2,
                 pad_mode: str = "reflect", trim_right_ratio: float = 1.0, exact: bool = True,
                 conv_shortcut: bool = True) -> None:
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
                layers.append(SEANetResnetBlock(width, dilation=DILATION_BASE ** j, conv_shortcut=conv_shortcut,
                                                **conv_kw))
        layers += [_elu(), SConv1d(n_filters, channels, LAST_KERNEL_SIZE, **conv_kw)]
        self.model = nn.Sequential(*layers)
        self.set_exact(exact)

    def set_exact(self, exact: bool = True) -> None:
        """``exact``: the reference's arithmetic, bit for bit. Otherwise inference on CPU
        uses faster formulations of the same sums (transposed convs as one matrix product,
        fused 1x1 convs), equal to the exact output to float rounding (~1e-7 relative)."""
        set_reassociation(self, not exact)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return run_layers(self.model, z)
