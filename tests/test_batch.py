"""Batch conversion: many inputs and directory trees, skipping, failures, parallel jobs and
interruption. Tiny random-weight models only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile
import torch
from click.testing import CliRunner

from ecdc.batch import CompressOptions, cpu_count, plan_batch
from ecdc.cli import main
from ecdc.codec import EncodedAudio

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_lines(result) -> list:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("ecdc: error:")]


def files_under(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def temp_files(root: Path) -> list:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def write_audio(path: Path, seconds: float = 0.3, rate: int = 16000, channels: int = 1, seed: int = 0,
                fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), test_signal(seconds, rate, channels=channels, seed=seed).T, rate, format=fmt)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    """in/a.wav, in/sub/b.flac, in/sub/deeper/c.wav plus files -r must leave alone."""
    root = tmp_path / "in"
    write_audio(root / "a.wav", seed=1)
    write_audio(root / "sub" / "b.flac", seed=2, channels=2, rate=22050, fmt="FLAC")
    write_audio(root / "sub" / "deeper" / "c.wav", seed=3)
    (root / "notes.txt").write_text("not audio")
    write_audio(root / ".hidden.wav", seed=4)
    return root


def test_recursive_tree_is_mirrored(tmp_path, tree, tiny_mono_ckpt):
    out = tmp_path / "out"
    result = run("compress", "-r", tree, "-o", out, "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    assert files_under(out) == ["a.ecdc", "sub/b.ecdc", "sub/deeper/c.ecdc"]
    assert "3 converted" in result.stderr and "0 failed" in result.stderr
    assert EncodedAudio.from_bytes((out / "sub" / "b.ecdc").read_bytes()).header.original_sample_rate == 22050

    back = tmp_path / "back"
    result = run("decompress", "-r", out, "-o", back, "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    assert files_under(back) == ["a.wav", "sub/b.wav", "sub/deeper/c.wav"]
    info = soundfile.info(str(back / "sub" / "b.wav"))
    # The original rate; the one channel the mono model coded (of the stereo input).
    assert (info.samplerate, info.channels, info.frames) == (22050, 1, int(0.3 * 22050))

    # Without -o, outputs go beside their inputs; -q silences the summary.
    result = run("compress", tree / "a.wav", tree / "sub", "-r", "-q", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert (tree / "a.ecdc").is_file() and (tree / "sub" / "b.ecdc").is_file()
    assert (tree / "sub" / "deeper" / "c.ecdc").is_file() and not (tree / ".hidden.ecdc").exists()
    assert temp_files(out) == temp_files(back) == []


def test_existing_outputs_are_skipped_then_forced(tmp_path, tree, tiny_mono_ckpt):
    out = tmp_path / "out"
    assert run("compress", "-r", tree, "-o", out, "--checkpoint", tiny_mono_ckpt).exit_code == 0
    (out / "a.ecdc").write_bytes(b"old")
    before = {p: (out / p).stat().st_mtime_ns for p in files_under(out)}
    result = run("compress", "-r", tree, "-o", out, "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    assert "0 converted, 3 skipped" in result.stderr
    assert {p: (out / p).stat().st_mtime_ns for p in files_under(out)} == before
    assert (out / "a.ecdc").read_bytes() == b"old"
    result = run("compress", "-r", tree, "-o", out, "-f", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    assert "3 converted, 0 skipped" in result.stderr
    assert (out / "a.ecdc").read_bytes()[:4] == b"ECDC"


def test_one_bad_file_is_reported_and_the_rest_converted(tmp_path, tree, tiny_mono_ckpt):
    bad = tree / "sub" / "broken.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40)
    out = tmp_path / "out"
    result = run("compress", "-r", tree, "-o", out, "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and str(bad) in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "3 converted, 0 skipped, 1 failed" in result.stderr
    assert files_under(out) == ["a.ecdc", "sub/b.ecdc", "sub/deeper/c.ecdc"]

    # The same for decompression: a corrupt .ecdc among good ones.
    data = bytearray((out / "sub" / "b.ecdc").read_bytes())
    data[len(data) // 2] ^= 0x10
    (out / "sub" / "b.ecdc").write_bytes(bytes(data))
    back = tmp_path / "back"
    result = run("decompress", "-r", out, "-o", back, "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and str(out / "sub" / "b.ecdc") in lines[0] and "crc" in lines[0].lower()
    assert files_under(back) == ["a.wav", "sub/deeper/c.wav"]
    assert temp_files(out) == temp_files(back) == []


def test_directory_without_r_is_an_error(tmp_path, tree, tiny_mono_ckpt):
    result = run("compress", tree / "a.wav", tree / "sub", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and str(tree / "sub") in lines[0] and "-r" in lines[0]
    assert (tree / "a.ecdc").is_file() and not (tree / "sub" / "b.ecdc").exists()
    alone = run("compress", tree, "--checkpoint", tiny_mono_ckpt)  # a lone directory: one line, exit 1
    assert alone.exit_code == 1
    assert error_lines(alone) == [ln for ln in alone.stderr.splitlines() if ln.strip()]
    assert len(error_lines(alone)) == 1 and "-r" in alone.stderr


def test_single_input_keeps_single_file_rules(tmp_path, tree, tiny_mono_ckpt):
    outdir = tmp_path / "existing"
    outdir.mkdir()
    result = run("compress", tree / "a.wav", "-o", outdir, "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    assert files_under(outdir) == ["a.ecdc"]
    # One file ends with its figures (issue 14, item 13), not a batch summary.
    assert result.stderr.startswith(f"ecdc: {tree / 'a.wav'} -> {outdir / 'a.ecdc'}: 0.30 s of audio in ")
    assert result.stderr.count("\n") == 1, result.stderr
    again = run("compress", tree / "a.wav", "-o", outdir, "--checkpoint", tiny_mono_ckpt)
    assert again.exit_code == 1 and "exists" in again.stderr  # not skipped: an error
    several = run("compress", tree / "a.wav", tree / "sub" / "b.flac", "-o", "-", "--checkpoint", tiny_mono_ckpt)
    assert several.exit_code == 1 and len(error_lines(several)) == 1


def test_colliding_outputs_are_refused(tmp_path, tiny_mono_ckpt):
    write_audio(tmp_path / "x" / "same.wav")
    write_audio(tmp_path / "y" / "same.flac", fmt="FLAC")
    plan = plan_batch("compress", [str(tmp_path / "x"), str(tmp_path / "y")], str(tmp_path / "o"), True, False,
                      CompressOptions())
    assert [Path(j.dst).name for j in plan.jobs] == ["same.ecdc"]
    assert len(plan.errors) == 1 and "same.flac" in plan.errors[0][0]


def test_parallel_jobs_give_the_same_outputs(tmp_path, tiny_mono_ckpt):
    src = tmp_path / "src"
    for i in range(4):
        write_audio(src / f"f{i}.wav", seconds=0.5 + 0.2 * i, rate=24000, seed=i)
    one, two = tmp_path / "j1", tmp_path / "j2"
    r1 = run("compress", "-r", src, "-o", one, "-j", "1", "--checkpoint", tiny_mono_ckpt)
    r2 = run("compress", "-r", src, "-o", two, "-j", "2", "--checkpoint", tiny_mono_ckpt)
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.stderr, r2.stderr)
    assert files_under(one) == files_under(two) == [f"f{i}.ecdc" for i in range(4)]
    for name in files_under(one):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    # Decoded audio: torch's CPU kernels round differently with another thread count
    # (~1e-7, now and then one LSB of 16-bit PCM), so compare at the workers' count.
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cpu_count() // 2))
    try:
        r1 = run("decompress", "-r", one, "-o", d1, "-j", "1", "--checkpoint", tiny_mono_ckpt)
    finally:
        torch.set_num_threads(threads)
    r2 = run("decompress", "-r", one, "-o", d2, "-j", "2", "--checkpoint", tiny_mono_ckpt)
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.stderr, r2.stderr)
    assert files_under(d1) == files_under(d2) == [f"f{i}.wav" for i in range(4)]
    for name in files_under(d1):
        assert (d1 / name).read_bytes() == (d2 / name).read_bytes(), name
    assert "4 converted" in r2.stderr


@pytest.mark.parametrize("jobs,sig", [(2, signal.SIGINT), (1, signal.SIGTERM)])
def test_interrupt_leaves_only_complete_files(tmp_path, tiny_mono_ckpt, jobs, sig):
    src = tmp_path / "src"
    for i in range(12):
        write_audio(src / f"f{i:02d}.wav", seconds=6.0, rate=24000, seed=i)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "ecdc", "compress", "-r", str(src), "-o", str(out),
                             "-j", str(jobs), "--checkpoint", str(tiny_mono_ckpt)],
                            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(p.suffix == ".ecdc" for p in out.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert "interrupted" in stderr.decode()
    assert temp_files(out) == []
    done = sorted(out.glob("*.ecdc"))
    assert 1 <= len(done) < 12
    for path in done:  # every output there is complete
        assert EncodedAudio.from_bytes(path.read_bytes()).num_samples == 6 * 24000
