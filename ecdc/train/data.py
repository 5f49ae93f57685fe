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
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import tempfile
import warnings
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..audio import read_audio, resample, to_channels
from ..errors import EcdcError

PathLike = Union[str, os.PathLike]

#: File name endings (lower case) that :func:`find_audio_files` picks up; all are formats
#: libsndfile can decode (mp3 needs libsndfile >= 1.1).
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64",
})

#: int16 magnitude counted as full scale when looking for clipped crops.
FULL_SCALE = 32767

#: Bumped whenever the cache's content changes meaning, so old entries are not reused.
_CACHE_VERSION = 1

#: Virtual length of :class:`CropDataset`: items are generated, never enumerated.
VIRTUAL_LENGTH = 2 ** 62


class DataError(EcdcError):
    """The training data cannot be used (no readable audio, bad folder or setting)."""


class CacheWriteError(DataError):
    """The decode cache cannot be written (full disk, permissions): fatal, not a skipped file."""


class DataWarning(UserWarning):
    """A file was skipped (unreadable, empty) but training can go on without it."""


# ---------------------------------------------------------------------------------------
# discovery and split


def find_audio_files(folders: Sequence[PathLike],
                     extensions: Optional[Sequence[str]] = None) -> List[Path]:
    """Audio files under ``folders``, recursively, in a deterministic order.

    Files of each folder are sorted by their relative path and the folders' lists joined
    in the order given; a file reached twice (nested folders) is kept once. Hidden files
    and folders (leading ``.``) are ignored; symlinked folders are followed once.
    """
    exts = AUDIO_EXTENSIONS if extensions is None else frozenset(e.lower() for e in extensions)
    seen = set()
    out: List[Path] = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise DataError(f"not a folder: {root}")
        found = []
        visited = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in visited:  # a symlink loop
                dirnames[:] = []
                continue
            visited.add((st.st_dev, st.st_ino))
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                    continue
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
        for _, path in sorted(found):
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def valid_hash(relative_path: str) -> float:
    """Where a file falls in [0, 1) for the hash split: SHA-1 of its relative POSIX path."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_files(files: Sequence[Path], roots: Sequence[Path],
                valid_fraction: float) -> Tuple[List[Path], List[Path]]:
    """Split ``files`` into (train, valid) by a hash of each path relative to its root.

    Each file is taken relative to the first of ``roots`` that contains it, so the split
    depends neither on where the corpus lives nor on which other files exist. Order is kept.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    abs_roots = [Path(os.path.abspath(r)) for r in roots]
    train: List[Path] = []
    valid: List[Path] = []
    for file in files:
        rel = _relative_to_roots(file, abs_roots).as_posix()
        (valid if valid_hash(rel) < valid_fraction else train).append(Path(file))
    return train, valid


def folder_groups(files: Sequence[Path], roots: Sequence[Path]) -> List[str]:
    """Each file's first folder below the data folder holding it (``speech/a.wav`` ->
    ``speech``; a file directly in a data folder -> ``""``), for balanced sampling."""
    abs_roots = [Path(os.path.abspath(r)) for r in roots]
    labels: List[str] = []
    for file in files:
        parts = _relative_to_roots(file, abs_roots).parts
        labels.append(parts[0] if len(parts) > 1 else "")
    return labels


def _relative_to_roots(file: PathLike, abs_roots: Sequence[Path]) -> Path:
    """``file`` relative to the first of ``abs_roots`` (absolute paths) that contains it."""
    path = Path(os.path.abspath(file))
    for root in abs_roots:
        try:
            return path.relative_to(root)
        except ValueError:
            continue
    raise DataError(f"{file} is not inside any of the data folders")


# ---------------------------------------------------------------------------------------
# decode cache


class _Entry(NamedTuple):
    state: Tuple[int, int]  # (size, mtime_ns) of the source when it was looked up
    npy: Path
    frames: int


class _Job(NamedTuple):
    pos: int  # position in the list given to prepare()
    file: Path
    src: str  # resolved path
    state: Tuple[int, int]
    npy: Path


def _to_int16(wav: np.ndarray) -> np.ndarray:
    """Float [-1, 1] to int16; peaks past full scale (lossy decoders, resampling) saturate."""
    clipped = np.clip(wav, -1.0, FULL_SCALE / 32768.0)
    return np.ascontiguousarray(np.round(clipped * 32768.0).astype(np.int16))


def _npy_frames(npy: Path) -> Optional[int]:
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


def _build_entry(src: str, dst: str, sample_rate: int, channels: int) -> Tuple[Optional[str], int]:
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
        self._entries: Dict[str, _Entry] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_entries"] = {}  # a per-process memo; not worth pickling to workers
        return state

    def _locate(self, file: PathLike) -> Tuple[str, Tuple[int, int], Path]:
        """(resolved source path, (size, mtime_ns), entry path); raises OSError if gone."""
        src = str(Path(file).resolve())
        st = os.stat(src)
        state = (int(st.st_size), int(st.st_mtime_ns))
        who = hashlib.sha1(f"{src}\0{self.sample_rate}\0{self.channels}\0v{_CACHE_VERSION}"
                           .encode("utf-8", "surrogateescape")).hexdigest()
        when = hashlib.sha1(f"{state[0]}\0{state[1]}".encode()).hexdigest()
        stem = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(src).stem)[:40]
        return src, state, self.cache_dir / who[:2] / f"{stem}-{who[2:18]}-{when[:12]}.npy"

    def _lookup(self, file: PathLike) -> Tuple[str, Tuple[int, int], Path, Optional[_Entry]]:
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
                progress: Optional[Callable[[int, int], None]] = None) -> List[Path]:
        """Make sure every file is in the cache; return the usable ones, in input order.

        Missing entries are decoded by ``num_workers`` processes (0: in this process).
        Unreadable or empty files are skipped with a :class:`DataWarning`. ``progress``,
        if given, is called as ``progress(done, total)`` over the files to decode.
        """
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        usable: Dict[int, Path] = {}
        todo: List[_Job] = []
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

    def _run(self, todo: List[_Job], num_workers: int,
             progress: Optional[Callable[[int, int], None]]) -> Dict[int, Tuple[Optional[str], int]]:
        """Decode the jobs; a worker that dies (a decoder crash) costs only its own file."""
        results: Dict[int, Tuple[Optional[str], int]] = {}
        total = len(todo)

        def done(pos: int, result: Tuple[Optional[str], int]) -> None:
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
# training crops


class CropInfo(NamedTuple):
    """Where training item ``i`` comes from."""
    file: Path
    offset: int      # first sample of the crop in the (resampled) file
    gain_db: float   # gain applied, after capping to the crop's headroom
    clipped: float   # fraction of the crop's samples at full scale (before gain)


def _clipped_fraction(crop: np.ndarray) -> float:
    if crop.size == 0:
        return 0.0
    return float(np.count_nonzero((crop >= FULL_SCALE) | (crop <= -FULL_SCALE))) / crop.size


def _rng(seed: int, index: int) -> np.random.Generator:
    """A generator owned by one item: the same (seed, index) always gives the same draws."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


class CropDataset(Dataset):
    """Random training crops; item ``i`` is a float32 Tensor [C, segment_samples].

    Everything about item ``i`` (file, offset, gain) is drawn from a generator seeded by
    ``(seed, i)``, so it is the same in any process, worker or run. Per item:

    * a file is chosen with probability proportional to its length (a uniformly random
      sample of the whole corpus picks the file), so long files are not under-sampled.
      With ``groups`` (one label per file, e.g. its top folder: speech, music, ...) a
      group is drawn first, uniformly, then a file within it by length, so that a
      category with few hours (speech in a music-heavy corpus) is not starved;
    * a crop offset is uniform over the file; a file shorter than the crop is taken whole
      and zero-padded at the end (the only case of padding);
    * a crop with more than ``max_clipped`` of its samples at full scale (some corpora hold
      clipped recordings) is redrawn, file and offset, up to ``clip_retries`` times; if all
      tries are clipped the least clipped one is used;
    * a gain uniform in dB over ``gain_db`` is applied, lowered where needed so that the
      crop's peak stays <= 1.0: gain never clips, so the model is never taught to reproduce
      clipping. Loud crops therefore get less positive gain than drawn.
    """

    def __init__(self, cache: AudioCache, files: Sequence[PathLike], segment_seconds: float = 1.0,
                 gain_db: Tuple[float, float] = (-10.0, 6.0), seed: int = 0,
                 max_clipped: float = 0.001, clip_retries: int = 4,
                 groups: Optional[Sequence[str]] = None) -> None:
        if segment_seconds <= 0:
            raise DataError(f"segment_seconds must be > 0, got {segment_seconds}")
        low, high = (float(g) for g in gain_db)
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise DataError(f"invalid gain range {gain_db}")
        if clip_retries < 0 or not 0.0 <= max_clipped <= 1.0 or seed < 0:
            raise DataError("clip_retries and seed must be >= 0 and max_clipped in [0, 1]")
        self.cache = cache
        self.segment_samples = max(1, round(segment_seconds * cache.sample_rate))
        self.gain_db = (low, high)
        self.seed = int(seed)
        self.max_clipped = float(max_clipped)
        self.clip_retries = int(clip_retries)
        if groups is not None and len(groups) != len(files):
            raise DataError(f"{len(groups)} group labels for {len(files)} files")
        self.files: List[Path] = []
        npys: List[str] = []
        frames: List[int] = []
        labels: List[str] = []
        for i, file in enumerate(files):
            try:
                entry = cache._entry(file)
            except CacheWriteError:
                raise
            except DataError as exc:
                warnings.warn(f"skipping: {exc}", DataWarning, stacklevel=2)
                continue
            self.files.append(Path(file))
            npys.append(str(entry.npy))
            frames.append(entry.frames)
            labels.append("" if groups is None else str(groups[i]))
        if not self.files:
            raise DataError("no readable training audio" + (f" among {len(files)} files" if files else ""))
        self._npys = npys
        self.frames = np.asarray(frames, dtype=np.int64)
        # Per group (sorted labels, so the draw does not depend on file order): its files'
        # indices and their cumulative lengths.
        self.group_names: List[str] = sorted(set(labels))
        self._group_files = [np.asarray([i for i, g in enumerate(labels) if g == name], dtype=np.int64)
                             for name in self.group_names]
        self._group_cumulative = [np.cumsum(self.frames[idx]) for idx in self._group_files]
        self._maps: "OrderedDict[int, np.ndarray]" = OrderedDict()

    #: Memory maps kept open per process; each holds a file descriptor, so not all of them.
    open_maps = 64

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()  # maps are per process; workers open their own
        return state

    def _map(self, which: int) -> np.ndarray:
        data = self._maps.pop(which, None)
        if data is None:
            data = np.load(self._npys[which], mmap_mode="r")
            while len(self._maps) >= self.open_maps:
                self._maps.popitem(last=False)
        self._maps[which] = data
        return data

    def __len__(self) -> int:
        return VIRTUAL_LENGTH

    def _draw(self, index: int) -> Tuple[CropInfo, np.ndarray]:
        if not 0 <= index < VIRTUAL_LENGTH:
            raise IndexError(f"item {index} out of range")
        rng = _rng(self.seed, index)
        best: Optional[Tuple[float, int, int, np.ndarray]] = None
        for _ in range(self.clip_retries + 1):
            group = int(rng.integers(len(self.group_names))) if len(self.group_names) > 1 else 0
            cumulative = self._group_cumulative[group]
            which = int(self._group_files[group][
                np.searchsorted(cumulative, rng.integers(cumulative[-1]), side="right")])
            length = int(self.frames[which])
            offset = int(rng.integers(length - self.segment_samples + 1)) \
                if length > self.segment_samples else 0
            crop = np.array(self._map(which)[:, offset:offset + self.segment_samples])
            clipped = _clipped_fraction(crop)
            if best is None or clipped < best[0]:
                best = (clipped, which, offset, crop)
            if clipped <= self.max_clipped:
                break
        clipped, which, offset, crop = best
        gain_db = float(rng.uniform(*self.gain_db))
        audio = crop.astype(np.float32) / np.float32(32768.0)
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if peak > 0 and peak * 10 ** (gain_db / 20) > 1.0:
            gain_db = -20 * math.log10(peak)
        audio *= np.float32(10 ** (gain_db / 20))
        np.clip(audio, -1.0, 1.0, out=audio)  # only float rounding can reach past 1.0 here
        if audio.shape[1] < self.segment_samples:
            audio = np.pad(audio, [(0, 0), (0, self.segment_samples - audio.shape[1])])
        return CropInfo(self.files[which], offset, gain_db, clipped), audio

    def crop_info(self, index: int) -> CropInfo:
        """File, offset, applied gain and clipped fraction of item ``index`` (for inspection)."""
        return self._draw(index)[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self._draw(int(index))[1])


class StepSampler(Sampler):
    """Infinite indices in step order: batch ``step`` of rank ``rank`` is the items
    ``(step * world_size + rank) * batch_size + j`` for ``j < batch_size``.

    Resuming at ``start_step`` continues exactly the stream a run from step 0 would have
    produced there, and ranks never share items.
    """

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_step < 0:
            raise DataError(f"invalid sampler settings: batch_size={batch_size}, rank={rank}, "
                            f"world_size={world_size}, start_step={start_step}")
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_step = int(start_step)

    def batch_indices(self, step: int) -> List[int]:
        """The dataset indices of batch ``step`` on this rank."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            yield from self.batch_indices(step)
            step += 1


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the trainer.

    A signal sent to the whole process group (Ctrl-C, ``kill -- -PGID``, ``timeout``, a
    job scheduler) would otherwise kill the workers too, and the trainer would die inside
    the DataLoader instead of finishing its step and saving a checkpoint. Workers still
    exit when the trainer does (the DataLoader watches its parent).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_train_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                      start_step: int = 0, num_workers: int = 2,
                      pin_memory: Optional[bool] = None, prefetch_factor: int = 4) -> DataLoader:
    """An endless loader whose n-th batch is step ``start_step + n`` of this rank.

    ``pin_memory`` defaults to whether CUDA is available. The loader gets its own torch
    generator, so creating it does not advance torch's global RNG (items do not use it).
    """
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    sampler = StepSampler(batch_size, rank, world_size, start_step)
    generator = torch.Generator().manual_seed(int(getattr(dataset, "seed", 0)))
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      drop_last=True, generator=generator, worker_init_fn=ignore_stop_signals, **extra)


# ---------------------------------------------------------------------------------------
# validation


class ValidCrop(NamedTuple):
    file: Path
    offset: int
    frames: int  # real samples in the crop; the rest (short files only) is zero padding


class ValidationSet(Dataset):
    """Fixed validation crops, item ``k`` a float32 Tensor [C, segment_samples], fixed order.

    Each file gives ``min(crops_per_file, T // segment)`` crops (at least one) evenly spaced
    from its start to its end, without gain; a file shorter than the segment gives one crop,
    zero-padded at the end (``crops[k].frames`` says how much is real). Crops with more than
    ``max_clipped`` of samples at full scale are left out, as in training. With
    ``max_items``, at most that many crops are kept, evenly spread over the full list.
    """

    def __init__(self, cache: AudioCache, files: Sequence[PathLike], seconds: float = 4.0,
                 crops_per_file: int = 8, max_items: Optional[int] = None,
                 max_clipped: float = 0.001) -> None:
        if seconds <= 0 or crops_per_file < 1 or (max_items is not None and max_items < 0):
            raise DataError("invalid validation settings: seconds > 0, crops_per_file >= 1 "
                            "and max_items >= 0 are needed")
        self.cache = cache
        self.segment_samples = max(1, round(seconds * cache.sample_rate))
        seg = self.segment_samples
        crops: List[ValidCrop] = []
        npys: List[str] = []
        for file in files:
            try:
                entry = cache._entry(file)
            except CacheWriteError:
                raise
            except DataError as exc:
                warnings.warn(f"skipping: {exc}", DataWarning, stacklevel=2)
                continue
            length = entry.frames
            count = max(1, min(crops_per_file, length // seg))
            span = max(0, length - seg)
            offsets = [span // 2] if count == 1 else [k * span // (count - 1) for k in range(count)]
            data = np.load(entry.npy, mmap_mode="r")
            for offset in offsets:
                if _clipped_fraction(np.asarray(data[:, offset:offset + seg])) > max_clipped:
                    continue
                crops.append(ValidCrop(Path(file), offset, min(seg, length - offset)))
                npys.append(str(entry.npy))
            del data
        if max_items is not None and len(crops) > max_items:
            keep = sorted({round(k * (len(crops) - 1) / max(1, max_items - 1)) for k in range(max_items)})
            crops = [crops[k] for k in keep]
            npys = [npys[k] for k in keep]
        self.crops = crops
        self._npys = npys

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> torch.Tensor:
        crop = self.crops[index]
        data = np.load(self._npys[index], mmap_mode="r")
        audio = np.asarray(data[:, crop.offset:crop.offset + crop.frames], dtype=np.float32) / np.float32(32768.0)
        if crop.frames < self.segment_samples:
            audio = np.pad(audio, [(0, 0), (0, self.segment_samples - crop.frames)])
        return torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))


def make_valid_loader(valid: ValidationSet, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0) -> DataLoader:
    """The validation crops in order; with several ranks, rank ``r`` gets crops r, r+world, ..."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise DataError("invalid validation loader settings")
    return DataLoader(valid, batch_size=batch_size, sampler=list(range(rank, len(valid), world_size)),
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=ignore_stop_signals)


# ---------------------------------------------------------------------------------------
# all together


def build_datasets(train_folders: Sequence[PathLike], cache_dir: PathLike, sample_rate: int,
                   channels: int, valid_folders: Optional[Sequence[PathLike]] = None,
                   valid_fraction: float = 0.03, segment_seconds: float = 1.0,
                   gain_db: Tuple[float, float] = (-10.0, 6.0), seed: int = 0,
                   valid_seconds: float = 4.0, valid_crops_per_file: int = 8,
                   valid_items: Optional[int] = None,
                   num_workers: int = 2) -> Tuple[CropDataset, ValidationSet]:
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
