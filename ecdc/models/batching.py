"""How segments are grouped into batched passes, the one rule for whole-file and streaming.

:meth:`~ecdc.models.EncodecModel.encode` / ``decode`` stack consecutive equal-shaped
segments into one pass, and a batched pass can round differently from single ones. The
streaming engines (:mod:`ecdc.models.streaming`) must therefore form exactly the same
groups to give the same bits; both use :class:`Runs` with the keys below.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def audio_key(wav: torch.Tensor) -> tuple:
    """What must be equal for two audio segments to be encoded in one pass."""
    return tuple(wav.shape)


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
