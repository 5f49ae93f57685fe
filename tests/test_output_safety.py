"""Output safety of the command line, in real processes: a full disk (a file-size limit),
named pipes given as paths, and damaged streams read through a pipe. Each failure is one
line on stderr, a non-zero exit, no partial output and an untouched input."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")


def ecdc(*args: object, limit: int | None = None, stdin: bytes | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def limit_file_size() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], cwd=str(REPO), env=env,
                          input=stdin, capture_output=True, timeout=timeout, preexec_fn=limit_file_size)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecdc: error: "), lines
    assert "Traceback" not in proc.stderr.decode()
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def speech(tmp_path: Path) -> Path:
    src = tmp_path / "speech.wav"
    soundfile.write(str(src), test_signal(6.0, 24000).T, 24000, subtype="PCM_16")
    return src


def test_disk_full_while_decompressing_leaves_nothing(tmp_path: Path, speech: Path, tiny_mono_ckpt: Path) -> None:
    assert ecdc("compress", "-q", "--checkpoint", tiny_mono_ckpt, speech).returncode == 0
    packed = speech.with_suffix(".ecdc")
    before = packed.read_bytes()
    files = listing(tmp_path)
    # The 6 s wav is 288 kB; at most 64 kB may be written.
    line = one_error_line(ecdc("decompress", "-q", "--checkpoint", tiny_mono_ckpt, "-o",
                               tmp_path / "out.wav", packed, limit=64 * 1024))
    assert f"cannot write {tmp_path / 'out.wav'}: File too large" in line and "nothing was written" in line
    assert listing(tmp_path) == files  # no output, no temp file
    assert packed.read_bytes() == before


def test_disk_full_while_compressing_leaves_nothing(tmp_path: Path, speech: Path, tiny_mono_ckpt: Path) -> None:
    before = speech.read_bytes()
    files = listing(tmp_path)
    # 6 s at 24 kbps is 18 kB of codes; allow 4 kB.
    line = one_error_line(ecdc("compress", "-q", "-b", 24, "--checkpoint", tiny_mono_ckpt, speech, limit=4096))
    assert f"cannot write {speech.with_suffix('.ecdc')}: File too large" in line
    assert listing(tmp_path) == files
    assert speech.read_bytes() == before


def test_disk_full_in_a_batch_fails_each_file_cleanly(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        soundfile.write(str(src / f"{name}.wav"), test_signal(6.0, 24000).T, 24000, subtype="PCM_16")
    out = tmp_path / "out"
    proc = ecdc("compress", "-q", "-b", 24, "--checkpoint", tiny_mono_ckpt, "-o", out, src / "a.wav",
                src / "b.wav", limit=4096)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 2 and all("File too large" in line for line in lines), lines
    assert not out.exists() or listing(out) == []


def _feed_fifo(path: Path, data: bytes) -> threading.Thread:
    def writer() -> None:
        try:
            with open(path, "wb") as f:
                f.write(data)
        except BrokenPipeError:
            pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    return t


def test_named_pipe_as_input_path(tmp_path: Path, speech: Path, tiny_mono_ckpt: Path) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    t = _feed_fifo(fifo, speech.read_bytes())
    proc = ecdc("compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "live.ecdc", fifo)
    t.join(timeout=10)
    assert proc.returncode == 0, proc.stderr.decode()
    proc = ecdc("decompress", "-q", "--checkpoint", tiny_mono_ckpt, tmp_path / "live.ecdc")
    assert proc.returncode == 0, proc.stderr.decode()
    info = soundfile.info(str(tmp_path / "live.wav"))
    assert (info.samplerate, info.frames) == (24000, 6 * 24000)


def test_damaged_stream_through_a_named_pipe(tmp_path: Path, speech: Path, tiny_mono_ckpt: Path) -> None:
    assert ecdc("compress", "-q", "--checkpoint", tiny_mono_ckpt, speech).returncode == 0
    data = bytearray(speech.with_suffix(".ecdc").read_bytes())
    data[len(data) // 2] ^= 0xFF
    fifo = tmp_path / "damaged.ecdc"
    os.mkfifo(fifo)
    t = _feed_fifo(fifo, bytes(data))
    line = one_error_line(ecdc("decompress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "x.wav",
                               fifo, timeout=60))
    t.join(timeout=10)
    assert "CRC32 mismatch" in line and "; --salvage decodes the intact parts" in line
    assert not (tmp_path / "x.wav").exists()
    # The same bytes on stdin, salvaged: decoded, with the damage as warnings.
    proc = ecdc("decompress", "-q", "--salvage", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "x.wav", "-",
                stdin=bytes(data))
    assert proc.returncode == 0, proc.stderr.decode()
    warnings = proc.stderr.decode().strip().splitlines()
    assert warnings and all(w.startswith("ecdc: warning: <stdin>: ") for w in warnings)
    assert soundfile.info(str(tmp_path / "x.wav")).frames == 6 * 24000


class _RefusingStream(io.RawIOBase):
    """A non-blocking raw stream that takes 3 bytes and then refuses (write() returns None)."""

    def __init__(self) -> None:
        self.taken = b""

    def writable(self) -> bool:
        return True

    def write(self, data):  # type: ignore[override]
        if self.taken:
            return None
        self.taken = bytes(data[:3])
        return 3


def test_writers_raise_when_a_nonblocking_stream_refuses_data():
    from ecdc.container import EcdcHeader, EcdcWriter, StereoMode
    from ecdc.errors import OutputError
    from ecdc.wavstream import WavStreamWriter

    header = EcdcHeader(model_name="encodec_24khz", weights_fingerprint=bytes(16), sample_rate=24000,
                        channels=1, stereo_mode=StereoMode.MONO, bandwidth=1.5, num_codebooks=2,
                        bits_per_code=10, hop_length=320, segment_length=0, segment_stride=0,
                        has_scale=False, num_samples=None, original_sample_rate=24000, original_channels=1)
    with pytest.raises(OutputError, match="refused data"):
        EcdcWriter(_RefusingStream(), header)
    with pytest.raises(OutputError, match="refused data"):
        writer = WavStreamWriter(_RefusingStream(), 24000, 1)
        writer.write(np.zeros((1, 100), dtype=np.float32))
        writer.close()
