"""What users of ffmpeg, sox and opusenc type, and what ecdc does with it (issue 14, items
4, 5, 14 and 15): ``-o DIR/``, ``-f FORMAT`` read as a second input, ``-y``/``-n``, the
progress bar's numbers, ``info`` of several files, ``-b 6k``, waiting for a terminal's
stdin, and the README's command list. Tiny random-weight models only."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import warnings
from pathlib import Path

import click
import pytest
import soundfile
from click.testing import CliRunner

from ecdc.batch import _Progress
from ecdc.cli import Bandwidth, main

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]
#: A float printed with more digits than any bar should show (``21.529999999999998``).
LONG_FLOAT = re.compile(r"\d\.\d{3,}")


def run(*args: object, input: bytes | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def ecdc(*args: object, **kwargs) -> subprocess.CompletedProcess:
    """``python -m ecdc ARGS`` from the repository root, warnings shown (tqdm's included)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], cwd=REPO, capture_output=True,
                          timeout=180, env=env, **kwargs)


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    text = proc.stderr.decode()
    assert "Traceback" not in text, text
    return [ln for ln in text.splitlines() if ln.strip()]


def write_wav(path: Path, seconds: float = 0.4, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), test_signal(seconds, 16000, seed=seed).T, 16000, subtype="PCM_16")
    return path


def everything_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    return write_wav(tmp_path / "in.wav")


@pytest.fixture
def good_ecdc(tmp_path: Path, wav: Path, tiny_mono_ckpt: Path) -> Path:
    path = tmp_path / "good.ecdc"
    assert run("compress", wav, "-q", "-o", path, "--checkpoint", tiny_mono_ckpt).exit_code == 0
    return path


# --------------------------------------------------------------------------- item 4: -o DIR/


def test_trailing_slash_output_is_a_directory_made_for_one_input(tmp_path: Path, wav: Path,
                                                                 tiny_mono_ckpt: Path) -> None:
    proc = ecdc("compress", wav, "-o", f"{tmp_path / 'new' / 'deeper'}/", "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "new" / "deeper" / "in.ecdc").read_bytes()[:4] == b"ECDC"
    assert not (tmp_path / "new" / "deeper").is_file()
    # An existing directory, with or without the slash: the default name inside it.
    for given in ("with/", "without"):
        (tmp_path / given.rstrip("/")).mkdir()
        result = run("decompress", tmp_path / "new" / "deeper" / "in.ecdc", "-o", f"{tmp_path / given}",
                     "--checkpoint", tiny_mono_ckpt)
        assert result.exit_code == 0, result.stderr
        assert everything_under(tmp_path / given.rstrip("/")) == ["in.wav"]


def test_trailing_slash_output_refusals_create_nothing(tmp_path: Path, wav: Path, tiny_mono_ckpt: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"a file")
    result = run("compress", wav, "-o", f"{plain}/", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 1 and "not a directory" in result.stderr, result.stderr
    assert plain.read_bytes() == b"a file"
    second = write_wav(tmp_path / "second.wav", seed=1)
    result = run("compress", wav, second, "-o", f"{plain}/", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 1 and "-o must be a directory" in result.stderr, result.stderr
    assert plain.read_bytes() == b"a file" and not (tmp_path / "in.ecdc").exists()
    result = run("compress", "-", "-o", f"{tmp_path / 'for_stdin'}/", "--checkpoint", tiny_mono_ckpt,
                 input=wav.read_bytes())
    assert result.exit_code == 1 and "name the output file for stdin" in result.stderr, result.stderr
    result = run("compress", tmp_path / "missing.wav", "-o", f"{tmp_path / 'never'}/", "--checkpoint",
                 tiny_mono_ckpt)
    assert result.exit_code == 1 and "no such file" in result.stderr
    assert not (tmp_path / "for_stdin").exists() and not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- item 5: -f FORMAT, -y, -n


def test_ffmpeg_format_habit_is_an_error_before_anything_is_made(tmp_path: Path, good_ecdc: Path,
                                                                 tiny_mono_ckpt: Path) -> None:
    before = everything_under(tmp_path)
    proc = ecdc("decompress", good_ecdc, "-f", "wav", "-o", tmp_path / "y.wav", "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 1
    [line] = stderr_lines(proc)
    assert line.startswith(f"ecdc: error: {tmp_path / 'y.wav'}: "), line
    assert "batch" in line and "wav" in line and "-f means --force" in line and "end it with /" in line, line
    assert everything_under(tmp_path) == before  # no y.wav directory, no output
    # Any file-like suffix, for compress too; with a trailing slash it is a directory.
    second = write_wav(tmp_path / "second.wav", seed=1)
    proc = ecdc("compress", tmp_path / "in.wav", second, "-o", tmp_path / "both.ECDC", "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 1 and "looks like one file" in stderr_lines(proc)[0]
    assert not (tmp_path / "both.ECDC").exists()
    proc = ecdc("compress", tmp_path / "in.wav", second, "-o", f"{tmp_path / 'both.ecdc'}/", "-q",
                "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 0, proc.stderr.decode()
    assert everything_under(tmp_path / "both.ecdc") == ["in.ecdc", "second.ecdc"]


def test_a_format_name_among_inputs_is_reported_missing(tmp_path: Path, good_ecdc: Path,
                                                        tiny_mono_ckpt: Path) -> None:
    result = run("decompress", good_ecdc, "-f", "wav", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 1
    [error] = [ln for ln in result.stderr.splitlines() if ln.startswith("ecdc: error:")]
    assert error.startswith("ecdc: error: wav: no such file or directory"), error
    assert "-f means --force" in error
    assert (tmp_path / "good.wav").is_file()  # the real input is still converted
    assert "1 converted" in result.stderr and "1 failed" in result.stderr


def test_y_overwrites_n_never_and_both_is_a_usage_error(tmp_path: Path, wav: Path, tiny_mono_ckpt: Path) -> None:
    target = tmp_path / "x.ecdc"
    target.write_bytes(b"precious")
    result = run("compress", wav, "-o", target, "-n", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 1 and "exists" in result.stderr
    assert target.read_bytes() == b"precious"
    for both in (["-n", "-y"], ["-f", "-n"], ["--no-overwrite", "--force"]):
        proc = ecdc("compress", wav, "-o", target, *both, "--checkpoint", tiny_mono_ckpt)
        assert proc.returncode == 2 and "-n (never overwrite) contradicts -f/-y" in proc.stderr.decode()
        assert target.read_bytes() == b"precious"
    result = run("compress", wav, "-o", target, "-y", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    assert target.read_bytes()[:4] == b"ECDC"
    # In a batch -n skips what exists (the default, said out loud) and converts the rest.
    second = write_wav(tmp_path / "second.wav", seed=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "in.ecdc").write_bytes(b"old")
    result = run("compress", wav, second, "-n", "-o", tmp_path / "out", "--checkpoint", tiny_mono_ckpt)
    assert result.exit_code == 0, result.stderr
    assert "1 converted, 1 skipped" in result.stderr
    assert (tmp_path / "out" / "in.ecdc").read_bytes() == b"old"


# --------------------------------------------------------------------------- item 14: the progress bar


def test_progress_shows_rounded_seconds_and_never_passes_its_total() -> None:
    stream = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bar = _Progress(True, 20.2 + 20.1 + 20.1, 3, stream)  # 60.4 s estimated
        assert bar.bar is not None
        for step in range(6150):  # increments that do not add up exactly, past the estimate
            bar.advance(0.01)
            if step % 97 == 0:
                bar.bar.refresh()
        for estimate, actual in ((20.2, 20.53), (20.1, 20.1), (20.1, 20.0)):
            bar.file_done(estimate, actual)
        bar.bar.refresh()
        bar.close()
    assert not [w for w in caught if "clamping" in str(w.message)], [str(w.message) for w in caught]
    frames = [f for f in stream.getvalue().split("\r") if f.strip()]
    assert frames and not [f for f in frames if LONG_FLOAT.search(f)], frames
    assert not [f for f in frames if re.search(r"\b6[1-9]/60\b", f)], frames  # never past the total
    assert "61/61 s of audio" in frames[-1] and "3/3 files" in frames[-1], frames[-1]  # 60.63 s in the end
    # Short totals in tenths; unknown totals (stdin) as a count.
    for total, expected in ((1.3, "1.3/1.3 s of audio"), (0.0, "4 s of audio")):
        stream = io.StringIO()
        bar = _Progress(True, total, 1, stream)
        for _ in range(437):
            bar.advance(0.01)
        assert bar.bar is not None
        bar.bar.refresh()
        bar.close()
        assert expected in stream.getvalue() and not LONG_FLOAT.search(stream.getvalue()), stream.getvalue()


def on_a_terminal(args: list[object], stdin_tty: bool = False) -> tuple[int, str]:
    """``python -m ecdc ARGS`` with stderr (or stdin) on a pseudo-terminal of 120 columns,
    as a user sees it; returns the exit status and what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.Popen([sys.executable, "-m", "ecdc", *map(str, args)], cwd=REPO, env=env,
                            stdin=slave if stdin_tty else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave if not stdin_tty else subprocess.PIPE)
    os.close(slave)
    shown = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                return
            if not data:
                return
            shown.extend(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        if stdin_tty:
            os.write(master, b"\x04")  # Ctrl-D: the end of input
            _, err = proc.communicate(timeout=180)
            return proc.returncode, err.decode()
        proc.wait(timeout=180)
        reader.join(timeout=10)
        return proc.returncode, shown.decode("utf-8", "replace")
    finally:
        proc.kill()
        os.close(master)


def test_batch_progress_on_a_terminal_has_no_long_floats_or_warnings(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    inputs = [write_wav(tmp_path / "src" / f"f{i}.wav", seconds=0.77 + 0.31 * i, seed=i) for i in range(4)]
    status, shown = on_a_terminal(["compress", *inputs, "-o", tmp_path / "out", "--checkpoint", tiny_mono_ckpt])
    assert status == 0, shown
    assert "clamping" not in shown and "Warning" not in shown and "Traceback" not in shown, shown
    assert "s of audio" in shown and "4/4 files" in shown, shown
    bars = [f for f in re.split(r"[\r\n]", shown) if "s of audio [" in f]
    assert bars and not [f for f in bars if LONG_FLOAT.search(f)], bars
    assert "4 converted, 0 skipped, 0 failed" in shown
    status, shown = on_a_terminal(["decompress", *sorted((tmp_path / "out").iterdir()), "-o", tmp_path / "back",
                                   "--checkpoint", tiny_mono_ckpt])
    assert status == 0 and "clamping" not in shown and "Warning" not in shown, shown
    bars = [f for f in re.split(r"[\r\n]", shown) if "s of audio [" in f]
    assert bars and not [f for f in bars if LONG_FLOAT.search(f)], bars


# --------------------------------------------------------------------------- item 15: info, -b, stdin, README


def test_info_of_several_files_heads_each_and_fails_for_a_bad_one(tmp_path: Path, good_ecdc: Path,
                                                                  wav: Path) -> None:
    other = tmp_path / "other.ecdc"
    other.write_bytes(good_ecdc.read_bytes())
    alone = ecdc("info", good_ecdc)
    assert alone.returncode == 0 and "==>" not in alone.stdout.decode()  # one file: as before
    proc = ecdc("info", good_ecdc, tmp_path / "missing.ecdc", wav, other)
    assert proc.returncode == 1
    out = proc.stdout.decode()
    blocks = out.split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [f"==> {good_ecdc} <==", f"==> {other} <=="], out
    for block in blocks:  # the same rows as for one file (the two files are the same bytes)
        assert block.split("\n", 1)[1].rstrip("\n") == alone.stdout.decode().rstrip("\n"), out
    errors = stderr_lines(proc)
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"ecdc: error: {tmp_path / 'missing.ecdc'}: no such file"), errors
    assert errors[1].startswith(f"ecdc: error: {wav}: not an .ecdc stream"), errors
    good = ecdc("info", good_ecdc, other)
    assert good.returncode == 0 and good.stderr == b""


@pytest.mark.parametrize("text", ["6", "6.0", "6k", "6K", "6kbps", "6 kbps", "6KBPS", " 6 Kbps ", "6kb/s",
                                  "6kbit/s", "06.00", "6.", "6.k"])
def test_bandwidth_spellings(text: str) -> None:
    assert Bandwidth().convert(text, None, None) == 6.0


@pytest.mark.parametrize("text", ["6x", "kbps", "-6", "0", "0k", "six", "6 mbps", "6kbpss", "", "nan", "inf",
                                  "6e3", "6,0", ".", "6..0", "6 k bps"])
def test_bandwidth_nonsense_is_refused(text: str) -> None:
    with pytest.raises(click.BadParameter, match="1.5, 3, 6, 12, 24"):
        Bandwidth().convert(text, None, None)


def test_bandwidth_spellings_on_the_command_line(tmp_path: Path, wav: Path, tiny_mono_ckpt: Path) -> None:
    codes = []
    for text in ("1.5", "1.5k", "1.5 KBPS"):
        out = tmp_path / f"{len(codes)}.ecdc"
        result = run("compress", wav, "-b", text, "-o", out, "--checkpoint", tiny_mono_ckpt)
        assert result.exit_code == 0, result.stderr
        codes.append(out.read_bytes())
    assert codes[0] == codes[1] == codes[2]
    proc = ecdc("compress", wav, "-b", "6 mbps", "-o", tmp_path / "no.ecdc", "--checkpoint", tiny_mono_ckpt)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Usage:" in err and "'6 mbps' is not a bitrate" in err, err
    assert "1.5, 3, 6, 12, 24" in err and not (tmp_path / "no.ecdc").exists()


def test_stdin_from_a_terminal_says_it_waits(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    note = "ecdc: reading audio from standard input (Ctrl-D ends it)"
    status, err = on_a_terminal(["compress", "-", "-o", tmp_path / "x.ecdc", "--checkpoint", tiny_mono_ckpt],
                                stdin_tty=True)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[0] == note, err
    assert status == 1 and len(lines) == 2 and lines[1].startswith("ecdc: error: <stdin>: "), err  # nothing came
    status, err = on_a_terminal(["compress", "-", "-q", "-o", tmp_path / "x.ecdc", "--checkpoint", tiny_mono_ckpt],
                                stdin_tty=True)
    assert status == 1 and "reading audio" not in err, err
    # Not a terminal (a pipe, a file): nothing to say.
    piped = ecdc("compress", "-", "-o", tmp_path / "y.ecdc", "--checkpoint", tiny_mono_ckpt,
                 input=write_wav(tmp_path / "p.wav").read_bytes())
    assert piped.returncode == 0 and "reading audio" not in piped.stderr.decode()


def test_readme_commands_list_every_command_and_completion() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    for name in main.commands:
        assert f"\necdc {name} " in section or f"\necdc {name}\n" in section, name
    for flag in ("-y", "-n", "FILE..."):
        assert flag in section
    assert 'eval "$(_ECDC_COMPLETE=bash_source ecdc)"' in section
    assert "_ECDC_COMPLETE=zsh_source ecdc" in section and "_ECDC_COMPLETE=fish_source ecdc" in section
