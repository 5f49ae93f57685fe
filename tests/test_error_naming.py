"""Error lines blame what is at fault (issue 14, item 12), through the real command line.

``ecdc: error: FILE: message`` names the input only when the input is at fault: a bad
checkpoint names the checkpoint (not ``in.wav: nope.th: ...``), standard output is
``<stdout>`` (not ``<stdin>``), and a problem with an option or the environment (an unknown
``--model``, a bandwidth the model lacks, a failed download) names no file at all.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch

from conftest import TINY_MONO, random_model, save_checkpoint, test_signal

REPO = Path(__file__).resolve().parents[1]
#: A good .ecdc file (of the bundled release), for the decompress cases.
GOLDEN = REPO / "tests" / "data" / "releases" / "ecdc_24khz_v1.ecdc"
#: Where no download can succeed, at once (nothing listens on the discard port).
NO_NETWORK = "http://127.0.0.1:9/"


def ecdc(cwd: Path, *args: object, stdin: bytes | None = None, **popen) -> subprocess.CompletedProcess:
    """``python -m ecdc ARGS`` in ``cwd`` (so that names are shown as typed), with an
    empty weights cache there and no network for downloads."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "ECDC_CACHE_DIR": str(cwd / "cache"), "ECDC_WEIGHTS_URL": NO_NETWORK}
    env.pop("PYTHONWARNINGS", None)
    if "stdout" not in popen:
        popen["stdout"] = subprocess.PIPE
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], cwd=cwd, env=env, input=stdin,
                          stderr=subprocess.PIPE, timeout=180, **popen)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a failed run showed (and nothing else: no traceback)."""
    lines = [ln for ln in proc.stderr.decode().splitlines() if ln.strip()]
    assert proc.returncode == 1, lines
    assert len(lines) == 1 and lines[0].startswith("ecdc: error: "), lines
    return lines[0]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory with ``in.wav`` (0.5 s) and ``tiny.th`` (a tiny random model)."""
    soundfile.write(str(tmp_path / "in.wav"), test_signal(0.5, 24000).T, 24000, subtype="PCM_16")
    save_checkpoint(random_model(TINY_MONO), tmp_path / "tiny.th")
    return tmp_path


def test_a_missing_checkpoint_is_blamed_not_the_input(work: Path) -> None:
    line = error_line(ecdc(work, "compress", "in.wav", "--checkpoint", "nope.th"))
    assert line == "ecdc: error: nope.th: no such checkpoint"
    assert not (work / "in.ecdc").exists()


def test_checkpoint_problems_on_stdin_name_the_checkpoint_not_stdin(work: Path) -> None:
    line = error_line(ecdc(work, "compress", "-", "-o", "out.ecdc", "--checkpoint", "nope.th",
                           stdin=(work / "in.wav").read_bytes()))
    assert line == "ecdc: error: nope.th: no such checkpoint"
    assert not (work / "out.ecdc").exists()


def test_a_checkpoint_that_is_not_one_is_blamed_in_decompress_too(work: Path) -> None:
    (work / "junk.th").write_bytes(b"not a checkpoint at all")
    line = error_line(ecdc(work, "decompress", GOLDEN, "-o", "out.wav", "--checkpoint", "junk.th"))
    assert line.startswith("ecdc: error: junk.th: not a loadable weights-only checkpoint"), line
    assert GOLDEN.name not in line
    assert not (work / "out.wav").exists()


def test_a_bad_config_sidecar_is_blamed(work: Path) -> None:
    """A bare state dict beside a broken ``.json`` config: the line names the .json."""
    torch.save(random_model(TINY_MONO).state_dict(), str(work / "bare.th"))
    (work / "bare.json").write_text("{not json")
    line = error_line(ecdc(work, "compress", "in.wav", "--checkpoint", "bare.th"))
    assert line.startswith("ecdc: error: bare.json: invalid model config: "), line


def test_an_unknown_model_name_blames_no_file(work: Path) -> None:
    for command, src in (("compress", "in.wav"), ("decompress", GOLDEN)):
        line = error_line(ecdc(work, command, src, "--model", "nope", "-o", "out"))
        assert line.startswith("ecdc: error: unknown model 'nope'; known models: "), line
        assert "ecdc_24khz" in line


def test_a_bandwidth_the_model_lacks_blames_no_file(work: Path) -> None:
    line = error_line(ecdc(work, "compress", "in.wav", "--checkpoint", "tiny.th", "-b", "5"))
    assert line == "ecdc: error: tiny_mono does not support 5 kbps; choose one of 1.5, 3, 6, 12, 24"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_cuda_device_blames_no_file(work: Path) -> None:
    line = error_line(ecdc(work, "compress", "in.wav", "--checkpoint", "tiny.th", "--device", "cuda"))
    assert line.startswith("ecdc: error: CUDA was requested but no CUDA device is available"), line


def test_a_failed_download_blames_no_file(work: Path) -> None:
    line = error_line(ecdc(work, "compress", "in.wav", "--model", "encodec_24khz"))
    assert line.startswith(f"ecdc: error: cannot download {NO_NETWORK}encodec_24khz-d7cc33bc.th: "), line
    assert "--checkpoint PATH" in line
    assert list((work / "cache").iterdir()) == []  # the temporary download is gone


def test_a_damaged_cached_checkpoint_is_blamed(work: Path) -> None:
    cached = work / "cache" / "encodec_24khz-d7cc33bc.th"
    cached.parent.mkdir()
    cached.write_bytes(b"someone else's file")
    line = error_line(ecdc(work, "compress", "in.wav", "--model", "encodec_24khz"))
    assert line.startswith(f"ecdc: error: {cached}: its sha256 ("), line
    assert cached.read_bytes() == b"someone else's file"


def test_stdout_on_a_terminal_is_called_stdout(work: Path) -> None:
    """``-o -`` with a terminal on stdout: refused before the model loads, as ``<stdout>``."""
    master, slave = pty.openpty()
    try:
        proc = ecdc(work, "compress", "in.wav", "-o", "-", "--checkpoint", "tiny.th", stdout=slave)
    finally:
        os.close(slave)
        os.close(master)
    line = error_line(proc)
    assert line.startswith("ecdc: error: <stdout>: refusing to write binary data to a terminal"), line


def test_stdout_for_a_batch_is_called_stdout(work: Path) -> None:
    soundfile.write(str(work / "two.wav"), test_signal(0.5, 24000).T, 24000, subtype="PCM_16")
    line = error_line(ecdc(work, "compress", "in.wav", "two.wav", "-o", "-", "--checkpoint", "tiny.th"))
    assert line == "ecdc: error: <stdout>: -o - (stdout) takes a single input file"


def test_the_input_is_still_named_when_it_is_at_fault(work: Path) -> None:
    """The counterpart: what is wrong with the input is blamed on it, a pipe as ``<stdin>``."""
    line = error_line(ecdc(work, "decompress", "-", "-o", "out.wav", "--checkpoint", "tiny.th",
                           stdin=b"RIFF this is no ecdc file"))
    assert line.startswith("ecdc: error: <stdin>: "), line
    assert not (work / "out.wav").exists()


def test_an_output_that_cannot_be_created_is_not_blamed_on_the_input(work: Path) -> None:
    line = error_line(ecdc(work, "compress", "in.wav", "-o", "missing/x.ecdc", "--checkpoint", "tiny.th"))
    assert line == "ecdc: error: cannot create missing/x.ecdc: No such file or directory", line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_behind_stdout_is_called_stdout(work: Path) -> None:
    """``-o - > file`` on a full disk: the write error names standard output, not the input."""
    with open("/dev/full", "wb") as full:
        line = error_line(ecdc(work, "decompress", GOLDEN, "-o", "-", stdout=full))
    assert line == "ecdc: error: <stdout>: No space left on device (disk full)", line


def test_a_nonblocking_stdout_that_refuses_data_is_called_stdout(work: Path) -> None:
    """A parent that set O_NONBLOCK on the pipe it gave as stdout, and does not read it: the
    refused write names standard output, not the input."""
    import fcntl

    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETFL, fcntl.fcntl(write_end, fcntl.F_GETFL) | os.O_NONBLOCK)
        # The golden file decodes to far more than a pipe's buffer, which nobody drains.
        line = error_line(ecdc(work, "decompress", GOLDEN, "-o", "-", stdout=write_end))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert line == ("ecdc: error: <stdout>: the output stream is non-blocking and refused data; "
                    "nothing more was written"), line
