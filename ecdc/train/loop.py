"""The EnCodec training loop: one process, one GPU, or many under ``torchrun``.

Every step: draw the number of codebooks (quantiser dropout), reconstruct a batch of
crops, backpropagate the balanced reconstruction + adversarial losses and the commitment
loss through the codec, then (with probability ``discriminator_prob``) update the
multi-scale STFT discriminator with the hinge loss.

A run directory holds ``config.json``, ``checkpoint.pt`` (everything needed to continue
exactly: weights, optimisers, balancer, step, RNG states), ``model.th`` (inference weights
in the layout ``ecdc compress --checkpoint`` loads), ``discriminator.th`` and
``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..devices import resolve_device
from ..errors import EcdcError
from ..models.encodec import EncodecModel
from ..outputs import atomic_output
from ..weights import checkpoint_payload
from .balancer import Balancer
from .config import TrainConfig, dump_config
from .data import (
    AudioCache,
    CropDataset,
    ValidationSet,
    find_audio_files,
    folder_groups,
    make_train_loader,
    split_files,
)
from .discriminator import MultiScaleSTFTDiscriminator
from .init import init_for_training
from .losses import (
    MultiScaleMelLoss,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    time_l1,
)
from .metrics import mel_distance, si_sdr

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.th"
DISCRIMINATOR_FILE = "discriminator.th"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


class TrainingError(EcdcError):
    """A run cannot start or continue (bad run directory, mismatched config, no data)."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str) -> Distributed:
    """Join the process group torchrun describes in the environment (no-op without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local_rank)


def _step_generator(seed: int, step: int) -> torch.Generator:
    """Decisions that must agree across ranks and survive a resume derive from (seed, step)."""
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _rng_state() -> dict[str, Any]:
    """torch's generators: the only global randomness a step uses (k-means, dead codes, init).

    Data, quantiser dropout and the discriminator schedule are seeded by index and step.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def parameters_digest(*modules: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer: equal on all ranks iff they are in sync."""
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class GeneratorEMA:
    """Exponential moving average of a model's parameters (audiocraft's 0.99 recipe).

    Only parameters are averaged and stored; :meth:`model` returns a copy of the live model
    with the averaged parameters and the live buffers (codebooks and their statistics).
    The average is kept in float32 on the model's device.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise TrainingError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        self._copy: torch.nn.Module | None = None

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def model(self, live: torch.nn.Module) -> torch.nn.Module:
        """``live`` with the averaged parameters (a copy, reused across calls)."""
        import copy

        if self._copy is None:
            self._copy = copy.deepcopy(live)
        self._copy.load_state_dict(live.state_dict())
        for name, p in self._copy.named_parameters():
            p.copy_(self.params[name])
        return self._copy

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def load_state_dict(self, state: dict[str, torch.Tensor], live: torch.nn.Module) -> None:
        for name, p in live.named_parameters():
            source = state.get(name, p.detach())
            self.params[name] = source.detach().float().to(p.device).clone()


class Trainer:
    """Builds everything a run needs from a config and a run directory, then trains."""

    def __init__(self, config: TrainConfig, run_dir: Path, device: str = "auto", resume: bool = False,
                 distributed: Distributed | None = None, quiet: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = distributed or init_distributed(device)
        self.quiet = quiet or not self.dist.is_main
        self.device = self._pick_device(device)
        self.model_config = config.model_config()
        self._check_run_dir(resume)
        torch.manual_seed(config.seed)

        self.model = EncodecModel(self.model_config)
        try:
            init_for_training(self.model, config.init)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        self.model.to(self.device)
        for module in self.model.modules():
            if hasattr(module, "threshold_ema_dead_code"):
                setattr(module, "threshold_ema_dead_code", config.dead_code_threshold)
        # The exported weights: an exponential moving average of the generator's parameters
        # (buffers, i.e. the codebooks, which are averages already, are copied as they are).
        self.ema = GeneratorEMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.disc = MultiScaleSTFTDiscriminator(
            channels=self.model_config.channels, filters=config.loss.discriminator_filters).to(self.device)
        betas = cast("tuple[float, float]", tuple(config.optim.betas))
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.optim.discriminator_lr, betas=betas)
        loss = config.loss
        self.balancer = Balancer({"time": loss.time, "mel": loss.mel, "adversarial": loss.adversarial,
                                  "feature": loss.feature}, ema_decay=loss.balancer_beta)
        self.mel_loss = MultiScaleMelLoss(self.model_config.sample_rate).to(self.device)
        self.step = 0
        if resume:
            self._load_checkpoint()
        # Codebook sizes per bandwidth, for quantiser dropout and per-bandwidth validation.
        self.bandwidth_codebooks = {bw: self.model.num_codebooks(bw) for bw in self.model_config.bandwidths}
        self.ddp_model: torch.nn.Module = self.model
        self.ddp_disc: torch.nn.Module = self.disc
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Codebooks are kept identical by the quantiser's own all-reduce, not by DDP.
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
            self.ddp_disc = DistributedDataParallel(self.disc, device_ids=ids, broadcast_buffers=False)
        self._build_data()
        self._stop_requested = False

    # -- setup ------------------------------------------------------------------------

    def _pick_device(self, device: str) -> torch.device:
        dev = resolve_device(device)
        if dev.type == "cuda" and self.dist.enabled:
            return torch.device("cuda", self.dist.local_rank)
        return dev

    def _check_run_dir(self, resume: bool) -> None:
        checkpoint = self.run_dir / CHECKPOINT
        if resume:
            if not checkpoint.is_file():
                raise TrainingError(f"{self.run_dir}: nothing to resume (no {CHECKPOINT})")
            saved = json.loads((self.run_dir / CONFIG_FILE).read_text())
            if saved.get("model") != self.config.model or saved.get("model_overrides") != self.config.model_overrides:
                raise TrainingError(f"{self.run_dir}: the run was started with another model architecture")
            return
        if checkpoint.exists():
            raise TrainingError(f"{self.run_dir}: a run already exists here; pass --resume to continue it")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(dump_config(self.config))
        self.dist.barrier()

    def _build_data(self) -> None:
        data = self.config.data
        roots = [Path(p) for p in data.train_folders]
        if not roots:
            raise TrainingError("no training data: set data.train_folders")
        files = find_audio_files(roots)
        if data.valid_folders:
            valid_files = find_audio_files([Path(p) for p in data.valid_folders])
            held_out = {f.resolve() for f in valid_files}  # never train on validation audio
            train_files = [f for f in files if f.resolve() not in held_out]
        else:
            train_files, valid_files = split_files(files, roots, data.valid_fraction)
        cache_dir = Path(data.cache_dir).expanduser() if data.cache_dir else \
            Path(os.path.expanduser("~")) / ".cache" / "ecdc" / "audio"
        cfg = self.model_config
        self.cache = AudioCache(cache_dir, cfg.sample_rate, cfg.channels)
        # Rank 0 decodes; the others wait and then find everything cached.
        if self.dist.is_main:
            self.cache.prepare(list(train_files) + list(valid_files), num_workers=max(1, data.num_workers))
        self.dist.barrier()
        # Whatever rank 0 could not decode was skipped (and warned about) there.
        train_files = [f for f in train_files if self.cache.is_cached(f)]
        valid_files = [f for f in valid_files if self.cache.is_cached(f)]
        if not train_files:
            raise TrainingError("no readable training audio in " + ", ".join(map(str, roots)))
        groups = folder_groups(train_files, roots) if data.balance_folders else None
        self.dataset = CropDataset(self.cache, train_files, segment_seconds=data.segment_seconds,
                                   gain_db=cast("tuple[float, float]", tuple(data.gain_db)), seed=self.config.seed,
                                   groups=groups)
        self.valid = ValidationSet(self.cache, valid_files, seconds=data.valid_seconds,
                                   max_items=data.valid_items) if valid_files else None

    # -- one step ---------------------------------------------------------------------

    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step_plan(self, step: int) -> tuple:
        """(number of codebooks, whether the discriminator updates) for ``step``.

        Quantiser dropout draws the codebook count uniformly from the model's bandwidths so
        one model serves all of them. Both draws depend only on (seed, step): every rank
        agrees, and a resumed run makes the same choices.
        """
        gen = _step_generator(self.config.seed, step)
        choices = list(self.bandwidth_codebooks.values())
        weights = self.config.bandwidth_weights
        if weights:
            probs = torch.tensor(weights, dtype=torch.float64)
            n_q = choices[int(torch.multinomial(probs, 1, generator=gen))]
        else:
            n_q = choices[int(torch.randint(len(choices), (1,), generator=gen))]
        update_disc = bool(torch.rand((), generator=gen) < self.config.loss.discriminator_prob)
        return n_q, update_disc

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        """One generator update and maybe one discriminator update; returns the losses."""
        cfg = self.config
        n_q, update_disc = self.step_plan(self.step)
        adversarial = self.step >= cfg.loss.adversarial_warmup
        x = batch.to(self.device, non_blocking=True)

        self.model.train()
        self.disc.train()
        with self._autocast():
            out = self.ddp_model(x, n_q)
        y = out.audio.float()
        losses = {"time": time_l1(y, x), "mel": self.mel_loss(y, x)}
        if adversarial:
            # The generator's view of the discriminator: no DDP hooks, no discriminator grads.
            self.disc.requires_grad_(False)
            with self._autocast():
                fake_logits, fake_fmaps = self.disc(y)
                _, real_fmaps = self.disc(x)
            self.disc.requires_grad_(True)
            losses["adversarial"] = hinge_generator_loss([t.float() for t in fake_logits])
            losses["feature"] = feature_matching_loss(
                [[f.float().detach() for f in fm] for fm in real_fmaps],
                [[f.float() for f in fm] for fm in fake_fmaps])
        self.opt_g.zero_grad(set_to_none=True)
        balanced = {k: v for k, v in losses.items() if k in self.balancer.weights}
        grad = self.balancer.gradient(balanced, y)
        torch.autograd.backward([y, out.commitment_loss * cfg.loss.commitment], [grad, None])
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update(self.model)

        record = {k: float(v.detach()) for k, v in losses.items()}
        record["commitment"] = float(out.commitment_loss.detach())
        record["n_q"] = n_q
        if adversarial and update_disc:
            self.opt_d.zero_grad(set_to_none=True)
            with self._autocast():
                real_logits, _ = self.ddp_disc(x)
                fake_logits, _ = self.ddp_disc(y.detach())
            d_loss = hinge_discriminator_loss([t.float() for t in real_logits], [t.float() for t in fake_logits])
            d_loss.backward()
            self.opt_d.step()
            record["discriminator"] = float(d_loss.detach())
        self.step += 1
        return record

    # -- validation -------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mel distance and SI-SDR of the validation crops at every bandwidth."""
        if self.valid is None:
            return {}
        model = self.exported_model()
        model.eval()
        result: dict[str, float] = {}
        for bandwidth, n_q in self.bandwidth_codebooks.items():
            mels, sdrs = [], []
            for clip in self.valid:
                x = clip.to(self.device)[None]
                y = model(x, n_q).audio.float()
                mels.append(float(mel_distance(x, y, self.model_config.sample_rate)))
                sdrs.append(float(si_sdr(x, y).mean()))
            result[f"mel@{bandwidth:g}"] = float(np.mean(mels))
            result[f"sisdr@{bandwidth:g}"] = float(np.mean(sdrs))
        self.model.train()
        return result

    def exported_model(self) -> EncodecModel:
        """The generator as shipped: the EMA weights when the run keeps them."""
        if self.ema is None:
            return self.model
        return cast(EncodecModel, self.ema.model(self.model))

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "discriminator": self.disc.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "balancer": self.balancer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "rng": _rng_state(),
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
        }

    def save_checkpoint(self) -> None:
        """Write the resumable checkpoint and the exported weights atomically (rank 0 only)."""
        if not self.dist.is_main:
            return
        with atomic_output(self.run_dir / CHECKPOINT) as f:
            torch.save(self.state_dict(), f)
        # With its weights' fingerprint, so a damaged copy is refused when loaded.
        export = checkpoint_payload(self.model_config, self.exported_model().state_dict())
        with atomic_output(self.run_dir / MODEL_FILE) as f:
            torch.save(export, f)
        with atomic_output(self.run_dir / DISCRIMINATOR_FILE) as f:
            torch.save({"state_dict": self.disc.state_dict(), "channels": self.model_config.channels,
                        "filters": self.config.loss.discriminator_filters}, f)
        if self.step in self.config.keep_checkpoints:
            with atomic_output(self.run_dir / f"checkpoint-{self.step}.pt") as f:
                torch.save(self.state_dict(), f)

    def _load_checkpoint(self) -> None:
        try:
            state = torch.load(str(self.run_dir / CHECKPOINT), map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged checkpoint: say which file
            raise TrainingError(f"{self.run_dir / CHECKPOINT}: cannot load ({exc})") from None
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.balancer.load_state_dict(state["balancer"])
        if self.ema is not None:
            # A run that switches the EMA on when resumed starts it from the current weights.
            self.ema.load_state_dict(state.get("ema") or {}, self.model)
        self.step = int(state["step"])
        _set_rng_state(state["rng"])

    # -- the run ------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def request_stop(self, *_: Any) -> None:
        """Signal handler: finish the current step, save, and leave."""
        self._stop_requested = True

    def _batches(self) -> Iterator[torch.Tensor]:
        loader = make_train_loader(self.dataset, self.config.batch_size, rank=self.dist.rank,
                                   world_size=self.dist.world_size, start_step=self.step,
                                   num_workers=self.config.data.num_workers)
        return iter(loader)

    def _sync_digest(self) -> list[str]:
        digest = parameters_digest(self.model, self.disc)
        if not self.dist.enabled:
            return [digest]
        gathered: list[str | None] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, digest)
        return [str(d) for d in gathered]

    def train(self, max_steps: int | None = None, max_minutes: float | None = None) -> dict[str, Any]:
        """Train until ``config.steps`` (or ``max_steps`` more, or ``max_minutes``); always save at exit."""
        cfg = self.config
        last_step = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self.request_stop)
        progress = None
        if not self.quiet:
            from tqdm import tqdm

            progress = tqdm(total=last_step, initial=self.step, unit="step", dynamic_ncols=True)
        samples_per_step = cfg.batch_size * self.dist.world_size * cfg.data.segment_seconds
        window_start, window_steps = time.monotonic(), 0
        last: dict[str, Any] = {}
        batches = self._batches()
        try:
            while self.step < last_step:
                record = self.train_step(next(batches))
                window_steps += 1
                if progress is not None:
                    progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == last_step:
                    elapsed = max(time.monotonic() - window_start, 1e-9)
                    record.update(step=self.step, steps_per_s=window_steps / elapsed,
                                  audio_s_per_s=window_steps * samples_per_step / elapsed)
                    self.log(record)
                    if progress is not None:
                        progress.set_postfix(mel=f"{record['mel']:.3f}", n_q=record["n_q"],
                                             audio_x=f"{record['audio_s_per_s']:.1f}")
                    window_start, window_steps = time.monotonic(), 0
                    last = record
                if self.step % cfg.valid_every == 0 and self.dist.is_main:
                    self.log({"step": self.step, "valid": self.validate()})
                if self.step % cfg.checkpoint_every == 0:
                    self._checkpoint_with_sync_check()
                stop = self._stop_requested or (deadline is not None and time.monotonic() > deadline)
                if self.dist.enabled:
                    flag = torch.tensor([1.0 if stop else 0.0])
                    dist.all_reduce(flag)  # every rank stops at the same step
                    stop = bool(flag.item() > 0)
                if stop:
                    break
        finally:
            if progress is not None:
                progress.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.step % cfg.checkpoint_every != 0:
            self._checkpoint_with_sync_check()
        return last

    def _checkpoint_with_sync_check(self) -> None:
        digests = self._sync_digest()
        if self.dist.enabled:
            self.log({"step": self.step, "rank_digests": digests})
            if len(set(digests)) != 1:
                raise TrainingError(f"ranks diverged at step {self.step}: {digests}")
        self.save_checkpoint()
        self.dist.barrier()
