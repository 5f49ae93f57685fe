"""ecdc without a network (issue 14, item 16), through the real command line.

The examples that ``ecdc --help`` and the README show run as shown with no network (the
default model ships in the package), and a file made with ``--checkpoint`` decodes with the
checkpoint of its model's name in the cache, or says that the same ``--checkpoint`` is needed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from conftest import TINY_MONO, random_model, save_checkpoint, test_signal

REPO = Path(__file__).resolve().parents[1]
#: Where no download can succeed, at once (nothing listens on the discard port).
NO_NETWORK = "http://127.0.0.1:9/"


def ecdc(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """``python -m ecdc ARGS`` in ``cwd``: its weights cache is ``cwd/cache``, downloads fail."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "ECDC_CACHE_DIR": str(cwd / "cache"), "ECDC_WEIGHTS_URL": NO_NETWORK}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          timeout=300)


def write_wav(path: Path, seconds: float = 0.5) -> Path:
    soundfile.write(str(path), test_signal(seconds, 24000).T, 24000, subtype="PCM_16")
    return path


def shown_commands(text: str) -> list[list[str]]:
    """The ``ecdc ...`` commands in ``text``: each line's, and each ``&& ecdc ...`` of a line
    (comments after ``#`` dropped)."""
    commands = []
    for line in text.splitlines():
        for part in re.split(r"&&|;", line.split("#")[0]):
            if part.strip().startswith("ecdc "):
                commands.append(shlex.split(part)[1:])
    return commands


def run_in_order(tmp_path: Path, commands: list[list[str]]) -> None:
    """Run ``commands`` in a fresh directory holding each audio file they read."""
    for args in commands:
        for arg in args:
            if arg.endswith(".wav") and args[0] == "compress" and not (tmp_path / arg).exists():
                write_wav(tmp_path / arg)
        proc = ecdc(tmp_path, *args)
        assert proc.returncode == 0, (args, proc.stderr.decode())
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []  # nothing downloaded


def test_the_help_examples_run_offline(tmp_path: Path) -> None:
    help_text = ecdc(tmp_path, "--help").stdout.decode()
    commands = shown_commands(help_text)
    assert [c[0] for c in commands] == ["compress", "decompress", "info"], help_text
    run_in_order(tmp_path, commands)
    assert (tmp_path / "speech.ecdc").is_file() and soundfile.info(str(tmp_path / "speech.wav")).frames > 0


def test_the_readme_quick_start_runs_offline(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = shown_commands(first_block)
    assert commands and commands[0][0] == "compress", first_block
    run_in_order(tmp_path, commands)


@pytest.fixture
def made_with_checkpoint(tmp_path: Path) -> Path:
    """``in.ecdc``, compressed with ``--checkpoint tiny.th`` (a model ecdc does not know by
    name, ``tiny_mono``), and what it decodes to with that checkpoint, ``want.wav``."""
    write_wav(tmp_path / "in.wav")
    save_checkpoint(random_model(TINY_MONO), tmp_path / "tiny.th")
    assert ecdc(tmp_path, "compress", "in.wav", "--checkpoint", "tiny.th", "-q").returncode == 0
    assert ecdc(tmp_path, "decompress", "in.ecdc", "-o", "want.wav", "--checkpoint", "tiny.th", "-q").returncode == 0
    return tmp_path


def one_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.decode().splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("ecdc: error: "), lines
    return lines[0]


def test_a_file_made_with_a_checkpoint_says_to_pass_the_same_checkpoint(made_with_checkpoint: Path) -> None:
    work = made_with_checkpoint
    line = one_error(ecdc(work, "decompress", "in.ecdc", "-o", "out.wav"))
    assert line.startswith("ecdc: error: in.ecdc: encoded with model 'tiny_mono', which ecdc does not know"), line
    assert "the same --checkpoint PATH it was compressed with" in line
    assert f"{work / 'cache'}" in line and "tiny_mono.th" in line  # where ecdc would have found it
    assert not (work / "out.wav").exists()


def test_a_file_made_with_a_checkpoint_finds_it_in_the_cache(made_with_checkpoint: Path) -> None:
    work = made_with_checkpoint
    (work / "cache").mkdir()
    (work / "cache" / "tiny_mono.th").write_bytes((work / "tiny.th").read_bytes())
    proc = ecdc(work, "decompress", "in.ecdc", "-o", "out.wav", "-q")
    assert proc.returncode == 0, proc.stderr.decode()
    assert (work / "out.wav").read_bytes() == (work / "want.wav").read_bytes()


def test_a_cached_checkpoint_with_other_weights_is_not_used(made_with_checkpoint: Path) -> None:
    work = made_with_checkpoint
    (work / "cache").mkdir()
    save_checkpoint(random_model(TINY_MONO, seed=7), work / "cache" / "tiny_mono-other.th")
    (work / "cache" / "tiny_mono.pt").write_bytes(b"not a checkpoint")  # skipped, not an error
    line = one_error(ecdc(work, "decompress", "in.ecdc", "-o", "out.wav"))
    assert "no checkpoint of that name with these weights is in" in line, line
    assert not (work / "out.wav").exists()


def test_a_registered_name_with_other_weights_needs_the_checkpoint_too(tmp_path: Path) -> None:
    """A checkpoint whose config has the bundled release's name, but its own weights: the
    bundled weights must not be tried, the checkpoint in the cache is used."""
    write_wav(tmp_path / "in.wav")
    renamed = random_model(dataclasses.replace(TINY_MONO, name="ecdc_24khz_v1"), seed=3)
    save_checkpoint(renamed, tmp_path / "mine.th")
    assert ecdc(tmp_path, "compress", "in.wav", "--checkpoint", "mine.th", "-q").returncode == 0
    line = one_error(ecdc(tmp_path, "decompress", "in.ecdc", "-o", "out.wav"))
    assert "encoded with other weights than ecdc's model 'ecdc_24khz_v1'" in line, line
    assert "the same --checkpoint PATH" in line
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "ecdc_24khz_v1.th").write_bytes((tmp_path / "mine.th").read_bytes())
    proc = ecdc(tmp_path, "decompress", "in.ecdc", "-o", "out.wav", "-q")
    assert proc.returncode == 0, proc.stderr.decode()
    assert soundfile.info(str(tmp_path / "out.wav")).frames == soundfile.info(str(tmp_path / "in.wav")).frames
