"""Training throughput of `ecdc train` per model preset and phase: seconds per step.

    python bench/train_speed.py                       # small_24khz and encodec_24khz, batch 8, CPU
    python bench/train_speed.py --presets small_24khz --filters 32 16 8   # the step-cost table
    python bench/train_speed.py --device cuda --presets encodec_24khz --batch-size 32 --amp

Phases: ``reconstruction`` (time + mel + commitment, no discriminator: the shipped recipe's
first phase) and, for each ``--filters`` value, ``adversarial`` steps with an MS-STFT
discriminator of that many base filters (generator losses through the discriminator plus a
discriminator update forced on every step, the costlier case; the paper's 2/3 schedule
averages slightly less). Generated audio, after warm-up steps that include the codebooks'
k-means initialisation. Pause other work on the cores while it runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ecdc.train.config import TrainConfig  # noqa: E402
from ecdc.train.loop import Trainer  # noqa: E402


def make_corpus(root: Path, seconds: float = 20.0, files: int = 4, rate: int = 24000) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    for i in range(files):
        f0 = 110 * (i + 1) * (1 + 0.05 * np.sin(2 * np.pi * 2 * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        sig = sum(0.2 / k * np.sin(k * phase) for k in range(1, 8)) + 0.02 * rng.standard_normal(t.shape)
        soundfile.write(str(root / f"c{i}.wav"), sig.astype(np.float32), rate)


def measure(preset: str, batch_size: int, steps: int, warmup: int, device: str, amp: bool, root: Path,
            filters: int | None = 32) -> dict:
    """One preset and phase; ``filters=None`` is the reconstruction phase (no discriminator)."""
    loss = {"discriminator_prob": 1.0, "discriminator_filters": filters or 8,
            "adversarial_warmup": 10**9 if filters is None else 0}
    config = TrainConfig.from_dict({
        "model": preset, "batch_size": batch_size, "amp": amp, "log_every": 10**9,
        "valid_every": 10**9, "checkpoint_every": 10**9,
        "loss": loss,
        "data": {"train_folders": [str(root / "audio")], "valid_fraction": 0.0, "num_workers": 2,
                 "cache_dir": str(root / "cache")},
    })
    trainer = Trainer(config, root / f"run-{preset}-{time.time_ns()}", device=device, quiet=True)
    params = sum(p.numel() for p in trainer.model.parameters())
    batches = trainer._batches()
    for _ in range(warmup):
        trainer.train_step(next(batches))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"preset": preset, "params_M": params / 1e6, "steps_per_s": steps / elapsed,
            "phase": "reconstruction" if filters is None else f"adversarial, {filters} filters",
            "audio_s_per_s": steps * batch_size * config.data.segment_seconds / elapsed,
            "device": str(trainer.device), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small_24khz", "encodec_24khz"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--filters", nargs="*", type=int, default=[32],
                        help="discriminator sizes for the adversarial phase (none: reconstruction only)")
    parser.add_argument("--no-reconstruction", action="store_true", help="skip the reconstruction phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "audio").mkdir()
        make_corpus(root / "audio")
        print(f"batch {args.batch_size} x 1 s crops, {args.steps} timed steps after {args.warmup} warm-up")
        phases = ([] if args.no_reconstruction else [None]) + list(args.filters)
        print("| preset | parameters | phase | s/step | audio s/s |\n|---|---:|---|---:|---:|")
        for preset in args.presets:
            for filters in phases:
                r = measure(preset, args.batch_size, args.steps, args.warmup, args.device, args.amp, root,
                            filters)
                print(f"| {r['preset']} | {r['params_M']:.2f} M | {r['phase']} | {1 / r['steps_per_s']:.2f} "
                      f"| {r['audio_s_per_s']:.2f} |", flush=True)
        print(f"({r['device']}, {r['threads']} threads)")


if __name__ == "__main__":
    main()
