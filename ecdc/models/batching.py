"""How segments are grouped into batched passes, the one rule for whole-file and streaming.

:meth:`~ecdc.models.EncodecModel.encode` / ``decode`` stack consecutive equal-shaped
segments into one pass, and a batched pass can round differently from single ones. The
streaming engines (:mod:`ecdc.models.streaming`) must therefore form exactly the same
groups to give the same bits; both use :class:`Runs` with the keys below.
:func:`encode_batched` is how one such pass is encoded: batched only where batching keeps
every segment's codes those of the segment coded alone (Meta's reference codes one
segment at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from .seanet import run_layers_batched
from .windows import split_at_lstm

if TYPE_CHECKING:
    from .quantizer import ResidualVectorQuantizer

#: Alignment of torch's CPU allocations, in bytes: a latent computed alone starts on it.
_ALLOC_ALIGNMENT = 64


def audio_key(wav: torch.Tensor) -> tuple:
    """What must be equal for two audio segments to be encoded in one pass."""
    return tuple(wav.shape)


def encode_batched(encoder: nn.Sequential, quantizer: ResidualVectorQuantizer, x: torch.Tensor,
                   items: int, num_codebooks: int, conv_batch: int) -> torch.Tensor:
    """Codes ``[S * items, K, T]`` of ``x``, ``S`` segments of ``items`` batch items each,
    batched where that gives the same bits: each segment's codes are exactly those of
    ``encoder`` and ``quantizer`` run on that segment alone, as the reference runs them.

    * The convolutions run batched, ``conv_batch`` items per call (see
      :func:`run_layers_batched`): they give the same bits batched as alone.
    * The LSTM runs one segment at a time. torch's (oneDNN's) LSTM rounds differently for
      a batch of one than for any larger batch (measured for 2 to 16, at 1, 2 and 4
      threads): batched, ~80 % of the 48 kHz latent's values differ in their last bits,
      and with codebooks that have near-ties (close codes, as in any codebook learned
      from similar frames) thousands of codes of a 2.5 s clip then differ from the
      reference's (tests/test_parity_ties.py). This gives up the LSTM's share of the
      batching speed-up: a 16-segment pass was 25-40 % slower at 1 thread, ~15 % at 2,
      than with the LSTM batched (at 1 thread about as fast as coding segments one at a
      time, at 2 threads ~20 % faster than that).
    * The quantiser runs one segment at a time too, so that its arithmetic is the
      reference's, not merely close to it: for one item the rows ``[T, D]`` of a stage
      are a column-major view of the latent and torch sums each row's squares (the
      ``|x|^2`` of the distance) across rows, in blocks; the rows of several items are
      copied into one row-major matrix and summed along each row, in another order of
      additions (about half the sums then differ in their last bit; no code was seen to
      flip from that alone, as the term is common to all codes of a row, but nothing
      bounds it). Each call gets a contiguous latent on the allocator's alignment, as a
      latent computed alone is (a slice that is not is copied). It costs nothing
      measurable: the distance GEMMs are as large.
    """
    n = x.shape[0]
    before, lstm, after = split_at_lstm(encoder)
    latent = run_layers_batched(before, x, conv_batch)
    if lstm is not None:
        latent = torch.cat([lstm(latent[i : i + items]) for i in range(0, n, items)])
        latent = run_layers_batched(after, latent, conv_batch)
    codes = []
    for i in range(0, n, items):
        part = latent[i : i + items]
        if not part.is_contiguous() or part.data_ptr() % _ALLOC_ALIGNMENT:
            part = part.clone(memory_format=torch.contiguous_format)
        codes.append(quantizer.encode(part, num_codebooks))
    return torch.cat(codes)


def codes_key(segment: Any) -> tuple:
    """What must be equal for two :class:`~ecdc.models.EncodedSegment` s to be decoded in
    one pass: codes shape, whether there is a scale, device."""
    return (tuple(segment.codes.shape), segment.scale is None, segment.codes.device)


class Runs:
    """Consecutive runs of at most ``limit`` items with equal ``key``, formed greedily in
    order; a run is handed out as soon as it is closed."""

    def __init__(self, limit: int, key: Callable[[Any], Any]) -> None:
        self.limit = limit
        self.key = key
        self.items: list[Any] = []

    def add(self, item: Any) -> list[list[Any]]:
        """Append ``item``; return the runs this closes (zero, one or two)."""
        closed = []
        if self.items and self.key(self.items[0]) != self.key(item):
            closed.append(self.close_run())
        self.items.append(item)
        if len(self.items) >= self.limit:
            closed.append(self.close_run())
        return closed

    def close_run(self) -> list[Any]:
        """The open run (possibly empty), closed."""
        run, self.items = self.items, []
        return run


def runs(items: Iterable[Any], limit: int, key: Callable[[Any], Any]) -> list[list[Any]]:
    """All of ``items`` split into :class:`Runs` at once."""
    grouper = Runs(limit, key)
    out = [run for item in items for run in grouper.add(item)]
    last = grouper.close_run()
    if last:
        out.append(last)
    return out
