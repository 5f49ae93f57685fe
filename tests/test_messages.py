"""What ecdc says, driven through the real command line in a subprocess: closed standard
streams, control characters in file names and exception text, and messages that name
the actual problem (issue 12, items 9, 12 and 14). Tiny random-weight models only."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pytest
import soundfile

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]


def ecdc(*args: object, close: Sequence[int] = (), input: Optional[bytes] = None,
         timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m ecdc ARGS`` from the repository root, with the standard descriptors in
    ``close`` really closed in the child (as ``<&-``, ``>&-``, ``2>&-`` do)."""
    def close_fds() -> None:  # pragma: no cover - runs in the child
        for fd in close:
            os.close(fd)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # see torch's warnings
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], cwd=REPO, input=input,
                          capture_output=True, timeout=timeout, env=env,
                          preexec_fn=close_fds if close else None)


def lines(proc: subprocess.CompletedProcess) -> List[str]:
    text = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in text, text
    return [ln for ln in text.split("\n") if ln.strip()]  # split on "\n" only: what a terminal does


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc
    [line] = lines(proc)
    assert line.startswith("ecdc: error: "), line
    return line


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "in.wav"
    soundfile.write(str(path), test_signal(1.3, 24000).T, 24000, subtype="PCM_16")
    return path


@pytest.fixture
def good_ecdc(tmp_path: Path, wav: Path, tiny_mono_ckpt: Path) -> Path:
    path = tmp_path / "good.ecdc"
    assert ecdc("compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", path, wav).returncode == 0
    return path


# --------------------------------------------------------------------------- item 9: closed streams


@pytest.mark.parametrize("command", ["compress", "decompress", "info"])
def test_closed_stdin_is_one_line(tmp_path: Path, tiny_mono_ckpt: Path, command: str) -> None:
    args = {"compress": ["-o", tmp_path / "x.ecdc", "--checkpoint", tiny_mono_ckpt],
            "decompress": ["-o", tmp_path / "x.wav", "--checkpoint", tiny_mono_ckpt], "info": []}[command]
    proc = ecdc(command, "-", *args, close=[0])
    assert one_error(proc) == "ecdc: error: standard input is closed"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["decompress", "info"])
def test_closed_stdout_is_one_line(good_ecdc: Path, tiny_mono_ckpt: Path, command: str) -> None:
    args = ["-o", "-", "--checkpoint", tiny_mono_ckpt] if command == "decompress" else []
    proc = ecdc(command, *args, good_ecdc, close=[1])
    assert one_error(proc) == "ecdc: error: standard output is closed"


def test_closed_stderr_success_exits_zero_and_failure_not(tmp_path: Path, wav: Path, tiny_mono_ckpt: Path) -> None:
    out = tmp_path / "out.ecdc"
    ok = ecdc("compress", "--checkpoint", tiny_mono_ckpt, "-o", out, wav, close=[2])
    assert ok.returncode == 0
    reference = tmp_path / "ref.ecdc"
    assert ecdc("compress", "--checkpoint", tiny_mono_ckpt, "-o", reference, wav).returncode == 0
    assert out.read_bytes() == reference.read_bytes()  # nothing else landed in the output
    failed = ecdc("compress", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "y.ecdc", tmp_path / "missing.wav",
                  close=[2])
    assert failed.returncode == 1


def test_closed_stderr_batch_fails_only_when_its_summary_is_lost(tmp_path: Path, wav: Path,
                                                                 tiny_mono_ckpt: Path) -> None:
    second = tmp_path / "second.wav"
    second.write_bytes(wav.read_bytes())
    quiet = ecdc("compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "q", wav, second, close=[2])
    assert quiet.returncode == 0 and len(list((tmp_path / "q").iterdir())) == 2
    # Without -q there is a summary to report, and no one to show it to.
    told = ecdc("compress", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "t", wav, second, close=[2])
    assert told.returncode == 1 and len(list((tmp_path / "t").iterdir())) == 2


def test_salvage_warnings_lost_to_closed_stderr_fail_the_run(tmp_path: Path, good_ecdc: Path,
                                                             tiny_mono_ckpt: Path) -> None:
    bad = tmp_path / "bad.ecdc"
    bad.write_bytes(damaged(good_ecdc.read_bytes()))
    seen = ecdc("decompress", "--salvage", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "a.wav", bad)
    assert seen.returncode == 0 and lines(seen)[0].startswith("ecdc: warning: ")
    unseen = ecdc("decompress", "--salvage", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "b.wav", bad,
                  close=[2])
    assert unseen.returncode == 1 and (tmp_path / "b.wav").is_file()


def damaged(data: bytes) -> bytes:
    """``data`` with one byte flipped in the middle (inside a code chunk of a 1.3 s file)."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


# --------------------------------------------------------------------------- item 12: control characters

HOSTILE = "a\necdc: 5 converted, 0 skipped, 0 failed; 9.9 s of audio in 0.1 s\r\x1b[31m\x7f\x9b\u2028.wav"
SHOWN = "a\\necdc: 5 converted, 0 skipped, 0 failed; 9.9 s of audio in 0.1 s\\r\\x1b[31m\\x7f\\x9b\\u2028.wav"


def assert_no_controls(proc: subprocess.CompletedProcess) -> None:
    text = proc.stderr.decode("utf-8")
    assert not any(ch in text for ch in "\r\x1b\x7f\x9b\u2028"), repr(text)


def test_newline_in_a_file_name_is_shown_escaped(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    junk = tmp_path / HOSTILE
    junk.write_bytes(b"not audio at all")
    proc = ecdc("compress", "--checkpoint", tiny_mono_ckpt, junk)
    line = one_error(proc)
    assert line.startswith(f"ecdc: error: {tmp_path}/{SHOWN}: "), line
    assert_no_controls(proc)


@pytest.mark.parametrize("jobs", [1, 2])
def test_control_characters_in_batch_lines_are_escaped(tmp_path: Path, wav: Path, tiny_mono_ckpt: Path,
                                                      jobs: int) -> None:
    junk = tmp_path / HOSTILE
    junk.write_bytes(b"not audio at all")
    proc = ecdc("compress", "-j", jobs, "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "out", wav, junk)
    assert proc.returncode == 1
    error, summary = lines(proc)
    assert error.startswith(f"ecdc: error: {tmp_path}/{SHOWN}: "), error
    assert summary.startswith("ecdc: 1 converted, 0 skipped, 1 failed; "), summary
    assert_no_controls(proc)


def test_control_characters_in_exception_text_are_escaped(tmp_path: Path, wav: Path) -> None:
    checkpoint = tmp_path / "no\nsuch\x1b[2J.th"  # named inside the exception's own message
    proc = ecdc("compress", "--checkpoint", checkpoint, "-o", tmp_path / "x.ecdc", wav)
    line = one_error(proc)
    assert f"{tmp_path}/no\\nsuch\\x1b[2J.th: no such checkpoint" in line, line
    assert_no_controls(proc)


def test_control_characters_in_salvage_warnings_are_escaped(tmp_path: Path, good_ecdc: Path,
                                                            tiny_mono_ckpt: Path) -> None:
    bad = tmp_path / "dam\naged.ecdc"
    bad.write_bytes(damaged(good_ecdc.read_bytes()))
    proc = ecdc("decompress", "--salvage", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "x.wav", bad)
    assert proc.returncode == 0
    *warnings, stats = lines(proc)  # the run ends with its figures (issue 14, item 13), escaped too
    assert warnings and all(w.startswith(f"ecdc: warning: {tmp_path}/dam\\naged.ecdc: ") for w in warnings), warnings
    assert stats.startswith(f"ecdc: {tmp_path}/dam\\naged.ecdc -> {tmp_path / 'x.wav'}: "), stats


# --------------------------------------------------------------------------- item 14: misleading texts


def wav_bytes(channels: int, frames: int = 100, rate: int = 24000) -> bytes:
    data = np.zeros((frames, channels), "<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(body) + len(data)) + body + data


def test_too_many_channels_are_reported_as_audio(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    proc = ecdc("compress", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "x.ecdc", "-", input=wav_bytes(1025))
    line = one_error(proc)
    assert "the audio has 1025 channels; ecdc supports at most 1024" in line, line
    assert "header" not in line
    assert not (tmp_path / "x.ecdc").exists()


def test_unsupported_bandwidth_is_printed_as_given(tmp_path: Path, wav: Path, tiny_mono_ckpt: Path) -> None:
    proc = ecdc("compress", "-b", "6.0000001", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "x.ecdc", wav)
    line = one_error(proc)
    assert "does not support 6.0000001 kbps; choose one of 1.5, 3, 6, 12, 24" in line, line


def test_pickle_checkpoint_is_one_line_without_torch_warnings(tmp_path: Path, wav: Path) -> None:
    checkpoint = tmp_path / "plain.pkl"
    with open(checkpoint, "wb") as f:  # protocol 4: torch warns about it before refusing
        pickle.dump({"config": {"name": "x"}, "state_dict": {}}, f, protocol=4)
    proc = ecdc("compress", "--checkpoint", checkpoint, "-o", tmp_path / "x.ecdc", wav)
    line = one_error(proc)
    assert f"{checkpoint}: not a loadable weights-only checkpoint" in line, line
    assert "UserWarning" not in proc.stderr.decode()
