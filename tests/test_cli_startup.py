"""Start-up of the command line (issue 14, item 11): ``--version``, ``-V``, ``--help``,
``COMMAND --help`` and ``info`` run without importing torch (the first ones without numpy
either), in the real ``python -m ecdc`` process, as shell loops and completion scripts run it.

What a process imported is read from ``python -X importtime``, which lists every module
the interpreter imported, on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "releases" / "ecdc_24khz_v1.ecdc"


def run_importing(*args: object) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -X importtime -m ecdc ARGS`` and the top-level packages it imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONPROFILEIMPORTTIME")}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ecdc", *map(str, args)], cwd=REPO,
                          capture_output=True, timeout=120, env=env, text=True)
    imported = set()
    other = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            if "[us]" not in line:  # not the header line, "self [us] | cumulative | imported package"
                imported.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
        else:
            other.append(line)
    proc.stderr = "\n".join(other)
    return proc, imported


@pytest.mark.parametrize("args", [
    ["--version"], ["-V"], ["--help"], ["-h"],
    ["compress", "--help"], ["decompress", "--help"], ["info", "--help"], ["models", "--help"],
    ["train", "--help"],
], ids=lambda a: " ".join(a))
def test_version_and_help_import_neither_torch_nor_numpy(args: list[str]) -> None:
    proc, imported = run_importing(*args)
    assert proc.returncode == 0, proc.stderr
    assert "ecdc" in imported and "click" in imported  # the real command line ran
    assert "torch" not in imported, sorted(imported)
    assert "numpy" not in imported, sorted(imported)


def test_short_v_is_version() -> None:
    short, _ = run_importing("-V")
    long, _ = run_importing("--version")
    assert short.returncode == long.returncode == 0
    assert short.stdout == long.stdout and short.stdout.startswith("ecdc, version ")


def test_info_reads_the_container_without_torch() -> None:
    proc, imported = run_importing("info", GOLDEN)
    assert proc.returncode == 0, proc.stderr
    assert "ecdc_24khz_v1" in proc.stdout and "36000 samples" in proc.stdout  # it read the whole file
    assert "torch" not in imported, sorted(imported)


def test_info_of_several_files_and_a_bad_one_without_torch(tmp_path: Path) -> None:
    bad = tmp_path / "not.ecdc"
    bad.write_bytes(b"RIFF....WAVE")
    proc, imported = run_importing("info", GOLDEN, bad)
    assert proc.returncode == 1
    assert proc.stdout.count("ecdc_24khz_v1") >= 1
    assert proc.stderr.startswith(f"ecdc: error: {bad}: "), proc.stderr
    assert "torch" not in imported, sorted(imported)


def test_a_command_that_loads_a_model_still_does(tmp_path: Path) -> None:
    """The other side of the lazy imports: ``models`` needs the registry (and torch), and works."""
    proc, imported = run_importing("models")
    assert proc.returncode == 0, proc.stderr
    assert "ecdc_24khz" in proc.stdout
    assert "torch" in imported


def test_the_package_imports_the_api_on_first_use() -> None:
    """``import ecdc`` is light; ``ecdc.load_model`` and friends still work as before."""
    code = ("import sys, ecdc; light = 'torch' not in sys.modules; "
            "from ecdc import EncodedAudio, load_model, compress_file; "
            "print(light, 'torch' in sys.modules, EncodedAudio.__module__, load_model.__module__, "
            "compress_file.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out == ["True", "True", "ecdc.container.encoded", "ecdc.codec", "ecdc.convert"]
