"""The training data pipeline: discovery, split, decode cache, crops, sampler, validation."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from ecdc.errors import EcdcError
from ecdc.train import data
from ecdc.train.data import (
    AudioCache,
    CropDataset,
    DataError,
    DataWarning,
    StepSampler,
    ValidationSet,
    build_datasets,
    find_audio_files,
    folder_groups,
    make_train_loader,
    split_files,
)

RATE = 24000


def tone(seconds: float, rate: int, channels: int = 1, amp: float = 0.5, seed: int = 0) -> np.ndarray:
    """[T, C] float32: a sine per channel plus a little noise, peaking at about ``amp``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    chans = [np.sin(2 * np.pi * (220 + 110 * c) * t) * amp * 0.9 + 0.05 * amp * rng.standard_normal(t.size)
             for c in range(channels)]
    return np.stack(chans, axis=1).astype(np.float32)


def write(path: Path, seconds: float, rate: int = RATE, channels: int = 1, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), tone(seconds, rate, channels, **kw), rate, subtype="PCM_16")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    write(root / "a" / "one.wav", 0.5)
    write(root / "a" / "two.flac", 1.0, seed=1)
    write(root / "b" / "three.wav", 2.0, seed=2)
    write(root / "b" / "sub" / "four.flac", 0.3, seed=3)
    (root / "README.txt").write_text("not audio")
    return root


def test_find_is_sorted_recursive_and_filters(corpus):
    files = find_audio_files([corpus])
    rel = [f.relative_to(corpus).as_posix() for f in files]
    assert rel == ["a/one.wav", "a/two.flac", "b/sub/four.flac", "b/three.wav"]
    assert find_audio_files([corpus, corpus / "b"]) == files  # nested folder: no duplicates
    with pytest.raises(EcdcError):
        find_audio_files([corpus / "missing"])


def test_split_deterministic_and_independent_of_location(tmp_path):
    root = tmp_path / "x" / "corpus"
    for k in range(40):
        write(root / f"d{k % 3}" / f"f{k:02d}.wav", 0.02)
    train, valid = split_files(find_audio_files([root]), [root], 0.3)
    assert 0 < len(valid) < 40 and len(train) + len(valid) == 40
    assert split_files(find_audio_files([root]), [root], 0.3) == (train, valid)

    moved = shutil.copytree(root, tmp_path / "elsewhere" / "deeper" / "c2")
    train2, valid2 = split_files(find_audio_files([moved]), [moved], 0.3)
    rel = lambda files, r: [f.relative_to(r).as_posix() for f in files]  # noqa: E731
    assert rel(train2, moved) == rel(train, root) and rel(valid2, moved) == rel(valid, root)

    # Another root beside it, and files removed, do not move any file across the split.
    other = tmp_path / "other"
    write(other / "zzz.wav", 0.02)
    few = find_audio_files([root])[::2] + find_audio_files([other])
    train3, valid3 = split_files(few, [root, other], 0.3)
    assert set(valid3) - {other / "zzz.wav"} == set(valid) & set(few)
    assert split_files(few, [root, other], 0.0)[1] == []


def test_unreadable_files_skipped_with_warning(tmp_path, corpus):
    (corpus / "a" / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (corpus / "b" / "empty.flac").write_bytes(b"")
    files = find_audio_files([corpus])
    assert len(files) == 6
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    with pytest.warns(DataWarning) as record:
        usable = cache.prepare(files, num_workers=2)
    messages = " ".join(str(w.message) for w in record)
    assert "garbage.wav" in messages and "empty.flac" in messages
    assert [f.name for f in usable] == ["one.wav", "two.flac", "four.flac", "three.wav"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    dataset = CropDataset(cache, usable, segment_seconds=0.1)
    assert dataset[0].shape == (1, 2400)


def test_no_readable_files_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"RIFF nonsense")
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    with pytest.warns(DataWarning):
        usable = cache.prepare(find_audio_files([bad]), num_workers=0)
    assert usable == []
    with pytest.raises(EcdcError, match="no readable training audio"):
        CropDataset(cache, usable)
    (tmp_path / "cache").mkdir(exist_ok=True)
    with pytest.raises(EcdcError, match="no audio files"):
        build_datasets([tmp_path / "cache"], tmp_path / "c2", RATE, 1)  # nothing at all
    with pytest.warns(DataWarning), pytest.raises(EcdcError, match="no readable training audio"):
        build_datasets([bad], tmp_path / "cache", RATE, 1, valid_fraction=0.0, num_workers=0)


def test_cache_hit_does_not_decode_and_modified_file_does(tmp_path, monkeypatch):
    src = write(tmp_path / "in" / "a.wav", 0.5)
    calls = []
    real = data.read_audio
    monkeypatch.setattr(data, "read_audio", lambda path: calls.append(path) or real(path))
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    assert cache.prepare([src], num_workers=0) == [src]
    assert len(calls) == 1
    entry = cache.path(src)
    assert AudioCache(tmp_path / "cache", RATE, 1).prepare([src], num_workers=0) == [src]
    assert len(calls) == 1  # a fresh cache object finds the entry on disk

    write(src, 0.8, seed=5)
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10 ** 9))
    fresh = AudioCache(tmp_path / "cache", RATE, 1)
    fresh.prepare([src], num_workers=0)
    assert len(calls) == 2 and fresh.frames(src) == int(0.8 * RATE)
    assert fresh.path(src) != entry and not entry.exists()  # the stale entry is gone

    # A different target rate is a different entry, decoded separately.
    other = AudioCache(tmp_path / "cache", 16000, 1)
    other.prepare([src], num_workers=0)
    assert len(calls) == 3 and other.frames(src) == int(0.8 * 16000)
    assert fresh.path(src).exists()


def test_resampled_and_mixed_to_model_layout(tmp_path):
    src = write(tmp_path / "in" / "stereo.wav", 1.3, rate=44100, channels=2)
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    assert cache.prepare([src], num_workers=0) == [src]
    arr = cache.array(src)
    assert isinstance(arr, np.memmap) and arr.dtype == np.int16
    assert arr.shape == (1, round(1.3 * RATE))
    expected = np.asarray(soundfile.read(str(src), dtype="float32")[0]).mean(axis=1)
    expected = data.resample(expected[None], 44100, RATE)[0]
    assert np.abs(arr[0] / 32768.0 - expected).max() < 2e-4
    crop = CropDataset(cache, [src], segment_seconds=0.5)[3]
    assert crop.shape == (1, 12000) and crop.dtype == torch.float32

    stereo = AudioCache(tmp_path / "cache", 48000, 2)
    mono = write(tmp_path / "in" / "mono.wav", 0.2)
    stereo.prepare([mono], num_workers=0)
    up = stereo.array(mono)
    assert up.shape == (2, round(0.2 * 48000)) and np.array_equal(up[0], up[1])


def test_crops_shape_gain_padding_and_clipping(tmp_path):
    quiet = write(tmp_path / "q.wav", 2.0, amp=0.1)
    loud = write(tmp_path / "l.wav", 2.0, amp=0.99, seed=1)
    short = write(tmp_path / "s.wav", 0.25, amp=0.1, seed=2)
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    files = cache.prepare([quiet, loud, short], num_workers=0)
    ds = CropDataset(cache, files, segment_seconds=0.5, gain_db=(-10.0, 6.0), seed=3)
    seen_short = False
    for i in range(200):
        info = ds.crop_info(i)
        item = ds[i]
        assert item.shape == (1, 12000) and item.dtype == torch.float32
        assert -10.0 - 1e-9 <= info.gain_db <= 6.0 + 1e-9
        assert float(item.abs().max()) <= 1.0
        raw = np.zeros(12000, np.float32)
        src = cache.array(info.file)[0, info.offset:info.offset + 12000] / 32768.0
        raw[:src.size] = src
        assert np.allclose(item[0].numpy(), raw * 10 ** (info.gain_db / 20), atol=1e-6)
        if info.file == loud:
            assert info.gain_db <= 20 * np.log10(1 / np.abs(src).max()) + 1e-6
        if info.file == short:
            seen_short = True
            assert info.offset == 0 and not item[0, 6000:].any()  # only a short file is padded
    assert seen_short

    # Clipped material: a crop of a file that is mostly at full scale is redrawn elsewhere.
    clipped = tmp_path / "c.wav"
    soundfile.write(str(clipped), np.clip(tone(4.0, RATE, amp=8.0), -1, 1), RATE, subtype="PCM_16")
    files = cache.prepare([quiet, clipped], num_workers=0)
    ds = CropDataset(cache, files, segment_seconds=0.5, seed=0, clip_retries=6)
    infos = [ds.crop_info(i) for i in range(60)]
    assert all(info.clipped <= 0.001 for info in infos if info.file == quiet)
    assert sum(info.file == clipped for info in infos) < 15  # 2/3 of the draws before retries
    no_retry = CropDataset(cache, files, segment_seconds=0.5, seed=0, clip_retries=0)
    assert sum(no_retry.crop_info(i).file == clipped for i in range(60)) > 25


def test_items_reproducible_across_instances_and_workers(tmp_path, corpus):
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    files = cache.prepare(find_audio_files([corpus]), num_workers=0)
    a = CropDataset(cache, files, segment_seconds=0.2, seed=7)
    b = CropDataset(AudioCache(tmp_path / "cache", RATE, 1), files, segment_seconds=0.2, seed=7)
    c = CropDataset(cache, files, segment_seconds=0.2, seed=8)
    torch.manual_seed(123)
    np.random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy())
    for i in (0, 1, 17, 10 ** 12):
        assert torch.equal(a[i], b[i])
    assert not torch.equal(a[5], c[5])

    def batches(workers: int, start: int, n: int) -> list:
        loader = make_train_loader(a, batch_size=3, start_step=start, num_workers=workers)
        it = iter(loader)
        out = [next(it) for _ in range(n)]
        del it, loader
        return out

    serial = batches(0, 0, 4)
    parallel = batches(2, 0, 4)
    for x, y in zip(serial, parallel):
        assert x.shape == (3, 1, 4800) and torch.equal(x, y)
    assert torch.equal(batches(0, 2, 1)[0], serial[2])  # resuming at step 2
    assert torch.equal(serial[1][2], a[5])
    # nothing above touched the global RNGs
    assert torch.equal(before[0], torch.get_rng_state())
    assert np.array_equal(before[1], np.random.get_state()[1])


def test_step_sampler_ranks_and_resume():
    take = lambda sampler, n: [i for i, _ in zip(iter(sampler), range(n))]  # noqa: E731
    r0, r1 = take(StepSampler(4, 0, 2), 40), take(StepSampler(4, 1, 2), 40)
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == list(range(80))
    assert r0[:8] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert take(StepSampler(4, 1, 2, start_step=3), 28) == r1[12:]
    assert StepSampler(4, 1, 2).batch_indices(3) == r1[12:16]
    with pytest.raises(EcdcError):
        StepSampler(4, rank=2, world_size=2)


def test_longer_files_chosen_proportionally(tmp_path):
    files = [write(tmp_path / f"{k}.wav", seconds, seed=k) for k, seconds in enumerate((0.5, 1.0, 2.0))]
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    ds = CropDataset(cache, cache.prepare(files, num_workers=0), segment_seconds=0.1)
    n = 3500
    counts = np.zeros(3)
    for i in range(n):
        counts[files.index(ds.crop_info(i).file)] += 1
    expected = np.array([1, 2, 4]) / 7 * n
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected))


def test_validation_crops_fixed(tmp_path):
    long = write(tmp_path / "v" / "long.wav", 3.0)
    mid = write(tmp_path / "v" / "mid.wav", 1.2, seed=1)
    short = write(tmp_path / "v" / "short.wav", 0.3, seed=2)
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    files = cache.prepare([long, mid, short], num_workers=0)
    valid = ValidationSet(cache, files, seconds=0.5, crops_per_file=4)
    seg = 12000
    assert [(c.file.name, c.offset, c.frames) for c in valid.crops] == [
        ("long.wav", 0, seg), ("long.wav", 20000, seg), ("long.wav", 40000, seg), ("long.wav", 60000, seg),
        ("mid.wav", 0, seg), ("mid.wav", 16800, seg),
        ("short.wav", 0, 7200),
    ]
    again = ValidationSet(AudioCache(tmp_path / "cache", RATE, 1), files, seconds=0.5, crops_per_file=4)
    assert len(valid) == len(again) == 7
    for k in range(len(valid)):
        assert valid[k].shape == (1, seg) and torch.equal(valid[k], again[k])
    assert np.allclose(valid[1][0].numpy(), cache.array(long)[0, 20000:20000 + seg] / 32768.0)
    assert not valid[6][0, 7200:].any()
    capped = ValidationSet(cache, files, seconds=0.5, crops_per_file=4, max_items=3)
    assert [c.offset for c in capped.crops] == [0, 60000, 0] and capped.crops[2].file == short


def test_build_datasets_with_valid_folders(tmp_path):
    root = tmp_path / "corpus"
    write(root / "train" / "a.wav", 1.0)
    write(root / "train" / "b.wav", 1.0, seed=1)
    write(root / "valid" / "c.wav", 1.0, seed=2)
    train, valid = build_datasets([root], tmp_path / "cache", RATE, 1,
                                  valid_folders=[root / "valid"], valid_seconds=0.5, num_workers=0)
    assert [f.name for f in train.files] == ["a.wav", "b.wav"]
    assert {c.file.name for c in valid.crops} == {"c.wav"} and len(valid) == 2


_real_build_entry = data._build_entry


def _crashing_build_entry(src, dst, rate, channels):
    """Dies on ``2.wav`` as a segfault in a decoder would (module level, so it pickles)."""
    if src.endswith("2.wav"):
        os._exit(3)
    return _real_build_entry(src, dst, rate, channels)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="patches the worker via fork")
def test_decoder_crash_costs_only_its_file(tmp_path, monkeypatch):
    files = [write(tmp_path / f"{k}.wav", 0.1, seed=k) for k in range(4)]
    monkeypatch.setattr(data, "_build_entry", _crashing_build_entry)
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    with pytest.warns(DataWarning, match="2.wav: the decoder crashed"):
        usable = cache.prepare(files, num_workers=2)
    assert [f.name for f in usable] == ["0.wav", "1.wav", "3.wav"]


def _prepare_names(cache_dir: str, files: list) -> list:
    return [f.name for f in AudioCache(cache_dir, RATE, 1).prepare(files, num_workers=0)]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_build_the_same_cache(tmp_path):
    files = [write(tmp_path / "in" / f"{k}.flac", 1.0, seed=k) for k in range(6)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        names = pool.starmap(_prepare_names, [(str(tmp_path / "cache"), files)] * 2)
    assert names == [[f.name for f in files]] * 2
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 6
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    assert all(cache.array(f).shape == (1, RATE) for f in files)


def test_unwritable_cache_is_an_error_not_a_skip(tmp_path):
    src = write(tmp_path / "a.wav", 0.1)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(EcdcError, match="cannot write the decode cache"):
        AudioCache(blocker, RATE, 1).prepare([src], num_workers=0)


def test_loader_workers_leave_stop_signals_to_the_trainer():
    """A SIGTERM/SIGINT to the whole process group must not kill the DataLoader workers
    (the trainer would crash in the loader instead of saving its checkpoint)."""
    import signal

    loader = data.make_train_loader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), 2, num_workers=0)
    assert loader.worker_init_fn is data.ignore_stop_signals
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        try:
            loader.worker_init_fn(0)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            os.write(w, b"survived")
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"survived"
    os.waitpid(pid, 0)


def test_folder_balance_draws_each_top_folder_equally_often(tmp_path):
    """Folder balance: an hour of music must not starve a few minutes of speech."""
    root = tmp_path / "corpus"
    (root / "speech").mkdir(parents=True)
    (root / "music").mkdir()
    short = write(root / "speech" / "a.wav", 0.5, amp=0.1)
    longs = [write(root / "music" / f"m{i}.wav", 4.0, amp=0.1, seed=i + 1) for i in range(3)]
    cache = AudioCache(tmp_path / "cache", RATE, 1)
    files = cache.prepare([short] + longs, num_workers=0)
    groups = folder_groups(files, [root])
    assert groups == ["speech", "music", "music", "music"]
    by_length = CropDataset(cache, files, segment_seconds=0.25, seed=0)
    balanced = CropDataset(cache, files, segment_seconds=0.25, seed=0, groups=groups)
    n = 2000
    share_length = np.mean([by_length.crop_info(i).file == short for i in range(n)])
    share_balanced = np.mean([balanced.crop_info(i).file == short for i in range(n)])
    assert share_length < 0.08  # 0.5 s of 12.5 s
    assert 0.45 < share_balanced < 0.55
    # Within a group, files are still chosen by length; one group draws as before.
    assert [balanced.crop_info(i) for i in range(50)] == [balanced.crop_info(i) for i in range(50)]
    one_group = CropDataset(cache, files, segment_seconds=0.25, seed=0, groups=["x"] * 4)
    assert [one_group.crop_info(i) for i in range(50)] == [by_length.crop_info(i) for i in range(50)]
    with pytest.raises(DataError, match="group labels"):
        CropDataset(cache, files, groups=["speech"])
    with pytest.raises(DataError, match="not inside"):
        folder_groups(files, [tmp_path / "elsewhere"])
