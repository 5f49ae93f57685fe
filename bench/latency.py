"""First-output latency and throughput of ``ecdc compress - -o -`` and ``ecdc decompress - -o -``
fed in real time through a pipe, at several ``--latency`` settings.

    python bench/latency.py                       # 20 s of audio; latency 0, 0.25, default (0.5), 1, 2
    python bench/latency.py --seconds 30 --latency 0 default --json out.json
    python bench/latency.py --threads 1           # the ecdc processes on one torch thread
    python bench/latency.py --checkpoint tests/tiny.th --model ...   # any model the CLI takes

For each setting, the CLI runs in a subprocess whose standard input is a pipe that this
script writes in real time (paced writes, 10 ms of audio each), while a thread reads its
standard output and notes when each byte arrived.

* ``compress``: the WAV header is written first; the clock starts (t0) when the .ecdc
  header comes back (the model is loaded and the input opened), then the samples are
  written as a live source would give them. Reported: ``first`` = when the first code
  chunk arrived after t0 (the first audio it codes ended at t0 + its duration), and the
  ``lag`` of each code chunk = arrival - (t0 + end of the audio it codes), median and max.
* ``decompress``: the input is what the ``compress`` run at the same setting wrote (its
  chunks as a live encoder sends them); its header is written first, then, after
  ``--warmup`` seconds for the process to start, each code chunk at t0 + the end time of
  its audio. Reported: ``first`` = arrival of the first byte of audio data after the WAV
  header, after t0 (it includes loading the model, which the reader does once the first
  chunk is in), and the lag of the newest sample written = arrival - (t0 + its time).
* ``throughput``: the same command fed as fast as possible: seconds of audio per second of
  wall time from its first output (model loaded) to its end (``x`` real time).

``default`` runs without ``--latency`` (to a pipe: ``ecdc.convert.STREAM_LATENCY``); ``file``
(throughput only) writes to a regular file, which gets the long blocks. Figures depend on
the machine and its load; run it on an idle one for numbers to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
PACE = 0.01  # seconds of audio per paced write


@dataclass
class Figures:
    """What one setting measured, in seconds (throughput in x real time)."""

    command: str
    latency: str
    first: float | None = None
    lag_median: float | None = None
    lag_max: float | None = None
    throughput: float | None = None
    chunks: int | None = None
    notes: list[str] = field(default_factory=list)


class Collector(threading.Thread):
    """Reads a pipe to its end, noting (time, bytes so far) at each read."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.arrivals: list[tuple[float, int]] = []
        self.data = bytearray()

    def run(self) -> None:
        while True:
            piece = os.read(self.fd, 1 << 16)
            if not piece:
                return
            self.data += piece
            self.arrivals.append((time.monotonic(), len(self.data)))

    def when(self, offset: int, timeout: float) -> float | None:
        """When byte ``offset`` (0-based) arrived; waits up to ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        while True:
            for t, total in self.arrivals:
                if total > offset:
                    return t
            if time.monotonic() > deadline or not self.is_alive():
                if self.arrivals and self.arrivals[-1][1] > offset:
                    continue
                return None
            time.sleep(0.002)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """The subprocesses' environment: ``--threads`` sets their torch thread count."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    return env


def ecdc_command(args: argparse.Namespace, *words: str) -> list[str]:
    cmd = [sys.executable, "-m", "ecdc", *words, "-q"]
    if args.model:
        cmd += ["--model", args.model]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    return cmd


def latency_words(setting: str) -> list[str]:
    return [] if setting in ("default", "file") else ["--latency", setting]


def make_audio(seconds: float, rate: int, path: Path) -> None:
    """Speech-like test audio: tones with a syllable-rate envelope and a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    tone = sum(np.sin(2 * np.pi * f * t + p) / (i + 1) for i, (f, p) in enumerate(((180, 0), (360, 1), (950, 2))))
    wav = 0.25 * envelope * tone + 0.01 * rng.standard_normal(t.size)
    sf.write(str(path), wav.astype(np.float32), rate, subtype="PCM_16")


def ecdc_layout(data: bytes) -> tuple[int, list[tuple[int, int, int]], int, int]:
    """(header size, [(start, end offset, frames)] of each code chunk, hop, sample rate) of a .ecdc stream."""
    (body,) = struct.unpack_from("<H", data, 6)
    rate, hop = struct.unpack_from("<II", data, 8)
    pos = header = 8 + body + 4
    chunks = []
    while pos + 5 <= len(data):
        kind = data[pos]
        (length,) = struct.unpack_from("<I", data, pos + 1)
        end = pos + 5 + length + 4
        if kind == 0x43:
            (frames,) = struct.unpack_from("<I", data, pos + 5 + 4)
            chunks.append((pos, end, frames))
        if kind == 0x45:
            break
        pos = end
    return header, chunks, hop, rate


def wav_data_offset(data: bytes) -> int:
    """Where the samples of a streamed WAV start (after its ``data`` chunk header)."""
    pos = 12
    while pos + 8 <= len(data):
        cid = data[pos:pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        if cid == b"data":
            return pos + 8
        pos += 8 + size + (size & 1)
    raise ValueError("no data chunk")


def start_piped(args: argparse.Namespace, command: str, setting: str) -> tuple[subprocess.Popen, "Collector"]:
    """``ecdc COMMAND - -o -`` at ``setting``, with a thread collecting what it writes."""
    proc = subprocess.Popen(ecdc_command(args, command, "-", "-o", "-", *latency_words(setting)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=child_env(args))
    assert proc.stdin is not None and proc.stdout is not None
    reader = Collector(proc.stdout.fileno())
    reader.start()
    return proc, reader


def run_compress(args: argparse.Namespace, wav_path: Path, setting: str, ecdc_path: Path) -> Figures:
    """Also writes what came out to ``ecdc_path``: chunks as a live encoder sends them."""
    fig = Figures("compress", setting)
    wav_bytes = wav_path.read_bytes()
    split = wav_data_offset(wav_bytes)
    info = sf.info(str(wav_path))
    frame_bytes = 2 * info.channels
    proc, reader = start_piped(args, "compress", setting)
    proc.stdin.write(wav_bytes[:split])
    proc.stdin.flush()
    if reader.when(11, timeout=120) is None:  # the .ecdc header's first bytes: ready
        proc.kill()
        fig.notes.append("no header: " + proc.communicate()[1].decode(errors="replace")[-300:])
        return fig
    t0 = time.monotonic()
    step = int(PACE * info.samplerate) * frame_bytes
    for pos in range(split, len(wav_bytes), step):
        due = t0 + (pos - split) / frame_bytes / info.samplerate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        proc.stdin.write(wav_bytes[pos:pos + step])
        proc.stdin.flush()
    proc.stdin.close()
    proc.wait(timeout=600)
    reader.join(timeout=60)
    ecdc_path.write_bytes(bytes(reader.data))
    header, chunks, hop, rate = ecdc_layout(bytes(reader.data))
    lags, done = [], 0
    for _, end, frames in chunks:
        done += frames
        arrival = reader.when(end - 1, timeout=0)
        if arrival is not None:
            audio_end = min(done * hop / rate, info.duration)
            lags.append(arrival - (t0 + audio_end))
            if fig.first is None:
                fig.first = arrival - t0
    fig.chunks = len(chunks)
    if lags:
        fig.lag_median, fig.lag_max = statistics.median(lags), max(lags)
    return fig


def run_decompress(args: argparse.Namespace, ecdc_path: Path, setting: str) -> Figures:
    fig = Figures("decompress", setting)
    data = ecdc_path.read_bytes()
    header, chunks, hop, rate = ecdc_layout(data)
    proc, reader = start_piped(args, "decompress", setting)
    # The header and any chunk before the first code chunk (tags) at once, then a warm-up.
    first_code_start = chunks[0][0] if chunks else header
    proc.stdin.write(data[:first_code_start])
    proc.stdin.flush()
    time.sleep(args.warmup)
    t0 = time.monotonic()
    pos, done = first_code_start, 0
    for _, end, frames in chunks:
        done += frames
        due = t0 + done * hop / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        proc.stdin.write(data[pos:end])
        proc.stdin.flush()
        pos = end
    proc.stdin.write(data[pos:])
    proc.stdin.close()
    proc.wait(timeout=600)
    reader.join(timeout=60)
    out = bytes(reader.data)
    if proc.returncode != 0 or len(out) < 44:
        fig.notes.append(f"exit {proc.returncode}: " + proc.stderr.read().decode(errors="replace")[-300:]
                         if proc.stderr else "")
        return fig
    start = wav_data_offset(out)
    channels, out_rate = struct.unpack_from("<HI", out, 22)
    first = reader.when(start, timeout=0)
    if first is not None:
        fig.first = first - t0
    lags = []
    for t, total in reader.arrivals:
        samples = (total - start) // (2 * channels)
        if samples > 0:
            lags.append(t - (t0 + samples / out_rate))
    if lags:
        fig.lag_median, fig.lag_max = statistics.median(lags), max(lags[:-1] or lags)
    fig.chunks = len(chunks)
    return fig


def throughput(args: argparse.Namespace, command: str, src: Path, setting: str, seconds: float,
               tmp: Path) -> float | None:
    """Seconds of audio per second of wall time, from the first output byte (the model is
    loaded) to the end, fed as fast as possible; ``file``: to a regular file, from the start
    (so it includes loading: a lower bound)."""
    if setting == "file":
        out = tmp / ("out.ecdc" if command == "compress" else "out.wav")
        cmd = ecdc_command(args, command, str(src), "-o", str(out), "-f")
        start = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, cwd=ROOT, env=child_env(args))
        if done.returncode != 0:
            print(f"{' '.join(cmd)}: {done.stderr.decode(errors='replace').strip()}", file=sys.stderr)
            return None
        return seconds / (time.monotonic() - start)
    cmd = ecdc_command(args, command, "-", "-o", "-", *latency_words(setting))
    with open(src, "rb") as stdin:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                env=child_env(args))
        assert proc.stdout is not None
        reader = Collector(proc.stdout.fileno())
        reader.start()
        proc.wait(timeout=900)
        reader.join(timeout=60)
    if proc.returncode != 0 or not reader.arrivals:
        return None
    return seconds / (reader.arrivals[-1][0] - reader.arrivals[0][0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the test audio")
    parser.add_argument("--rate", type=int, default=24000, help="its sample rate (mono)")
    parser.add_argument("--latency", nargs="+", default=["0", "0.25", "default", "1", "2"],
                        help="settings: seconds, or 'default' (none given)")
    parser.add_argument("--model", help="--model for the CLI")
    parser.add_argument("--checkpoint", help="--checkpoint for the CLI")
    parser.add_argument("--warmup", type=float, default=8.0,
                        help="seconds decompress gets to start before its input flows")
    parser.add_argument("--threads", type=int, help="torch threads of the ecdc processes (OMP_NUM_THREADS; "
                        "default: torch's own choice); on a loaded machine 1 keeps up best")
    parser.add_argument("--no-throughput", action="store_true", help="skip the unpaced runs")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    results: list[Figures] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        wav = tmp / "in.wav"
        make_audio(args.seconds, args.rate, wav)
        for setting in args.latency:
            ecdc_file = tmp / f"in-{setting}.ecdc"
            comp = run_compress(args, wav, setting, ecdc_file)
            if not ecdc_file.exists() or not comp.chunks:
                print(_line(comp), flush=True)
                continue
            dec = run_decompress(args, ecdc_file, setting)
            if not args.no_throughput:
                comp.throughput = throughput(args, "compress", wav, setting, args.seconds, tmp)
                dec.throughput = throughput(args, "decompress", ecdc_file, setting, args.seconds, tmp)
            for fig in (comp, dec):
                results.append(fig)
                print(_line(fig), flush=True)
        if not args.no_throughput:
            for command, src in (("compress", wav), ("decompress", tmp / "in-default.ecdc")):
                if src.exists():
                    fig = Figures(command, "file", throughput=throughput(args, command, src, "file",
                                                                         args.seconds, tmp))
                    fig.notes.append("to a regular file, wall time incl. start-up")
                    results.append(fig)
                    print(_line(fig), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(f) for f in results], indent=1))
    return 0


def _line(fig: Figures) -> str:
    def s(value: float | None, unit: str = "s") -> str:
        return "-" if value is None else f"{value:.2f}{unit}"

    return (f"{fig.command:10} latency {fig.latency:>7}: first output {s(fig.first)}, lag median "
            f"{s(fig.lag_median)} max {s(fig.lag_max)}, throughput {s(fig.throughput, 'x')}, "
            f"{fig.chunks if fig.chunks is not None else '-'} chunks" + (f"  ({'; '.join(fig.notes)})"
                                                                          if fig.notes else ""))


if __name__ == "__main__":
    sys.exit(main())
