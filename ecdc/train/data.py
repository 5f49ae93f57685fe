"""Training data for ``ecdc train``: file discovery, train/valid split, decode cache, crops.

The pipeline, and why it is shaped this way:

* :func:`find_audio_files` lists audio files under one or more folders, recursively and in
  sorted order, so the same folders always give the same list.
* :func:`split_files` sends a file to validation when the SHA-1 of its path *relative to its
  root folder* falls under ``valid_fraction``: the split survives moving the corpus and
  adding or removing other files. Explicit ``valid_folders`` replace the hash split.
* :class:`AudioCache` decodes every file once (any format soundfile reads), resamples it to
  the model rate and mixes it to the model's channel count (:mod:`ecdc.audio`), and stores
  it as an int16 ``.npy``. Random crops then come from ``np.load(mmap_mode="r")`` instead of
  seeking inside compressed streams, which is slow. Unreadable files are skipped with a
  :class:`DataWarning`.
* :class:`CropDataset` is map-style with a huge virtual length: item ``i`` is a pure function
  of ``(seed, i)``. Together with :class:`StepSampler` (batch ``step`` on rank ``r`` is items
  ``(step * world + r) * batch + j``) a run resumes at any step with the exact same data and
  no saved loader state, and ranks and loader workers never share a random stream. Nothing
  here touches numpy's or torch's global RNG.
* :class:`ValidationSet` is a fixed, ordered list of evenly spaced crops of the validation
  files.

Discovery, the split and the shared errors live in :mod:`ecdc.train.corpus`, the datasets,
sampler and loaders in :mod:`ecdc.train.crops`; this module holds the decode cache (whose
workers call this module's ``read_audio`` and ``_build_entry``) and :func:`build_datasets`,
and every public name of the pipeline is importable from here.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..audio import read_audio, resample, to_channels
from ..errors import EcdcError
from .corpus import (
    AUDIO_EXTENSIONS,
    FULL_SCALE,
    CacheWriteError,
    DataError,
    DataWarning,
    PathLike,
    find_audio_files,
    folder_groups,
    split_files,
    valid_hash,
)
from .crops import (
    VIRTUAL_LENGTH,
    CropDataset,
    CropInfo,
    StepSampler,
    ValidationSet,
    ValidCrop,
    ignore_stop_signals,
    make_train_loader,
    make_valid_loader,
)

__all__ = [
    "AUDIO_EXTENSIONS", "FULL_SCALE", "VIRTUAL_LENGTH", "PathLike",
    "DataError", "CacheWriteError", "DataWarning",
    "find_audio_files", "valid_hash", "split_files", "folder_groups",
    "AudioCache",
    "CropInfo", "CropDataset", "StepSampler", "ignore_stop_signals", "make_train_loader",
    "ValidCrop", "ValidationSet", "make_valid_loader",
    "build_datasets",
]

#: Bumped whenever the cache's content changes meaning, so old entries are not reused.
_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------
# decode cache


class _Entry(NamedTuple):
    state: tuple[int, int]  # (size, mtime_ns) of the source when it was looked up
    npy: Path
    frames: int


class _Job(NamedTuple):
    pos: int  # position in the list given to prepare()
    file: Path
    src: str  # resolved path
    state: tuple[int, int]
    npy: Path


def _to_int16(wav: np.ndarray) -> np.ndarray:
    """Float [-1, 1] to int16; peaks past full scale (lossy decoders, resampling) saturate."""
    clipped = np.clip(wav, -1.0, FULL_SCALE / 32768.0)
    return np.ascontiguousarray(np.round(clipped * 32768.0).astype(np.int16))


def _npy_frames(npy: Path) -> int | None:
    """Number of frames of a complete int16 [C, T] cache entry, or None if unusable."""
    try:
        with open(npy, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            header = f.tell()
        size = os.stat(npy).st_size
    except (OSError, ValueError):
        return None
    if dtype != np.dtype(np.int16) or fortran or len(shape) != 2 or shape[1] == 0:
        return None
    if size != header + 2 * shape[0] * shape[1]:  # truncated by a crash
        return None
    return int(shape[1])


def _build_entry(src: str, dst: str, sample_rate: int, channels: int) -> tuple[str | None, int]:
    """Decode ``src`` into the cache file ``dst``; return (why it is unusable or None, frames).

    Runs in pool workers. Source problems are returned as a reason; failing to write the
    cache raises, since skipping every file on a full disk would hide the real problem.
    """
    try:
        wav, rate = read_audio(src)
        wav = to_channels(resample(wav, rate, sample_rate), channels)
        data = _to_int16(wav)
    except (EcdcError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        return str(exc) or type(exc).__name__, 0
    if data.shape[1] == 0:
        return "no audio samples", 0
    target = Path(dst)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write elsewhere and rename: a reader (another DDP rank) never sees a partial file,
        # and two processes building the same entry both end up with a complete one.
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise CacheWriteError(f"cannot write the decode cache in {target.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CacheWriteError(f"cannot write the decode cache in {target.parent}: {exc.strerror or exc}") from None
        raise
    # Entries of older versions of this file (same path, rate, channels) are now stale.
    for old in target.parent.glob(target.name.rsplit("-", 1)[0] + "-*.npy"):
        if old != target:
            try:
                old.unlink()
            except OSError:
                pass
    return None, int(data.shape[1])


class AudioCache:
    """Decoded, resampled, channel-mixed copies of audio files as int16 ``.npy`` [C, T].

    An entry is keyed by the file's absolute (resolved) path, size, mtime, and the target
    sample rate and channel count, so a modified file is decoded again and models with
    different rates can share one ``cache_dir``. Entries are written to a temp file and
    renamed, so several processes (DDP ranks) may build the cache at once; letting rank 0
    call :meth:`prepare` before the others just saves the duplicated work.
    """

    def __init__(self, cache_dir: PathLike, sample_rate: int, channels: int) -> None:
        if sample_rate <= 0 or channels <= 0:
            raise DataError(f"invalid sample rate {sample_rate} or channel count {channels}")
        self.cache_dir = Path(cache_dir)
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self._entries: dict[str, _Entry] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_entries"] = {}  # a per-process memo; not worth pickling to workers
        return state

    def _locate(self, file: PathLike) -> tuple[str, tuple[int, int], Path]:
        """(resolved source path, (size, mtime_ns), entry path); raises OSError if gone."""
        src = str(Path(file).resolve())
        st = os.stat(src)
        state = (int(st.st_size), int(st.st_mtime_ns))
        who = hashlib.sha1(f"{src}\0{self.sample_rate}\0{self.channels}\0v{_CACHE_VERSION}"
                           .encode("utf-8", "surrogateescape")).hexdigest()
        when = hashlib.sha1(f"{state[0]}\0{state[1]}".encode()).hexdigest()
        stem = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(src).stem)[:40]
        return src, state, self.cache_dir / who[:2] / f"{stem}-{who[2:18]}-{when[:12]}.npy"

    def _lookup(self, file: PathLike) -> tuple[str, tuple[int, int], Path, _Entry | None]:
        """Like :meth:`_locate`, plus the entry if one is complete on disk (else None)."""
        src, state, npy = self._locate(file)
        entry = self._entries.get(src)
        if entry is not None and entry.state == state and entry.npy == npy:
            return src, state, npy, entry
        frames = _npy_frames(npy)
        if frames is None:
            return src, state, npy, None
        entry = _Entry(state, npy, frames)
        self._entries[src] = entry
        return src, state, npy, entry

    def prepare(self, files: Sequence[PathLike], num_workers: int = 2,
                progress: Callable[[int, int], None] | None = None) -> list[Path]:
        """Make sure every file is in the cache; return the usable ones, in input order.

        Missing entries are decoded by ``num_workers`` processes (0: in this process).
        Unreadable or empty files are skipped with a :class:`DataWarning`. ``progress``,
        if given, is called as ``progress(done, total)`` over the files to decode.
        """
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        usable: dict[int, Path] = {}
        todo: list[_Job] = []
        for pos, file in enumerate(files):
            try:
                src, state, npy, entry = self._lookup(file)
            except OSError as exc:
                _skip(file, exc.strerror or str(exc))
                continue
            if entry is not None:
                usable[pos] = Path(file)
            else:
                todo.append(_Job(pos, Path(file), src, state, npy))
        # Largest first, so one big file does not run alone at the end.
        todo.sort(key=lambda job: -job.state[0])
        results = self._run(todo, num_workers, progress)
        for job in todo:
            reason, frames = results[job.pos]
            if reason is not None:
                _skip(job.file, reason)
                continue
            # Keyed by the state seen before decoding: a file changed meanwhile is redone later.
            self._entries[job.src] = _Entry(job.state, job.npy, frames)
            usable[job.pos] = job.file
        return [usable[pos] for pos in sorted(usable)]

    def _run(self, todo: list[_Job], num_workers: int,
             progress: Callable[[int, int], None] | None) -> dict[int, tuple[str | None, int]]:
        """Decode the jobs; a worker that dies (a decoder crash) costs only its own file."""
        results: dict[int, tuple[str | None, int]] = {}
        total = len(todo)

        def done(pos: int, result: tuple[str | None, int]) -> None:
            results[pos] = result
            if progress is not None:
                progress(len(results), total)

        if num_workers == 0 or total <= 1:
            for job in todo:
                done(job.pos, _build_entry(job.src, str(job.npy), self.sample_rate, self.channels))
            return results
        workers, isolate = min(num_workers, total), False
        while len(results) < total:
            remaining = [job for job in todo if job.pos not in results]
            try:
                with ProcessPoolExecutor(max_workers=1 if isolate else workers) as pool:
                    futures = [(job.pos, pool.submit(_build_entry, job.src, str(job.npy),
                                                     self.sample_rate, self.channels))
                               for job in remaining]
                    for pos, future in futures:
                        done(pos, future.result())
            except BrokenProcessPool:
                if isolate:
                    # One worker runs the jobs in order: the first unfinished one crashed it.
                    crashed = next(job for job in remaining if job.pos not in results)
                    done(crashed.pos, ("the decoder crashed on this file", 0))
                isolate = True  # retry the rest one at a time to find the culprit
        return results

    def is_cached(self, file: PathLike) -> bool:
        """Whether ``file`` has a complete, current cache entry (never decodes)."""
        try:
            return self._lookup(file)[3] is not None
        except OSError:
            return False

    def path(self, file: PathLike) -> Path:
        """The cache entry of ``file`` (decoding it first if needed)."""
        return self._entry(file).npy

    def frames(self, file: PathLike) -> int:
        """Length of ``file`` in samples at the cache's sample rate."""
        return self._entry(file).frames

    def array(self, file: PathLike) -> np.memmap:
        """The decoded audio of ``file``, int16 [C, T], memory-mapped read-only."""
        return np.load(self._entry(file).npy, mmap_mode="r")

    def _usable_entry(self, file: PathLike) -> _Entry | None:
        """:meth:`_entry`, or None, with a :class:`DataWarning` naming the caller's caller,
        for a file that cannot be used; a cache that cannot be written still raises. For the
        datasets' constructors, which skip such files."""
        try:
            return self._entry(file)
        except CacheWriteError:
            raise
        except DataError as exc:
            warnings.warn(f"skipping: {exc}", DataWarning, stacklevel=3)
            return None

    def _entry(self, file: PathLike) -> _Entry:
        try:
            src, state, npy, entry = self._lookup(file)
        except OSError as exc:
            raise DataError(f"cannot read {file}: {exc.strerror or exc}") from None
        if entry is None:
            reason, frames = _build_entry(src, str(npy), self.sample_rate, self.channels)
            if reason is not None:
                raise DataError(f"cannot use {file}: {reason}")
            entry = _Entry(state, npy, frames)
            self._entries[src] = entry
        return entry


def _skip(file: PathLike, reason: str) -> None:
    warnings.warn(f"skipping {file}: {reason}", DataWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# all together


def build_datasets(train_folders: Sequence[PathLike], cache_dir: PathLike, sample_rate: int,
                   channels: int, valid_folders: Sequence[PathLike] | None = None,
                   valid_fraction: float = 0.03, segment_seconds: float = 1.0,
                   gain_db: tuple[float, float] = (-10.0, 6.0), seed: int = 0,
                   valid_seconds: float = 4.0, valid_crops_per_file: int = 8,
                   valid_items: int | None = None,
                   num_workers: int = 2) -> tuple[CropDataset, ValidationSet]:
    """Find, split, cache and wrap the data of a training run.

    With ``valid_folders`` those are the validation files (and are left out of training if
    also found under ``train_folders``); otherwise ``valid_fraction`` of the files under
    ``train_folders`` go to validation by the hash split of :func:`split_files`.
    """
    cache = AudioCache(cache_dir, sample_rate, channels)
    files = find_audio_files(train_folders)
    if valid_folders:
        valid_files = find_audio_files(valid_folders)
        held_out = {os.path.abspath(f) for f in valid_files}
        train_files = [f for f in files if os.path.abspath(f) not in held_out]
    else:
        train_files, valid_files = split_files(files, [Path(f) for f in train_folders], valid_fraction)
    if not train_files:
        raise DataError("no audio files for training in " + ", ".join(str(f) for f in train_folders))
    usable = cache.prepare(list(train_files) + list(valid_files), num_workers=num_workers)
    ok = set(usable)
    train = CropDataset(cache, [f for f in train_files if f in ok], segment_seconds, gain_db, seed)
    valid = ValidationSet(cache, [f for f in valid_files if f in ok], valid_seconds,
                          valid_crops_per_file, valid_items)
    return train, valid
