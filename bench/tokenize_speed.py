"""Throughput of ``ecdc tokenize`` against the script people write: a per-file ``model.encode`` loop.

    python bench/tokenize_speed.py                      # 200 files of 2-20 s, bundled default model
    python bench/tokenize_speed.py --files 40 --jobs 2  # fewer files on a loaded machine

Generates the files (24 kHz 16-bit mono WAV, lengths uniform in 2-20 s, seeded) in a
temporary folder, then runs, each in its own child process so that its peak RSS
(``os.wait4``: the largest process of its tree) and wall time are its own:

* baseline: one process, for each file ``soundfile.read`` then
  ``EncodecModel.encode(whole file)``, codes kept in a list (what one-off scripts do);
* ``ecdc tokenize -r DIR -o OUT -j N`` (sharded layout), for each ``-j`` asked for.

The baseline runs with ``--threads`` and with 1 thread (on a machine whose cores are busy
with other work, one thread per process is often much faster: the LSTM's threads wait on
each other), and the ratio is to the faster of the two.

Prints hours of audio per hour of wall time for each, the ratio to the baseline, peak
RSS, and whether every file's codes are identical between the two.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RATE = 24000

_BASELINE = r"""
import sys, numpy as np, soundfile, torch
from pathlib import Path
import ecdc
codec = ecdc.load_model(sys.argv[3] or None, device="cpu")
model = codec.model
out = {}
with torch.inference_mode():
    for path in sorted(Path(sys.argv[1]).rglob("*.wav")):
        wav, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        assert rate == model.sample_rate and wav.shape[1] == model.channels
        x = torch.from_numpy(np.ascontiguousarray(wav.T))[None]
        segments = model.encode(x, float(sys.argv[4]))
        codes = torch.cat([s.codes[0] for s in segments], dim=-1).numpy().astype(np.int16)
        out[path.relative_to(sys.argv[1]).as_posix()] = codes
np.savez(sys.argv[2], **{k.replace("/", "|"): v for k, v in out.items()})
"""


def make_files(folder: Path, count: int, seed: int) -> float:
    """``count`` WAVs of 2-20 s of speech-like audio; returns their total seconds."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(count):
        seconds = float(rng.uniform(2.0, 20.0))
        t = np.arange(int(seconds * RATE)) / RATE
        f0 = rng.uniform(90, 250) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
        phase = 2 * np.pi * np.cumsum(f0) / RATE
        wav = sum(0.25 / k * np.sin(k * phase) for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
        wav = wav + 0.01 * rng.standard_normal(t.shape)
        sub = folder / f"spk{i % 10:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(sub / f"utt{i:04d}.wav"), wav.astype(np.float32), RATE, subtype="PCM_16")
        total += len(t) / RATE
    return total


def _tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and all its descendants now (from /proc), in MiB."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(name)] = int(fields[1])
        rss[int(name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(pid, 0) for pid in tree) / 2 ** 20


def run_child(args: list[str], threads: int) -> tuple[float, float, float, int]:
    """(wall seconds, peak RSS of its largest process, peak RSS of its whole process tree
    (sampled every 0.1 s), both in MiB, exit status) of one child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    tree_peak = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, _tree_rss_mib(proc.pid))
        time.sleep(0.1)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, tree_peak, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="-j values to run tokenize with")
    parser.add_argument("--model", default="", help="model name or checkpoint (default: ecdc's bundled default)")
    parser.add_argument("--bandwidth", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS of each run (tokenize -j N shares them among its workers)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ecdc-bench-tok-") as tmp:
        data = Path(tmp) / "data"
        seconds = make_files(data, args.files, args.seed)
        print(f"{args.files} files, {seconds / 3600:.3f} h of audio ({seconds / args.files:.1f} s mean), "
              f"{args.threads} threads, -b {args.bandwidth:g}")
        print(f"{'run':<34} {'wall s':>7} {'h audio/h':>9} {'ratio':>6} {'RSS MiB':>8} {'tree MiB':>8} codes")
        baseline: dict = {}
        base_rate = 0.0
        for threads in sorted({args.threads, 1}, reverse=True):
            out_npz = Path(tmp) / f"baseline-{threads}.npz"
            wall, rss, tree, status = run_child([sys.executable, "-c", _BASELINE, str(data), str(out_npz),
                                                 args.model, str(args.bandwidth)], threads)
            if status != 0:
                return status
            base_rate = max(base_rate, seconds / wall)
            with np.load(out_npz) as saved:
                baseline = {k.replace("|", "/"): saved[k] for k in saved.files}
            print(f"{f'model.encode loop, {threads} thread(s)':<34} {wall:7.1f} {seconds / wall:9.1f} {'':>6} "
                  f"{rss:8.0f} {tree:8.0f} -")
        from ecdc.dataset import TokenDataset

        for jobs in args.jobs:
            out = Path(tmp) / f"tok-j{jobs}"
            model = ["--model", args.model] if args.model else []
            # -j 1 runs in one process with OMP_NUM_THREADS threads; -j N gives each worker its share.
            threads = 1 if jobs == 1 else args.threads
            wall, rss, tree, status = run_child([sys.executable, "-m", "ecdc", "tokenize", "-r", str(data), "-o",
                                                 str(out), "-j", str(jobs), "-q", "-b", str(args.bandwidth),
                                                 "--device", "cpu", *model], threads)
            if status != 0:
                return status
            data_set = TokenDataset(out)
            equal = sum(np.array_equal(np.asarray(codes), baseline[path]) for path, codes in data_set)
            label = f"ecdc tokenize -j {jobs}" + (", 1 thread" if jobs == 1 else "")
            print(f"{label:<34} {wall:7.1f} {seconds / wall:9.1f} {seconds / wall / base_rate:6.2f} {rss:8.0f} "
                  f"{tree:8.0f} {equal}/{len(baseline)} identical")
        print("ratio: to the faster model.encode loop; RSS: the largest process; tree: all its processes together")
    return 0


if __name__ == "__main__":
    sys.exit(main())
