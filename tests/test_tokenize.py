"""``ecdc tokenize`` / ``detokenize``: codes equal compress's, both layouts, -j, .ecdc input
without a model, shards + merge, resume after a kill, torchrun ranks, and decoding back.
Tiny random-weight models only; real processes where it matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from ecdc.cli import main
from ecdc.codec import load_model
from ecdc.container import EcdcReader
from ecdc.dataset import TokenDataset, tokens_from
from ecdc.messages import PathError
from ecdc.shards import Shard, shard_from_env

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]
#: Entry fields that say where codes are stored, which differ between runs of other splits.
WHERE = ("shard", "offset", "file")


class Ran:
    """What a command did: its exit status and standard error."""

    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def ecdc(*args: object) -> Ran:
    """``ecdc ARGS`` in this process (the models load in a second, not the ten a new
    process takes on a loaded machine); the tests of kills and ranks use real processes."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.stderr, result.stderr
    return Ran(result.exit_code, result.stderr)


def ecdc_process(*args: object, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def make_tree(root: Path, count: int = 3, seconds: float = 0.6) -> Path:
    """Mono and stereo files at several rates (resampling and downmix exercised)."""
    formats = [(16000, 1), (44100, 2), (24000, 1), (48000, 2)]
    for i in range(count):
        rate, channels = formats[i % len(formats)]
        path = root / ("sub" if i % 2 else "") / f"f{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), test_signal(seconds + 0.1 * i, rate, channels, seed=i).T, rate)
    return root


def compressed_tokens(ecdc_dir: Path) -> dict:
    """What ``ecdc compress`` wrote, as tokens, by dataset path (suffix .wav)."""
    out = {}
    for path in sorted(ecdc_dir.rglob("*.ecdc")):
        with open(path, "rb") as f:
            reader = EcdcReader(f)
            chunks = list(reader)
            tokens = tokens_from(reader.header, chunks, reader.total_samples, reader.original_samples)
        out[path.relative_to(ecdc_dir).with_suffix(".wav").as_posix()] = tokens
    return out


def contents(dataset_dir: Path, suffix: str | None = None) -> list:
    """A dataset as (entry without storage fields, codes) in index order."""
    data = TokenDataset(dataset_dir)
    rows = []
    for entry in data.entries:
        meta = {k: v for k, v in entry.items() if k not in WHERE}
        if suffix:
            meta["path"] = str(Path(meta["path"]).with_suffix(suffix))
        rows.append((meta, np.array(data.codes(entry))))
    return rows


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(ma == mb and np.array_equal(ca, cb) for (ma, ca), (mb, cb) in zip(a, b))


@pytest.mark.parametrize("ckpt_name", ["tiny_mono_ckpt", "tiny_stereo_ckpt"])
def test_codes_equal_compress_in_both_layouts_and_with_jobs(tmp_path, ckpt_name, request):
    ckpt = request.getfixturevalue(ckpt_name)
    tree = make_tree(tmp_path / "in")
    assert ecdc("compress", "-r", tree, "-o", tmp_path / "ecdc", "--checkpoint", ckpt, "-q").returncode == 0
    expected = compressed_tokens(tmp_path / "ecdc")
    # 24 kHz: shards in one process, files with -j 2; 48 kHz the other way round.
    jobs = {"shards": 1, "files": 2} if ckpt_name == "tiny_mono_ckpt" else {"shards": 2, "files": 1}
    for layout, n in jobs.items():
        out = tmp_path / layout
        proc = ecdc("tokenize", "-r", tree, "-o", out, "--layout", layout, "-j", n, "--checkpoint", ckpt)
        assert proc.returncode == 0, proc.stderr
        assert f"{len(expected)} tokenized" in proc.stderr and "0 failed" in proc.stderr
        data = TokenDataset(out)
        assert [e["path"] for e in data.entries] == sorted(expected)
        for entry in data.entries:
            want = expected[entry["path"]]
            codes = data.codes(entry)
            assert codes.dtype == np.int16 and codes.shape == want.codes.shape
            assert np.array_equal(codes, want.codes), (layout, entry["path"])
            assert entry.get("scales") == want.scales and entry.get("segments") == want.segments
            assert {k: entry[k] for k in want.meta} == want.meta
            if layout == "files":
                assert np.array_equal(np.load(out / entry["file"]), want.codes)
                if want.scales is not None:
                    assert np.load(out / Path(entry["file"]).with_suffix(".scales.npy")).tolist() == want.scales
    # The Python API gives the same codes.
    codec = load_model(str(ckpt))
    first = sorted(tree.rglob("*.wav"))[0]
    wav, rate = soundfile.read(str(first), dtype="float32", always_2d=True)
    key = first.relative_to(tree).as_posix()
    assert np.array_equal(codec.encode_codes(wav.T, rate, 6.0), expected[key].codes)


def test_ecdc_input_gives_the_same_codes_without_loading_a_model(tmp_path, tiny_mono_ckpt):
    tree = make_tree(tmp_path / "in")
    assert ecdc("compress", "-r", tree, "-o", tmp_path / "ecdc", "--checkpoint", tiny_mono_ckpt, "-q").returncode == 0
    from_audio = tmp_path / "from_audio"
    assert ecdc("tokenize", "-r", tree, "-o", from_audio, "--checkpoint", tiny_mono_ckpt).returncode == 0
    # A checkpoint that does not exist: loading any model would fail the run.
    from_ecdc = tmp_path / "from_ecdc"
    proc = ecdc("tokenize", "-r", tmp_path / "ecdc", "-o", from_ecdc, "--checkpoint", tmp_path / "missing.th")
    assert proc.returncode == 0, proc.stderr
    assert same(contents(from_ecdc, ".wav"), contents(from_audio))
    # Codes cannot be re-coded at another bandwidth: that file fails, in one line.
    proc = ecdc("tokenize", "-r", tmp_path / "ecdc", "-o", tmp_path / "b12", "-b", "12")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ecdc: error:")]
    assert proc.returncode == 1 and len(errors) == 3 and "not -b 12" in errors[0]


def test_three_shards_and_merge_equal_one_run(tmp_path, tiny_mono_ckpt):
    tree = make_tree(tmp_path / "in", count=7, seconds=0.3)
    single = tmp_path / "single"
    assert ecdc("tokenize", "-r", tree, "-o", single, "--checkpoint", tiny_mono_ckpt).returncode == 0
    sharded = tmp_path / "sharded"
    for k in (2, 0):
        proc = ecdc("tokenize", "-r", tree, "-o", sharded, "--checkpoint", tiny_mono_ckpt, "--shard", f"{k}/3")
        assert proc.returncode == 0 and "not all done" in proc.stderr, proc.stderr
    merged = ecdc("tokenize", "--merge", "-o", sharded)
    assert merged.returncode == 1 and "shard 1/3 has not run" in merged.stderr
    assert len(merged.stderr.strip().splitlines()) == 1
    proc = ecdc("tokenize", "-r", tree, "-o", sharded, "--checkpoint", tiny_mono_ckpt, "--shard", "1/3")
    assert proc.returncode == 0 and "index of every shard" in proc.stderr, proc.stderr
    sizes = [len((sharded / f"shard-{k:05d}-of-00003.jsonl").read_text().splitlines()) for k in range(3)]
    assert sizes == [3, 2, 2]  # file i of the sorted order goes to shard i % 3
    (sharded / "index.jsonl").unlink()
    assert ecdc("tokenize", "--merge", "-o", sharded).returncode == 0
    assert same(contents(sharded), contents(single)) and len(contents(single)) == 7
    # The same split for compress: two shards convert every file once.
    for k in range(2):
        proc = ecdc("compress", "-r", tree, "-o", tmp_path / "c", "--checkpoint", tiny_mono_ckpt, "--shard", f"{k}/2")
        assert proc.returncode == 0 and f"{4 - k} converted" in proc.stderr, proc.stderr
    assert len(list((tmp_path / "c").rglob("*.ecdc"))) == 7
    bad = ecdc("compress", "-r", tree, "-o", tmp_path / "c", "--shard", "2/2")
    assert bad.returncode == 1 and bad.stderr.startswith("ecdc: error: --shard: shard 2/2 does not exist")


def test_interrupted_run_rerun_equals_uninterrupted(tmp_path, tiny_mono_ckpt):
    tree = make_tree(tmp_path / "in", count=16, seconds=0.5)
    whole = tmp_path / "whole"
    assert ecdc("tokenize", "-r", tree, "-o", whole, "--checkpoint", tiny_mono_ckpt).returncode == 0
    out = tmp_path / "out"
    journal = out / "shard-00000-of-00001.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ecdc", "tokenize", "-r", str(tree), "-o", str(out),
                             "--checkpoint", str(tiny_mono_ckpt), "-q"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = journal.read_bytes().count(b"\n")
    assert 3 <= done < 16, "the run was meant to be killed part way"
    assert not (out / "index.jsonl").exists()
    # As a kill during a write would leave them: codes past the last entry, a cut entry.
    with open(out / "shard-00000-of-00001.codes", "ab") as f:
        f.write(b"\x01\x02" * 100)
    with open(journal, "ab") as f:
        f.write(b'{"path": "sub/f03.wav", "frames": 12')
    rerun = ecdc("tokenize", "-r", tree, "-o", out, "--checkpoint", tiny_mono_ckpt)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{16 - done} tokenized, {done} skipped" in rerun.stderr
    assert same(contents(out), contents(whole))
    codes = TokenDataset(out)
    assert (out / "shard-00000-of-00001.codes").stat().st_size == sum(c.size for _, c in codes) * 2


def test_torchrun_two_cpu_ranks_shard_the_files(tmp_path, tiny_mono_ckpt):
    tree = make_tree(tmp_path / "in", count=5, seconds=0.3)
    single = tmp_path / "single"
    assert ecdc("tokenize", "-r", tree, "-o", single, "--checkpoint", tiny_mono_ckpt).returncode == 0
    out = tmp_path / "ranks"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ecdc", "tokenize", "-r", str(tree), "-o", str(out), "--checkpoint",
                           str(tiny_mono_ckpt), "--device", "cpu", "-q"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert [len((out / f"shard-{k:05d}-of-00002.jsonl").read_text().splitlines()) for k in range(2)] == [3, 2]
    assert same(contents(out), contents(single))


def test_detokenize_equals_decompress(tmp_path, tiny_mono_ckpt, tiny_stereo_ckpt):
    for name, ckpt in (("mono", tiny_mono_ckpt), ("stereo", tiny_stereo_ckpt)):
        tree = make_tree(tmp_path / name / "in", count=2, seconds=0.4)
        base = tmp_path / name
        assert ecdc("compress", "-r", tree, "-o", base / "ecdc", "--checkpoint", ckpt, "-q").returncode == 0
        assert ecdc("decompress", "-r", base / "ecdc", "-o", base / "wav", "--checkpoint", ckpt, "-q").returncode == 0
        assert ecdc("tokenize", "-r", tree, "-o", base / "tok", "--checkpoint", ckpt, "-q").returncode == 0
        proc = ecdc("detokenize", base / "tok", "-o", base / "back", "--checkpoint", ckpt)
        assert proc.returncode == 0 and "2 detokenized" in proc.stderr, proc.stderr
        for wav in sorted((base / "wav").rglob("*.wav")):
            want, rate = soundfile.read(str(wav), dtype="float32")
            got, got_rate = soundfile.read(str(base / "back" / wav.relative_to(base / "wav")), dtype="float32")
            assert got_rate == rate and got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-4, (name, wav)
    # A language model's codes (a .npy) decode at the model's rate, as the API's decode_codes does.
    codes = TokenDataset(tmp_path / "mono" / "tok")[0]
    np.save(tmp_path / "gen.npy", np.asarray(codes))
    proc = ecdc("detokenize", tmp_path / "gen.npy", "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 0, proc.stderr
    got, rate = soundfile.read(str(tmp_path / "gen.wav"), dtype="float32")
    want = load_model(str(tiny_mono_ckpt)).decode_codes(np.asarray(codes))
    assert rate == 24000 and got.shape == (codes.shape[1] * 320,)
    assert np.abs(got - np.clip(want[0], -1, 1)).max() <= 1 / 32767 + 1e-6


def test_bad_inputs_are_one_line_each_and_the_run_goes_on(tmp_path, tiny_mono_ckpt):
    tree = make_tree(tmp_path / "in", count=2, seconds=0.3)
    (tree / "broken.ecdc").write_bytes(b"ECDC\x01garbage")
    (tree / "noise.wav").write_bytes(b"RIFF not really")
    out = tmp_path / "out"
    proc = ecdc_process("tokenize", "-r", tree, "-o", out, "--checkpoint", tiny_mono_ckpt)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ecdc: error:")]
    assert proc.returncode == 1 and len(errors) == 2, proc.stderr
    assert "2 tokenized" in proc.stderr and "2 failed" in proc.stderr
    assert [e["path"] for e in TokenDataset(out).entries] == ["f00.wav", "sub/f01.wav"]
    assert json.loads((out / "shard-00000-of-00001.done.json").read_text())["failed"] == [
        str(tree / "broken.ecdc"), str(tree / "noise.wav")]
    for args, message in ((("--merge", "-o", tmp_path / "empty"), "holds no tokenize shards"),
                          ((tree, "-o", tmp_path / "x", "--shard", "1/x"), "expected K/N"),
                          ((tree / "f00.wav", "-o", tree / "f00.wav"), "not a directory")):
        proc = ecdc("tokenize", *args)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_shard_from_scheduler_variables():
    assert shard_from_env({}) is None
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(1, 4, "RANK/WORLD_SIZE")
    slurm = shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"})
    assert (slurm.index, slurm.count) == (2, 3)
    assert [i for i in range(7) if Shard(1, 3).takes(i)] == [1, 4]


def test_index_entries_are_checked_against_their_files(tmp_path, tiny_mono_ckpt):
    tree = make_tree(tmp_path / "in", count=2, seconds=0.3)
    for layout in ("shards", "files"):
        out = tmp_path / layout
        proc = ecdc("tokenize", "-r", tree, "-o", out, "--layout", layout, "--checkpoint", tiny_mono_ckpt)
        assert proc.returncode == 0, proc.stderr
        index = out / "index.jsonl"
        entries = [json.loads(line) for line in index.read_text().splitlines()]
        entries[-1]["frames"] = 10 ** 12  # a week of frames: must not be allocated, nor read past the file
        index.write_text("".join(json.dumps(e) + "\n" for e in entries))
        data = TokenDataset(out)
        assert data[0].shape[0] == 8
        with pytest.raises(PathError, match="lies outside|its entry says"):
            data[1]


def test_reading_a_dataset_imports_no_torch():
    code = "import sys, ecdc.dataset, ecdc.shards; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
