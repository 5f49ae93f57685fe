"""Inference speed of ecdc against Meta's reference EnCodec, and peak memory of the CLI.

    python bench/speed.py               # full run (about 20-30 min on 2 cores)
    python bench/speed.py --quick       # no 3-minute clips, no 60-minute RSS run
    python bench/speed.py --reps 3 --api model

Both sides use the same weights: the official architectures with seeded random weights and
realistic codebooks (``tests/refstub.make_reference_model``, needs ``encodec==0.1.1``
installed with --no-deps), loaded into ecdc's ``EncodecModel`` with ``strict=True``. Each
case times the reference and ecdc alternately in one process (the order swaps every
repetition), so machine noise hits both alike, and prints median real-time factors (seconds
of compute per second of audio; lower is faster) and their ratio (reference / ecdc; above
1 means ecdc is faster), for compress (audio -> codes) and decompress (codes -> audio), and
the median of the per-repetition ratios ("paired"), which slow phases of a shared machine
move less.
Clips shorter than a minute get three times the repetitions of the long ones: they are
cheap, and on a shared machine a single slow repetition moves a median of few.
Every case checks that ecdc's codes are identical to the reference's.

ecdc's side (``--api``):

* ``codec`` (default): ``ecdc.codec.Codec.encode`` / ``.decode``, the library's real path
  (block-wise streaming engine, container chunks, resampler no-ops included);
* ``streaming``: ``ecdc.models.streaming.StreamingEncoder`` / ``StreamingDecoder`` directly;
* ``model``: ``EncodecModel.encode`` / ``.decode`` on the whole clip, like the reference.

The memory part runs ``python -m ecdc compress`` and ``decompress`` on generated 24 kHz
WAV files (1, 10 and 60 minutes, in a temporary directory) with a checkpoint of the
official 24 kHz architecture, and reports each child's peak RSS (``os.wait4``) and wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ecdc.models import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecModel  # noqa: E402

from refstub import install_torchaudio_stub, make_reference_model, make_test_audio  # noqa: E402

CONFIGS = {"encodec_24khz": ENCODEC_24KHZ, "encodec_48khz": ENCODEC_48KHZ}
SEED = 1234


@dataclass
class Case:
    model: str
    bandwidth: float
    seconds: float
    long: bool = False  # skipped by --quick

    @property
    def label(self) -> str:
        rate = CONFIGS[self.model].sample_rate // 1000
        dur = f"{self.seconds / 60:g}min" if self.seconds >= 60 else f"{self.seconds:g}s"
        return f"{rate}kHz {self.bandwidth:g}kbps {dur}"


CASES = [
    Case("encodec_24khz", 6.0, 10),
    Case("encodec_24khz", 24.0, 10),
    Case("encodec_24khz", 6.0, 180, long=True),
    Case("encodec_24khz", 24.0, 180, long=True),
    Case("encodec_48khz", 6.0, 30),
]


@dataclass
class Result:
    case: Case
    times: dict = field(default_factory=lambda: {k: [] for k in ("ref_enc", "ecdc_enc", "ref_dec", "ecdc_dec")})
    codes_identical: bool = True
    max_audio_diff: float = 0.0

    def rtf(self, key: str) -> float:
        return statistics.median(self.times[key]) / self.case.seconds

    def paired_ratio(self, direction: str) -> float:
        """Median over repetitions of reference / ecdc time within each repetition: the two
        sides of one repetition run seconds apart, so a slow phase of a shared machine
        slows both and cancels out, where it can move a median of either side alone."""
        ref, ours = self.times[f"ref_{direction}"], self.times[f"ecdc_{direction}"]
        return statistics.median(r / o for r, o in zip(ref, ours))


# --------------------------------------------------------------------------- ecdc sides


class EcdcSide:
    """ecdc's compress / decompress for one model through the chosen API."""

    def __init__(self, model: EncodecModel, api: str) -> None:
        self.model = model
        self.api = api
        if api == "codec":
            from ecdc.codec import Codec

            self.codec = Codec(model, bytes(16), "cpu")

    def compress(self, wav: torch.Tensor, bandwidth: float):
        """wav [1, C, T] -> whatever decompress takes, plus codes for the check."""
        if self.api == "codec":
            encoded = self.codec.encode(wav[0].numpy(), self.model.sample_rate, bandwidth)
            return encoded
        if self.api == "streaming":
            from ecdc.models.streaming import StreamingEncoder

            enc = StreamingEncoder(self.model, self.model.num_codebooks(bandwidth))
            segments = enc.push(wav)
            segments += enc.flush()
            return segments
        return self.model.encode(wav, bandwidth)

    def decompress(self, encoded) -> torch.Tensor:
        if self.api == "codec":
            out, _ = self.codec.decode(encoded)
            return torch.from_numpy(np.asarray(out))[None]
        if self.api == "streaming":
            from ecdc.models.streaming import StreamingDecoder

            dec = StreamingDecoder(self.model)
            pieces = [dec.push(s) for s in encoded] + [dec.flush()]
            return torch.cat(pieces, dim=-1)
        return self.model.decode(encoded)

    def codes(self, encoded) -> list[torch.Tensor]:
        """Codes per segment (segmented models) or one [B, K, F] run (others)."""
        if self.api == "codec":
            runs = [torch.from_numpy(c.codes.astype(np.int64)) for c in encoded.chunks]
        else:
            runs = [s.codes for s in encoded]
        if self.model.segment_length is None:
            return [torch.cat(runs, dim=-1)]
        return runs


def reference_codes(frames, segmented: bool) -> list[torch.Tensor]:
    runs = [codes for codes, _ in frames]
    return runs if segmented else [torch.cat(runs, dim=-1)]


# --------------------------------------------------------------------------- speed


def run_case(case: Case, ref, ours: EcdcSide, reps: int) -> Result:
    cfg = CONFIGS[case.model]
    if case.seconds < 60:
        reps *= 3
    wav = make_test_audio(cfg.sample_rate, cfg.channels, int(case.seconds * cfg.sample_rate), seed=11)
    ref.set_target_bandwidth(case.bandwidth)
    res = Result(case)
    clock = time.perf_counter
    for rep in range(reps):
        order = ("ref", "ecdc") if rep % 2 == 0 else ("ecdc", "ref")
        outputs = {}
        for side in order:  # compress, alternately
            with torch.inference_mode():
                t0 = clock()
                enc = ref.encode(wav) if side == "ref" else ours.compress(wav, case.bandwidth)
                res.times[f"{side}_enc"].append(clock() - t0)
            outputs[side] = enc
        for side in order:  # decompress, alternately
            with torch.inference_mode():
                t0 = clock()
                audio = ref.decode(outputs["ref"]) if side == "ref" else ours.decompress(outputs["ecdc"])
                res.times[f"{side}_dec"].append(clock() - t0)
            outputs[side + "_audio"] = audio
        mine = ours.codes(outputs["ecdc"])
        theirs = reference_codes(outputs["ref"], cfg.segment is not None)
        same = len(mine) == len(theirs) and all(
            a.shape == b.shape and torch.equal(a.to(torch.int64), b) for a, b in zip(mine, theirs))
        res.codes_identical &= same
        n = wav.shape[-1]
        a, b = outputs["ecdc_audio"][..., :n], outputs["ref_audio"][..., :n]
        if a.shape == b.shape:
            res.max_audio_diff = max(res.max_audio_diff, (a - b).abs().max().item())
        else:
            res.max_audio_diff = float("nan")
    return res


def print_speed_table(results: list[Result]) -> None:
    head = (f"{'case':<22} {'compress s/s':>14} {'':>7} {'':>7} {'':>7}   {'decompress s/s':>14} {'':>7} "
            f"{'':>7} {'':>7}  {'codes':<10} {'max|audio diff|':>15}")
    sub = (f"{'':<22} {'reference':>14} {'ecdc':>7} {'ratio':>7} {'paired':>7}   {'reference':>14} {'ecdc':>7} "
           f"{'ratio':>7} {'paired':>7}")
    print(head)
    print(sub)
    for r in results:
        enc_ratio = r.rtf("ref_enc") / r.rtf("ecdc_enc")
        dec_ratio = r.rtf("ref_dec") / r.rtf("ecdc_dec")
        print(f"{r.case.label:<22} {r.rtf('ref_enc'):>14.4f} {r.rtf('ecdc_enc'):>7.4f} {enc_ratio:>6.2f}x"
              f" {r.paired_ratio('enc'):>6.2f}x"
              f"   {r.rtf('ref_dec'):>14.4f} {r.rtf('ecdc_dec'):>7.4f} {dec_ratio:>6.2f}x"
              f" {r.paired_ratio('dec'):>6.2f}x  "
              f"{'identical' if r.codes_identical else 'DIFFERENT':<10} {r.max_audio_diff:>15.2g}")


# --------------------------------------------------------------------------- memory


def write_test_wav(path: Path, minutes: float, rate: int = 24000) -> None:
    """Mono 16-bit WAV of chirps and noise, written block by block (bounded memory)."""
    import soundfile

    rng = np.random.default_rng(0)
    total = int(minutes * 60 * rate)
    block = 60 * rate
    with soundfile.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        for start in range(0, total, block):
            n = min(block, total - start)
            t = (start + np.arange(n)) / rate
            sig = 0.3 * np.sin(2 * np.pi * (200 + 150 * np.sin(2 * np.pi * 0.05 * t)) * t)
            sig += 0.1 * np.sin(2 * np.pi * 1800 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
            sig += 0.03 * rng.standard_normal(n)
            f.write(sig.astype(np.float32))


# Runs the CLI from a small launcher process: a child forked (or vforked) straight from
# this process would report this process's (large) RSS as its own peak, because Linux
# counts the parent's pages shared at fork time in the child's ru_maxrss until exec.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "sys.stderr.write('\\nMAXRSS_KIB %d\\n' % usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


CHILD_ENV: dict[str, str] = {}  # thread settings passed on to the CLI runs


def run_child(args: list[str]) -> tuple[int, float]:
    """Run ``python -m ecdc ARGS``; (its peak RSS in bytes, wall seconds)."""
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "ecdc", *args],
                          cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"ecdc {' '.join(args)} failed ({proc.returncode}): {stderr[-2000:]}")
    kib = int(stderr.rsplit("MAXRSS_KIB", 1)[1].split()[0])  # ru_maxrss is in KiB on Linux
    return kib * 1024, wall


def memory_runs(minutes_list: list[float], bandwidth: float) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ecdc-speed-") as tmp:
        tmpdir = Path(tmp)
        model = EncodecModel(ENCODEC_24KHZ)
        ref = make_reference_model("encodec_24khz", SEED)
        model.load_state_dict(ref.state_dict(), strict=True)
        ckpt = tmpdir / "encodec_24khz_random.th"
        torch.save({"config": ENCODEC_24KHZ.to_dict(), "state_dict": model.state_dict()}, ckpt)
        del ref, model
        for minutes in minutes_list:
            wav = tmpdir / f"in_{minutes:g}min.wav"
            write_test_wav(wav, minutes)
            ecdc_file = tmpdir / f"in_{minutes:g}min.ecdc"
            out = tmpdir / f"out_{minutes:g}min.wav"
            rss_c, wall_c = run_child(["compress", "-q", "-f", "--device", "cpu", "--checkpoint", str(ckpt),
                                          "-b", f"{bandwidth:g}", "-o", str(ecdc_file), str(wav)])
            rss_d, wall_d = run_child(["decompress", "-q", "-f", "--device", "cpu", "--checkpoint", str(ckpt),
                                          "-o", str(out), str(ecdc_file)])
            rows.append((minutes, wav.stat().st_size, rss_c, wall_c, rss_d, wall_d))
            for p in (wav, ecdc_file, out):
                p.unlink(missing_ok=True)
    return rows


def print_memory_table(rows: list[tuple]) -> None:
    mib = 1024 * 1024
    print(f"{'input (24 kHz mono)':<20} {'wav MiB':>8}   {'compress RSS MiB':>16} {'s/s':>7}   "
          f"{'decompress RSS MiB':>18} {'s/s':>7}")
    for minutes, size, rss_c, wall_c, rss_d, wall_d in rows:
        secs = minutes * 60
        print(f"{f'{minutes:g} min':<20} {size / mib:>8.1f}   {rss_c / mib:>16.1f} {wall_c / secs:>7.4f}   "
              f"{rss_d / mib:>18.1f} {wall_d / secs:>7.4f}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 3-minute clips and the 60-minute RSS run")
    parser.add_argument("--reps", type=int, default=5,
                        help="repetitions per long case, three times as many for clips under a minute (default 5)")
    parser.add_argument("--api", choices=("codec", "streaming", "model"), default="codec",
                        help="ecdc entry point timed (default: codec, the library's real path)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--lstm-threads", type=int, default=None,
                        help="threads for ecdc's LSTMs (ecdc.perf; default: same as --threads)")
    parser.add_argument("--no-speed", action="store_true", help="only the memory runs")
    parser.add_argument("--no-memory", action="store_true", help="only the speed runs")
    args = parser.parse_args(argv)

    install_torchaudio_stub()
    from ecdc import perf

    if args.threads or args.lstm_threads:
        perf.configure_threads(args.threads or torch.get_num_threads(), lstm_threads=args.lstm_threads)
    if args.threads:
        CHILD_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.lstm_threads:
        CHILD_ENV["ECDC_LSTM_THREADS"] = str(args.lstm_threads)
    # EncodecModel() applies it anyway; done first so that the reference, timed in this
    # process too, gets the same allocator (the ratios then show the code alone).
    tuned = perf.tune_allocator()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(ecdc LSTM: {perf.lstm_threads() or 'same'}), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}, ecdc API: {args.api}, {args.reps} reps ({3 * args.reps} under a minute), "
          f"seed {SEED}, malloc tuning {'on' if tuned else 'off'} (both sides)")

    if not args.no_speed:
        results = []
        models: dict = {}
        for case in CASES:
            if args.quick and case.long:
                continue
            if case.model not in models:
                ref = make_reference_model(case.model, SEED)
                ours = EncodecModel(CONFIGS[case.model])
                ours.load_state_dict(ref.state_dict(), strict=True)
                models = {case.model: (ref, EcdcSide(ours.eval(), args.api))}  # one model pair at a time
            ref, side = models[case.model]
            results.append(run_case(case, ref, side, args.reps))
            print(f"  done: {case.label}", file=sys.stderr, flush=True)
        print()
        print("Real-time factors (median seconds of compute per second of audio); ratio = reference / ecdc "
              "of those medians; paired = median over repetitions of reference / ecdc")
        print_speed_table(results)

    if not args.no_memory:
        minutes = [1, 10] if args.quick else [1, 10, 60]
        rows = memory_runs(minutes, 6.0)
        print()
        print("Peak RSS of `python -m ecdc` (24 kHz model checkpoint, 6 kbps, CPU), and wall time per audio second"
              + (f" ({' '.join(f'{k}={v}' for k, v in CHILD_ENV.items())})" if CHILD_ENV else ""))
        print_memory_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
