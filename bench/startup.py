"""Start-up cost of the ``ecdc`` command line: wall time and peak RSS of short commands.

    python bench/startup.py                          # this checkout, 7 runs of each command
    python bench/startup.py --runs 11 --against /work/base=before
    python bench/startup.py --json results.json

Shell loops and completion scripts run ``ecdc`` once per call, so what the interpreter
imports before a command does anything is paid every time. Each measurement is one
``python -m ecdc ...`` in a subprocess (its own peak RSS from ``os.wait4``, wall time from
spawn to exit, and CPU seconds, user + system, which a loaded machine inflates least), for:

* ``--version``,
* ``info x.ecdc`` (a 1 s file made by this checkout's ``compress`` before timing),
* ``compress`` of a 1 s 24 kHz mono WAV with the bundled default model (offline).

``--against ROOT[=LABEL]`` (repeatable) also runs another checkout of ecdc, by putting
``ROOT`` first on ``PYTHONPATH`` (checked: the ``ecdc`` imported must be ``ROOT``'s).
Checkouts and commands are interleaved, run by run, so that a shared machine's slow phases
hit every checkout alike; the medians (and the spread, min-max) are printed per command.
The first run of each pair is a discarded warm-up (page cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Checkout:
    """One copy of ecdc to run: its source root and the name the table shows."""

    root: Path
    label: str

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), *filter(None, [env.get("PYTHONPATH")])])
        return env


@dataclass
class Timings:
    """The measurements of one command on one checkout."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  #: user + system: what a loaded machine inflates least
    peak_rss_mb: list[float] = field(default_factory=list)


def measure(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one run of ``argv``, which must succeed."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; stop Popen from waiting again
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"startup.py: {' '.join(argv)} failed ({proc.returncode}): {err.decode(errors='replace')}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def write_sine_wav(path: Path, seconds: float = 1.0, rate: int = 24000) -> None:
    """A 440 Hz tone, 16-bit mono (stdlib only: this script imports no numpy)."""
    frames = int(seconds * rate)
    samples = (int(12000 * math.sin(2 * math.pi * 440 * n / rate)) for n in range(frames))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))


def check_imports_from(checkout: Checkout, work: Path) -> None:
    """Refuse a checkout whose PYTHONPATH does not win over an installed ecdc."""
    found = subprocess.run([sys.executable, "-c", "import ecdc, os; print(os.path.dirname(ecdc.__file__))"],
                           env=checkout.env(), cwd=work, capture_output=True, text=True, check=True).stdout.strip()
    if Path(found).resolve() != (checkout.root / "ecdc").resolve():
        raise SystemExit(f"startup.py: with PYTHONPATH={checkout.root}, ecdc is imported from {found}")


def parse_against(spec: str) -> Checkout:
    root, _, label = spec.partition("=")
    path = Path(root).expanduser().resolve()
    if not (path / "ecdc" / "__init__.py").is_file():
        raise SystemExit(f"startup.py: {root}: not a checkout of ecdc (no ecdc/__init__.py)")
    return Checkout(path, label or path.name)


def run(checkouts: list[Checkout], runs: int) -> dict[str, dict[str, Timings]]:
    """Interleaved measurements: command by command within a run, checkout by checkout."""
    results: dict[str, dict[str, Timings]] = {}
    with tempfile.TemporaryDirectory(prefix="ecdc-startup-") as tmp:
        work = Path(tmp)
        for checkout in checkouts:
            check_imports_from(checkout, work)
        wav = work / "one_second.wav"
        write_sine_wav(wav)
        ecdc = [sys.executable, "-m", "ecdc"]
        sample = work / "one_second.ecdc"
        measure(ecdc + ["compress", str(wav), "-o", str(sample), "-q"], checkouts[0].env(), work)
        commands = {
            "--version": ["--version"],
            "info x.ecdc": ["info", str(sample)],
            "compress 1 s": ["compress", str(wav), "-o", str(work / "out.ecdc"), "-f", "-q"],
        }
        for name in commands:
            results[name] = {c.label: Timings() for c in checkouts}
        for i in range(runs + 1):
            for name, args in commands.items():
                for checkout in checkouts if i % 2 == 0 else checkouts[::-1]:
                    wall, cpu, rss = measure(ecdc + args, checkout.env(), work)
                    if i == 0:
                        continue  # warm-up
                    timings = results[name][checkout.label]
                    timings.wall_s.append(wall)
                    timings.cpu_s.append(cpu)
                    timings.peak_rss_mb.append(rss)
            if i:
                print(f"run {i}/{runs} done", file=sys.stderr, flush=True)
    return results


def report(results: dict[str, dict[str, Timings]]) -> str:
    lines = [f"{'command':<14} {'checkout':<12} {'wall s (median, min-max)':<28} {'CPU s (median)':<16}"
             "peak RSS MB (median)"]
    for name, by_checkout in results.items():
        for label, t in by_checkout.items():
            wall = f"{statistics.median(t.wall_s):.3f} ({min(t.wall_s):.3f}-{max(t.wall_s):.3f})"
            lines.append(f"{name:<14} {label:<12} {wall:<28} {statistics.median(t.cpu_s):<16.3f}"
                         f"{statistics.median(t.peak_rss_mb):.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured runs of each command (median; default 7)")
    parser.add_argument("--against", action="append", default=[], metavar="ROOT[=LABEL]",
                        help="also run the ecdc checkout at ROOT (via PYTHONPATH); repeatable")
    parser.add_argument("--label", default="this", help="name of this checkout in the table (default: this)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every measurement to FILE")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    checkouts = [Checkout(ROOT, args.label), *map(parse_against, args.against)]
    if len({c.label for c in checkouts}) != len(checkouts):
        parser.error("checkout labels must differ (use ROOT=LABEL)")
    results = run(checkouts, args.runs)
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps({name: {label: vars(t) for label, t in by.items()}
                                         for name, by in results.items()}, indent=1))


if __name__ == "__main__":
    main()
