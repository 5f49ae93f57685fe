"""The recipe learns: a few CPU minutes from scratch on real audio give a real codec.

A run that does not escape the silent/noise state of a fresh SEANet (what torch's default
initialisation gave: held-out SI-SDR near -45 dB after 1,000 steps) fails here. The audio
is corpus-lite from ``../shared`` (CI has it beside the checkout): a handful of training
files, and held-out files the run never sees.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ecdc.train.config import load_config
from ecdc.train.data import AudioCache, ValidationSet, find_audio_files
from ecdc.train.loop import Trainer
from ecdc.train.metrics import si_sdr
from ecdc.weights import load_weights

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus-lite"
TRAIN_FILES = ["speech/speech_000.opus", "speech/speech_001.opus", "music/music_000.opus",
               "music/music_001.opus", "effects/effects_000.opus"]
VALID_FILES = ["speech/speech_000.opus", "music/music_000.opus"]

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus-lite not found at {CORPUS}")


def _link(files: list, source: Path, target: Path) -> Path:
    for rel in files:
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source / rel, dst)
    return target


def test_small_run_on_real_audio_learns_a_codec(tmp_path):
    train = _link(TRAIN_FILES, CORPUS / "train", tmp_path / "train")
    valid = _link(VALID_FILES, CORPUS / "valid", tmp_path / "valid")
    cache = tmp_path / "cache"
    # The shipped recipe (configs/ecdc_24khz.toml) on a network small enough for minutes.
    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "ecdc_24khz.toml"), [
        'model="tiny_24khz"', "model_overrides.n_filters=8", "batch_size=8", "steps=600", "log_every=50",
        "valid_every=100000", "checkpoint_every=100000", f'data.train_folders=["{train}"]',
        f'data.valid_folders=["{valid}"]', "data.num_workers=0", f'data.cache_dir="{cache}"',
        "data.valid_items=2"])
    trainer = Trainer(config, tmp_path / "run", device="cpu", quiet=True)
    trainer.train()

    model, _ = load_weights(checkpoint=str(tmp_path / "run" / "model.th"))
    model.eval()
    held_out = ValidationSet(AudioCache(cache, 24000, 1), find_audio_files([valid]), seconds=4.0,
                             max_items=8)
    x = torch.stack([held_out[i] for i in range(len(held_out))])
    with torch.no_grad():
        y = model(x, model.max_codebooks).audio
    sdr = float(si_sdr(x, y).mean())
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    correlation = float(((xc * yc).sum(-1) / (xc.norm(dim=-1) * yc.norm(dim=-1))).mean())
    print(f"held-out SI-SDR {sdr:.2f} dB, correlation {correlation:.3f}")  # shown by pytest -rP
    assert sdr > 2.0 and correlation > 0.7, (sdr, correlation)
