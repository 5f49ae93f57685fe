"""Which part of a batch this process converts: ``--shard K/N``, or the scheduler's variables.

A batch's inputs are expanded in a fixed order (the arguments in turn, each directory
walked sorted), and file ``i`` of that order belongs to shard ``i % N``: every process
that is given the same inputs agrees on the split without talking to the others, and a
rerun takes the same files. Torch-free.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from .errors import EcdcError

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based, as torchrun's ``RANK``)."""

    index: int = 0
    count: int = 1
    source: str = "--shard"  #: where it came from, for messages

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise EcdcError(f"{self.source}: shard {self.index}/{self.count} does not exist "
                            f"(K/N takes K from 0 to N-1)", where="")

    def takes(self, position: int) -> bool:
        """Whether file ``position`` of the batch's order is this shard's."""
        return position % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``K/N`` as ``--shard`` takes it (K from 0 to N-1)."""
    match = _SHARD.fullmatch(text)
    if not match:
        raise EcdcError(f"--shard {text!r}: expected K/N, e.g. 0/4 for the first of four shards", where="")
    return Shard(int(match[1]), int(match[2]))


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard | None:
    """The shard a scheduler gives this process, or None outside one: torchrun's ``RANK`` and
    ``WORLD_SIZE``, or a SLURM array's ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT``
    (less ``SLURM_ARRAY_TASK_MIN``, so ``--array=1-4`` works too)."""
    env = os.environ if env is None else env

    def number(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise EcdcError(f"{name}={env[name]!r} is not a number", where="") from None

    if "WORLD_SIZE" in env and "RANK" in env:
        return Shard(number("RANK"), number("WORLD_SIZE"), "RANK/WORLD_SIZE")
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        low = number("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        return Shard(number("SLURM_ARRAY_TASK_ID") - low, number("SLURM_ARRAY_TASK_COUNT"),
                     "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    return None


def local_device(device: str, env: Mapping[str, str] | None = None) -> str:
    """Under torchrun each rank takes the GPU ``LOCAL_RANK`` names (``cuda`` -> ``cuda:N``)."""
    env = os.environ if env is None else env
    if device in ("cuda", "auto") and "LOCAL_RANK" in env and env["LOCAL_RANK"].isdigit():
        try:
            import torch

            if torch.cuda.is_available():
                return f"cuda:{int(env['LOCAL_RANK']) % max(1, torch.cuda.device_count())}"
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
    return device
