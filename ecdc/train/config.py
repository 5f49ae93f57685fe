"""Training configuration: documented defaults, TOML files and ``--set key=value`` overrides.

The defaults are the EnCodec paper's recipe; a config file only states what differs.
See ``configs/`` for complete examples and docs/TRAINING.md for every key.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import EcdcError
from ..models.encodec import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older interpreters only
    import tomli as tomllib


class ConfigError(EcdcError):
    """A training config file or override is invalid."""


#: Architectures a config can start from by name; ``model.*`` keys override their fields.
MODEL_PRESETS: dict[str, EncodecConfig] = {
    # Meta's 24 kHz architecture: 32 base channels, 2-layer LSTM, 14.9 M parameters.
    "encodec_24khz": ENCODEC_24KHZ,
    "encodec_48khz": ENCODEC_48KHZ,
    # A CPU-friendly 24 kHz model: half the channels (a quarter of the convolution cost)
    # and one LSTM layer. Same frame rate, codebooks and bandwidths as the official one.
    "small_24khz": dataclasses.replace(ENCODEC_24KHZ, name="small_24khz", n_filters=16, lstm_layers=1),
    # For tests and smoke runs only.
    "tiny_24khz": dataclasses.replace(ENCODEC_24KHZ, name="tiny_24khz", n_filters=4, dimension=32,
                                      lstm_layers=0, codebook_size=256),
}


@dataclass
class DataConfig:
    train_folders: list[str] = field(default_factory=list)  #: folders searched recursively for audio
    valid_folders: list[str] = field(default_factory=list)  #: if empty, a hash split of train_folders
    valid_fraction: float = 0.03        #: share of files held out when valid_folders is empty
    segment_seconds: float = 1.0        #: length of a training crop
    gain_db: tuple[float, float] = (-10.0, 6.0)  #: random gain range applied to crops
    cache_dir: str = ""                 #: decoded-audio cache; "" = ~/.cache/ecdc/audio
    num_workers: int = 2                #: DataLoader worker processes (0 = load in the main process)
    valid_seconds: float = 4.0          #: length of each validation crop
    valid_items: int = 32               #: number of validation crops
    balance_folders: bool = False       #: draw each crop's top folder (speech, music, ...) uniformly first


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.9)
    discriminator_lr: float = 3e-4


@dataclass
class LossConfig:
    time: float = 0.1                   #: λt, time-domain L1 (balanced)
    mel: float = 1.0                    #: λf, multi-scale mel L1+L2 (balanced)
    adversarial: float = 3.0            #: λg, hinge generator loss (balanced)
    feature: float = 3.0                #: λfeat, relative feature matching (balanced)
    commitment: float = 1.0             #: λw, RVQ commitment loss (outside the balancer)
    balancer_beta: float = 0.999        #: EMA decay of the balancer's gradient norms
    discriminator_prob: float = 2 / 3   #: probability of a discriminator update per step (paper, 24 kHz)
    adversarial_warmup: int = 0         #: steps before the adversarial losses start
    discriminator_filters: int = 32


@dataclass
class TrainConfig:
    model: str = "encodec_24khz"        #: a preset from MODEL_PRESETS
    model_overrides: dict[str, Any] = field(default_factory=dict)  #: EncodecConfig fields to change
    name: str = ""                      #: name recorded in exported checkpoints ("" = preset name)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    batch_size: int = 8                 #: per process (per GPU under torchrun)
    steps: int = 300_000                #: total optimiser steps of the run
    seed: int = 0
    amp: bool = False                   #: bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 25
    valid_every: int = 1000
    checkpoint_every: int = 500
    keep_checkpoints: list[int] = field(default_factory=list)  #: steps whose checkpoint is kept as a copy
    #: relative frequency of each model bandwidth in quantiser dropout ([] = uniform)
    bandwidth_weights: list[float] = field(default_factory=list)
    ema_decay: float = 0.0              #: EMA of the generator's weights, exported as model.th (0 = off)
    dead_code_threshold: float = 2.0    #: EMA count under which a code is re-seeded (Meta: 2)
    init: str = "fan_in"                #: conv initialisation: "fan_in" (see ecdc.train.init) or "torch"

    def model_config(self) -> EncodecConfig:
        if self.model not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {self.model!r}; choose one of {', '.join(MODEL_PRESETS)}")
        base = MODEL_PRESETS[self.model].to_dict()
        base.update(self.model_overrides)
        if self.name:
            base["name"] = self.name
        try:
            return EncodecConfig.from_dict(base)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid model settings: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        return _build(cls, raw, "")


def _build(cls, raw: Mapping[str, Any], prefix: str):
    """Instantiate a config dataclass from a mapping, rejecting unknown keys by full name."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key!r}; known: {', '.join(sorted(fields))}")
        factory = fields[key].default_factory  # MISSING (not callable) when the field has none
        default = factory() if callable(factory) else fields[key].default
        if dataclasses.is_dataclass(default):
            values[key] = _build(type(default), value, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, default, f"{prefix}{key}")
    return cls(**values)


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Check a value against the type of its default (ints may stand for floats)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default)
        value = tuple(float(v) for v in value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, Mapping)
        value = dict(value) if ok else value
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config key {name!r} should be like {default!r}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``data.batch_size=16`` -> (["data", "batch_size"], 16); values are TOML literals or bare strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML config (or the defaults) and apply ``KEY=VALUE`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                # A run directory's config.json (written by dump_config) reads back too.
                raw = json.load(f) if str(path).endswith(".json") else tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: invalid {'JSON' if str(path).endswith('.json') else 'TOML'}: {exc}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a table")
        node[keys[-1]] = value
    return TrainConfig.from_dict(raw)


def dump_config(config: TrainConfig) -> str:
    """JSON of the full config (defaults included), stored in every run directory."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)
