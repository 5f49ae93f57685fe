"""Process settings for fast CPU inference: threads and the C allocator.

Threads. PyTorch sizes its thread pool by the machine's cores, which is wrong in two
common cases: a container limited by a CPU quota (cgroup ``cpu.max``) on a large host,
where it starts one thread per host core and the threads then fight over the quota; and a
machine shared with other busy processes. In both, fewer threads are faster, often much
faster: the LSTM runs one small parallel region per time step, and every one of them
waits for the slowest thread, so a thread that is descheduled stalls all (measured on a
2-core machine under load: the 24 kHz model's LSTM took 0.3-12 s on 2 threads against
0.12-0.2 s on 1 for 10 s of audio; on an idle machine 2 threads are faster).
:func:`configure_threads` sets torch's intra-op pool (OpenMP and MKL), optionally a
separate count for the LSTMs, and disables inter-op parallelism, which inference never
uses. Some kernels pick another algorithm or split their work differently for another
thread count and so round differently; ecdc and the reference do the same at any given
count. The LSTM's results do not depend on it.

Allocator. :func:`tune_allocator` stops glibc from returning activation memory to the
OS after every pass (and faulting it in again on the next), which costs 10-20% of the
compute.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
from pathlib import Path

import torch

__all__ = ["available_cpus", "configure_threads", "lstm_threads", "tune_allocator"]


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


_UNSET = object()
_lstm_threads: int | None | object = _UNSET


def configure_threads(n: int | None = None, lstm_threads: int | None = None) -> int:
    """Use ``n`` threads for torch's CPU kernels (default: :func:`available_cpus`).

    Sets the intra-op pool (``torch.set_num_threads``, which sets OpenMP's and MKL's) and,
    if the process has not used it yet, the inter-op pool to one thread. ``lstm_threads``:
    threads for ecdc's LSTMs at inference (None: the same as everything else); ``1``
    protects against the LSTM's collapse on a machine whose cores are busy with other
    work, at some cost on an idle one. Returns the thread count now in effect.
    """
    global _lstm_threads
    if n is None:
        n = available_cpus()
    n = int(n)
    if n < 1 or (lstm_threads is not None and int(lstm_threads) < 1):
        raise ValueError(f"thread counts must be at least 1, got {n} and {lstm_threads}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already started (it can be set once, before first use); inference never uses it
    _lstm_threads = None if lstm_threads is None else int(lstm_threads)
    return torch.get_num_threads()


def lstm_threads() -> int | None:
    """Threads for ecdc's LSTMs at inference: set by :func:`configure_threads`, else the
    ``ECDC_LSTM_THREADS`` environment variable, else None (torch's setting)."""
    global _lstm_threads
    if _lstm_threads is _UNSET:
        raw = os.environ.get("ECDC_LSTM_THREADS", "").strip()
        try:
            _lstm_threads = max(1, int(raw)) if raw else None
        except ValueError:
            _lstm_threads = None
    return _lstm_threads  # type: ignore[return-value]


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep freed activation memory in the process instead of returning it to the OS.

    glibc serves blocks above its mmap threshold (at most 32 MiB, adapted at run time)
    with fresh ``mmap`` s and trims the heap top beyond twice that, so every inference pass
    over a few seconds of audio page-faults its activations in again: ~40-90k minor
    faults, 0.1-0.25 s of kernel time per 10 s of audio (about 10-20% of the compute) on
    the 2-core test machine. Raising both thresholds (to :data:`MMAP_THRESHOLD` and
    :data:`TRIM_THRESHOLD`) lets the next pass reuse the memory. Peak RSS is unchanged
    (the same tensors are alive at the peak); memory freed after it is kept, up to the
    trim threshold, until the process exits.

    Idempotent; a no-op (False) where the C library is not glibc, or when the environment
    sets ``ECDC_TUNE_MALLOC=0``. Returns whether the settings are in effect. Called when
    an :class:`~ecdc.models.EncodecModel` is built.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("ECDC_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    del gnu_get_libc_version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _tuned = ok
    return ok
