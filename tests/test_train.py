"""``ecdc train``: config handling, quantiser dropout, exact resume, a real tiny run, and DDP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner

from ecdc.cli import main
from ecdc.train.config import ConfigError, TrainConfig, load_config
from ecdc.train.loop import Trainer, TrainingError

from conftest import test_signal


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six 3 s clips of varied harmonic audio (44.1 kHz stereo and 24 kHz mono), one unreadable file."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        rate, channels = (44100, 2) if i % 2 else (24000, 1)
        signal = test_signal(3.0, rate, channels, seed=i) * (0.5 + 0.1 * i)
        soundfile.write(str(root / f"clip{i}.{'flac' if i % 3 == 0 else 'wav'}"), signal.T, rate)
    (root / "broken.wav").write_bytes(b"RIFF not really")
    return root


def tiny_config(corpus: Path, cache: Path, **top) -> TrainConfig:
    raw = {
        "model": "tiny_24khz", "batch_size": 4, "steps": 1000, "log_every": 1, "valid_every": 10_000,
        "checkpoint_every": 10_000, "loss": {"discriminator_filters": 8},
        "data": {"train_folders": [str(corpus)], "valid_fraction": 0.3, "segment_seconds": 0.5,
                 "num_workers": 0, "cache_dir": str(cache), "valid_seconds": 1.0, "valid_items": 4},
    }
    raw.update(top)
    return TrainConfig.from_dict(raw)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "small_24khz"\nbatch_size = 4\n[data]\ntrain_folders = ["a"]\n')
    config = load_config(str(path), ["loss.adversarial=0", "optim.lr=1e-3", 'data.valid_folders=["v"]'])
    assert config.batch_size == 4 and config.loss.adversarial == 0.0 and config.optim.lr == 1e-3
    assert config.data.train_folders == ["a"] and config.data.valid_folders == ["v"]
    assert config.loss.mel == 1.0  # documented default kept
    small = config.model_config()
    assert small.n_filters == 16 and small.lstm_layers == 1 and small.bandwidths == (1.5, 3.0, 6.0, 12.0, 24.0)
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(None, ["batch_sise=3"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["batch_size='many'"])
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig(model="nope").model_config()


def test_quantiser_dropout_and_discriminator_schedule(corpus, tmp_path):
    trainer = Trainer(tiny_config(corpus, tmp_path / "cache"), tmp_path / "run", device="cpu", quiet=True)
    plans = [trainer.step_plan(s) for s in range(300)]
    counts = {n_q for n_q, _ in plans}
    assert counts == set(trainer.bandwidth_codebooks.values())  # every bandwidth gets trained
    share = np.mean([update for _, update in plans])
    assert 0.58 < share < 0.75  # discriminator updated ~2/3 of the steps
    assert plans == [trainer.step_plan(s) for s in range(300)]  # a pure function of the step


def test_resume_reproduces_the_next_steps_exactly(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "cache")
    run = tmp_path / "run"
    first = Trainer(config, run, device="cpu", quiet=True)
    first.train(max_steps=3)  # saves at exit
    shutil.copytree(run, tmp_path / "copy")
    expected = [first.train_step(b) for b, _ in zip(first._batches(), range(2))]

    resumed = Trainer(config, tmp_path / "copy", device="cpu", resume=True, quiet=True)
    assert resumed.step == 3
    got = [resumed.train_step(b) for b, _ in zip(resumed._batches(), range(2))]
    assert got == expected
    assert "discriminator" in "".join(map(str, got + expected))  # the GAN side was exercised too


def test_refuses_to_clobber_or_resume_nothing(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "cache")
    with pytest.raises(TrainingError, match="nothing to resume"):
        Trainer(config, tmp_path / "run", device="cpu", resume=True, quiet=True)
    Trainer(config, tmp_path / "run", device="cpu", quiet=True).train(max_steps=1)
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(config, tmp_path / "run", device="cpu", quiet=True)


def test_tiny_run_learns_and_its_weights_compress(corpus, tmp_path):
    """A few dozen CPU steps through the real CLI: validation mel distance falls."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    overrides = ["model=\"tiny_24khz\"", "batch_size=4", "steps=60", "log_every=10", "valid_every=30",
                 "checkpoint_every=30", "optim.lr=1e-3", "loss.discriminator_filters=8",
                 f"data.train_folders=[\"{corpus}\"]",
                 "data.valid_fraction=0.3", "data.segment_seconds=0.5", "data.num_workers=0",
                 f"data.cache_dir=\"{cache}\"", "data.valid_seconds=1.0", "data.valid_items=4"]
    args = ["train", "-r", str(run), "-q", "--device", "cpu"] + [a for o in overrides for a in ("-s", o)]
    # The same seed gives the same initial weights: the untrained model's validation scores.
    before = Trainer(load_config(None, overrides), tmp_path / "probe", device="cpu", quiet=True).validate()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid"] for r in records if "valid" in r]
    assert len(valid) == 2
    for key in ("mel@6", "mel@24"):
        assert valid[-1][key] < before[key], (key, before[key], valid[-1][key])
    steps = [r for r in records if "audio_s_per_s" in r]
    assert steps[-1]["step"] == 60 and steps[-1]["audio_s_per_s"] > 0

    wav = tmp_path / "x.wav"
    soundfile.write(str(wav), test_signal(1.0, 24000).T, 24000)
    ckpt = run / "model.th"
    assert CliRunner().invoke(main, ["compress", str(wav), "--checkpoint", str(ckpt), "-b", "3"]).exit_code == 0
    result = CliRunner().invoke(main, ["decompress", str(wav.with_suffix(".ecdc")), "-o", str(tmp_path / "y.wav"),
                                       "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_stay_in_sync(corpus, tmp_path):
    """Two gloo ranks on CPU under torchrun: same command, different data, identical weights."""
    run = tmp_path / "run"
    import ecdc

    source_root = str(Path(ecdc.__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "ecdc", "train", "-r", str(run), "-q", "--device", "cpu",
           "-s", "model=\"tiny_24khz\"", "-s", "batch_size=2", "-s", "steps=6", "-s", "checkpoint_every=3",
           "-s", f"data.train_folders=[\"{corpus}\"]", "-s", "data.segment_seconds=0.5",
           "-s", "data.num_workers=0", "-s", f"data.cache_dir=\"{tmp_path / 'cache'}\"",
           "-s", "data.valid_fraction=0.3", "-s", "valid_every=1000", "-s", "loss.discriminator_filters=8"]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    digests = [r["rank_digests"] for r in records if "rank_digests" in r]
    assert [len(d) for d in digests] == [2, 2]  # checked at steps 3 and 6
    assert all(len(set(d)) == 1 for d in digests)
    assert (run / "model.th").is_file()


def test_weighted_quantiser_dropout(corpus, tmp_path):
    """bandwidth_weights sets how often each bandwidth is trained (the shipped recipe favours 6 kbps)."""
    config = tiny_config(corpus, tmp_path / "cache", bandwidth_weights=[1.0, 1.0, 4.0, 1.0, 1.0])
    trainer = Trainer(config, tmp_path / "run", device="cpu", quiet=True)
    plans = [trainer.step_plan(s)[0] for s in range(2000)]
    share_6k = np.mean([n_q == trainer.bandwidth_codebooks[6.0] for n_q in plans])
    assert 0.5 < share_6k < 0.64  # 4/8
    assert set(plans) == set(trainer.bandwidth_codebooks.values())


def test_generator_ema_is_what_gets_exported_and_resumes(corpus, tmp_path):
    from ecdc.weights import load_weights

    config = tiny_config(corpus, tmp_path / "cache", ema_decay=0.9, dead_code_threshold=0.25)
    run = tmp_path / "run"
    trainer = Trainer(config, run, device="cpu", quiet=True)
    assert {m.threshold_ema_dead_code for m in trainer.model.modules()
            if hasattr(m, "threshold_ema_dead_code")} == {0.25}
    trainer.train(max_steps=4)
    live = dict(trainer.model.named_parameters())
    exported, _ = load_weights(checkpoint=str(run / "model.th"))
    for name, p in exported.named_parameters():
        assert torch.equal(p, trainer.ema.params[name]), name
    assert any(not torch.equal(trainer.ema.params[n], live[n].detach()) for n in live)  # a real average
    # Buffers (the codebooks) are the live ones.
    for name, b in exported.named_buffers():
        assert torch.equal(b, dict(trainer.model.named_buffers())[name]), name
    resumed = Trainer(config, run, device="cpu", resume=True, quiet=True)
    for name in live:
        assert torch.equal(resumed.ema.params[name], trainer.ema.params[name]), name


def test_fan_in_init_keeps_the_output_dependent_on_the_input():
    """torch's default conv init drowns the input in biases through ~30 layers (the cause of
    the 1,000-step dead start); the training init keeps it there."""
    from ecdc.models.encodec import EncodecModel
    from ecdc.train.config import MODEL_PRESETS
    from ecdc.train.init import init_for_training

    x = torch.randn(2, 1, 24000, generator=torch.Generator().manual_seed(0)) * 0.1

    def input_dependence(scheme: str) -> float:
        torch.manual_seed(0)
        model = EncodecModel(MODEL_PRESETS["small_24khz"])
        init_for_training(model, scheme)
        with torch.no_grad():
            y = model.decoder(model.encoder(x))
            y0 = model.decoder(model.encoder(torch.zeros_like(x)))
        return float((y - y0).std() / y0.std().clamp_min(1e-12))

    assert input_dependence("fan_in") > 10 * input_dependence("torch")
    with pytest.raises(ValueError, match="unknown init"):
        init_for_training(EncodecModel(MODEL_PRESETS["tiny_24khz"]), "xavier")
