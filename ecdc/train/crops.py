"""Training crops and the validation set, and the loaders over them.

:class:`CropDataset` draws item ``i`` as a pure function of ``(seed, i)``; with
:class:`StepSampler` a run resumes at any step with the same data. :class:`ValidationSet`
is a fixed, ordered list of crops. Both read :class:`~ecdc.train.data.AudioCache`
entries; see :mod:`ecdc.train.data` for the whole pipeline.
"""

from __future__ import annotations

import math
import signal
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .corpus import FULL_SCALE, DataError, PathLike

if TYPE_CHECKING:
    from .data import AudioCache

#: Virtual length of :class:`CropDataset`: items are generated, never enumerated.
VIRTUAL_LENGTH = 2 ** 62


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
                 gain_db: tuple[float, float] = (-10.0, 6.0), seed: int = 0,
                 max_clipped: float = 0.001, clip_retries: int = 4,
                 groups: Sequence[str] | None = None) -> None:
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
        self.files: list[Path] = []
        npys: list[str] = []
        frames: list[int] = []
        labels: list[str] = []
        for i, file in enumerate(files):
            entry = cache._usable_entry(file)
            if entry is None:
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
        self.group_names: list[str] = sorted(set(labels))
        self._group_files = [np.asarray([i for i, g in enumerate(labels) if g == name], dtype=np.int64)
                             for name in self.group_names]
        self._group_cumulative = [np.cumsum(self.frames[idx]) for idx in self._group_files]
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

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

    def _draw(self, index: int) -> tuple[CropInfo, np.ndarray]:
        if not 0 <= index < VIRTUAL_LENGTH:
            raise IndexError(f"item {index} out of range")
        rng = _rng(self.seed, index)
        best: tuple[float, int, int, np.ndarray] | None = None
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
        assert best is not None  # the loop runs at least once
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

    def batch_indices(self, step: int) -> list[int]:
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
                      pin_memory: bool | None = None, prefetch_factor: int = 4) -> DataLoader:
    """An endless loader whose n-th batch is step ``start_step + n`` of this rank.

    ``pin_memory`` defaults to whether CUDA is available. The loader gets its own torch
    generator, so creating it does not advance torch's global RNG (items do not use it).
    """
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    sampler = StepSampler(batch_size, rank, world_size, start_step)
    generator = torch.Generator().manual_seed(int(getattr(dataset, "seed", 0)))
    extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
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
                 crops_per_file: int = 8, max_items: int | None = None,
                 max_clipped: float = 0.001) -> None:
        if seconds <= 0 or crops_per_file < 1 or (max_items is not None and max_items < 0):
            raise DataError("invalid validation settings: seconds > 0, crops_per_file >= 1 "
                            "and max_items >= 0 are needed")
        self.cache = cache
        self.segment_samples = max(1, round(seconds * cache.sample_rate))
        seg = self.segment_samples
        crops: list[ValidCrop] = []
        npys: list[str] = []
        for file in files:
            entry = cache._usable_entry(file)
            if entry is None:
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

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The crops in order (as iterating by index until IndexError did before)."""
        return (self[k] for k in range(len(self)))

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
