"""Inference caches of tensors a module derives from its own parameters or buffers.

Two layers use this: weight-normed convs reuse ``g * v / ||v||``
(:class:`ecdc.models.modules.WeightNormConv1d` ...) and codebooks reuse ``|e|^2``
(:class:`ecdc.models.quantizer.EuclideanCodebook`). A cached value is the result of the
same call on the same tensors, hence bit-identical to recomputing it. It is keyed on its
sources (:func:`tensor_key`), so an in-place update (optimiser step, ``copy_``) or a
replacement makes the next use recompute it; ``.to()`` and ``load_state_dict`` drop it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from torch import nn

    # The mixin is always combined with an nn.Module (which is what super() reaches at run
    # time); to mypy it is one, so that its subclasses may use Module's attributes.
    _ModuleBase = nn.Module
else:
    _ModuleBase = object


def tensor_key(t: torch.Tensor) -> tuple:
    """Changes whenever ``t`` is modified in place or replaced (``.to``, ``load_state_dict``).

    The version counter is bumped by every in-place op (optimiser steps, ``copy_``); the
    data pointer, device and dtype catch moves and casts. Writes through ``.data`` bump
    no counter: drop the cache after those.
    """
    return (id(t), t._version, t.data_ptr(), t.device, t.dtype, t.shape)


class DerivedTensorCache(_ModuleBase):
    """Mixin for an ``nn.Module`` (listed before it among the bases) that caches tensors
    derived from its own tensors; each cache is an attribute named in ``_cache_attrs``
    holding ``(key, value)`` or None."""

    _cache_attrs: tuple[str, ...] = ()

    def drop_caches(self) -> None:
        for name in self._cache_attrs:
            setattr(self, name, None)

    def cached(self, attr: str, sources: tuple[torch.Tensor, ...],
               compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The value in cache ``attr`` if ``sources`` are unchanged since it was computed,
        else ``compute()``, stored there."""
        key = tuple([tensor_key(t) for t in sources])
        entry = getattr(self, attr)
        if entry is not None and entry[0] == key:
            return entry[1]
        # A plain tensor even when called under inference mode, so that the cache can be
        # used later outside it.
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
        setattr(self, attr, (key, value))
        return value

    def _apply(self, fn, *args, **kwargs):
        self.drop_caches()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_caches()
        return super()._load_from_state_dict(*args, **kwargs)
