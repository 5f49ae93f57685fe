"""Hugging Face ``transformers`` EncodecModel checkpoints: their config, their names, their cache.

A snapshot such as ``facebook/encodec_24khz`` is a directory holding ``config.json`` (the
fields of transformers' ``EncodecConfig``) and ``model.safetensors`` or
``pytorch_model.bin``. ecdc reads it as it is, without transformers: the config's fields
become an :class:`~ecdc.models.EncodecConfig` (:func:`config_from_hf`; the defaults of a
field the file leaves out are transformers' own), and the parameter names become Meta's
(:func:`meta_state_dict`), the names ecdc's networks use. The fingerprint is then computed
on those names, so Meta's weights and their transformers conversion have the same one and a
file compressed with one decodes with the other.

``hf:facebook/encodec_32khz`` names a snapshot in the local Hugging Face cache
(:func:`hub_cache_dir`, :func:`snapshot_dir`); nothing is ever downloaded: with no network
in the picture, a snapshot that is not there is an error saying where ecdc looked.

Untrusted input like every checkpoint: safetensors files hold no code, ``.bin`` files are
loaded with ``weights_only=True``, ``config.json`` is read size-limited, and every field is
checked (by name) before anything is built.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import _load_checkpoint_file, model_layout
from .errors import WeightsError
from .messages import first_line
from .models.encodec import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ, EncodecConfig

__all__ = [
    "HF_PREFIX", "CONFIG_FILE", "SAFETENSORS_FILE", "BIN_FILE", "KNOWN_REPOS",
    "is_hf_name", "is_hf_dir", "hub_cache_dir", "snapshot_dir", "cached_snapshots",
    "config_from_hf", "read_hf_config", "load_hf_state_dict", "meta_state_dict", "load_hf_checkpoint",
]

#: ``--model hf:OWNER/NAME`` names a snapshot in the local Hugging Face cache.
HF_PREFIX = "hf:"
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
#: config.json files are a few hundred bytes; more is not a config.
MAX_CONFIG_BYTES = 1 << 20
#: At most this many repositories of the cache are looked at when listing it.
MAX_LISTED_REPOS = 1000

#: The architectures of the published snapshots: a snapshot with one of them gets its name
#: (so its files are interchangeable with Meta's checkpoints of the same weights).
KNOWN_REPOS: dict[str, EncodecConfig] = {
    "facebook/encodec_24khz": ENCODEC_24KHZ,
    "facebook/encodec_48khz": ENCODEC_48KHZ,
    "facebook/encodec_32khz": ENCODEC_32KHZ,
}

# transformers' EncodecConfig defaults (configuration_encodec.py), for fields a file omits.
_HF_DEFAULTS: dict[str, Any] = {
    "target_bandwidths": [1.5, 3.0, 6.0, 12.0, 24.0], "sampling_rate": 24_000, "audio_channels": 1,
    "normalize": False, "chunk_length_s": None, "overlap": None, "hidden_size": 128, "num_filters": 32,
    "num_residual_layers": 1, "upsampling_ratios": [8, 5, 4, 2], "norm_type": "weight_norm",
    "kernel_size": 7, "last_kernel_size": 7, "residual_kernel_size": 3, "dilation_growth_rate": 2,
    "use_causal_conv": True, "pad_mode": "reflect", "compress": 2, "num_lstm_layers": 2,
    "trim_right_ratio": 1.0, "codebook_size": 1024, "codebook_dim": None, "use_conv_shortcut": True,
}
# Fields whose value ecdc's networks fix (ecdc.models.seanet): any other value is refused.
_FIXED = {"kernel_size": 7, "last_kernel_size": 7, "residual_kernel_size": 3, "dilation_growth_rate": 2,
          "compress": 2, "pad_mode": "reflect", "trim_right_ratio": 1.0}


def is_hf_name(name: str | None) -> bool:
    """Whether ``name`` is an ``hf:OWNER/NAME`` model name."""
    return name is not None and name.startswith(HF_PREFIX)


def is_hf_dir(path: Path) -> bool:
    """Whether ``path`` is a directory laid out like a transformers checkpoint (has config.json)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "huggingface" / "hub"


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[0-9A-Za-z._-]{1,100}")


def _repo_id(name: str) -> str:
    repo = name[len(HF_PREFIX):] if is_hf_name(name) else name
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise WeightsError(f"{name!r} is not a Hugging Face model name (hf:OWNER/NAME, e.g. "
                           "hf:facebook/encodec_24khz)", where="")
    return repo


def snapshot_dir(name: str, cache: Path | None = None) -> Path:
    """The snapshot directory of ``hf:OWNER/NAME`` in the local cache, never downloaded:
    ``models--OWNER--NAME/snapshots/<revision>``, the revision ``refs/main`` names (or the
    only snapshot there is, when the cache has no ``refs/main``)."""
    repo = _repo_id(name)
    cache = Path(cache) if cache is not None else hub_cache_dir()
    folder = cache / ("models--" + repo.replace("/", "--"))
    missing = (f"{repo} is not in the local Hugging Face cache ({cache}); ecdc never downloads it: "
               f"fetch it where there is network (huggingface-cli download {repo}) or pass its directory "
               "with --checkpoint DIR")
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        raise WeightsError(missing, where="")
    ref = folder / "refs" / "main"
    if ref.is_file():
        try:
            revision = ref.read_text(encoding="ascii", errors="replace")[:200].strip()
        except OSError as exc:
            raise WeightsError(f"cannot read {ref}: {exc.strerror or exc}", where="") from None
        if not _REVISION.fullmatch(revision) or revision in (".", ".."):
            raise WeightsError(f"{ref} names no revision", where="")
        found = snapshots / revision
        if not found.is_dir():
            raise WeightsError(f"the cache's refs/main names revision {revision}, which is not in {snapshots}",
                               where="")
        return found
    try:
        revisions = sorted(entry.name for entry in os.scandir(snapshots) if entry.is_dir())
    except OSError as exc:
        raise WeightsError(f"cannot read {snapshots}: {exc.strerror or exc}", where="") from None
    if len(revisions) != 1:
        raise WeightsError(missing if not revisions else
                           f"{snapshots} holds {len(revisions)} revisions and no refs/main says which: "
                           "pass one with --checkpoint DIR", where="")
    return snapshots / revisions[0]


def cached_snapshots(cache: Path | None = None) -> Iterator[tuple[str, Path, EncodecConfig]]:
    """``(hf:OWNER/NAME, snapshot, config)`` for every EncodecModel snapshot in the local
    cache (what ``ecdc models`` lists); repositories of other kinds, or unreadable, are skipped."""
    cache = Path(cache) if cache is not None else hub_cache_dir()
    try:
        names = sorted(entry.name for entry in os.scandir(cache) if entry.name.startswith("models--"))
    except OSError:
        return
    for folder in names[:MAX_LISTED_REPOS]:
        parts = folder[len("models--"):].split("--")
        if len(parts) != 2:
            continue
        name = HF_PREFIX + "/".join(parts)
        try:
            snapshot = snapshot_dir(name, cache)
            raw = _read_json(snapshot / CONFIG_FILE)
            if not isinstance(raw, Mapping) or raw.get("model_type") != "encodec":
                continue
            config = config_from_hf(raw, str(snapshot), name=_name_for(name))
        except WeightsError:
            continue
        yield name, snapshot, config


def _name_for(repo: str) -> str:
    """The model name a snapshot's files record: the published architecture's for the
    official repositories (checked against the config), else the repository's own name."""
    repo = repo[len(HF_PREFIX):] if is_hf_name(repo) else repo
    return repo.rsplit("/", 1)[-1][:64] or "hf_encodec"


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise WeightsError(f"cannot read it: {exc.strerror or exc}", where=path) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise WeightsError(f"over {MAX_CONFIG_BYTES} bytes: not a model config", where=path)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise WeightsError(f"not valid JSON ({first_line(exc)[:120]})", where=path) from None


def read_hf_config(directory: Path, name: str | None = None) -> EncodecConfig:
    """The :class:`EncodecConfig` of a transformers checkpoint directory's config.json."""
    path = directory / CONFIG_FILE
    if name is None:  # a snapshot's own folder is named by its revision: use its repository's name
        repo = directory.resolve().parent.parent.name if directory.resolve().parent.name == "snapshots" else ""
        name = _name_for(repo.split("--")[-1] if repo.startswith("models--") else directory.resolve().name)
    return config_from_hf(_read_json(path), str(path), name=name)


def config_from_hf(raw: Any, source: str, name: str = "hf_encodec") -> EncodecConfig:
    """transformers' ``EncodecConfig`` fields (a config.json) as ecdc's config.

    A config with the architecture of a published model (everything but the name equal)
    gets that model's name, so Meta's weights and their conversion write the same header;
    any other gets ``name``. Fields ecdc's networks cannot build (another kernel size, a
    codebook dimension other than the latent's) are refused, naming the field.
    """
    if not isinstance(raw, Mapping):
        raise WeightsError("config.json is not a JSON object", where=source)
    model_type = raw.get("model_type", "encodec")
    if model_type != "encodec":
        raise WeightsError(f"config.json is for a {str(model_type)[:40]!r} model, not an EncodecModel", where=source)
    field = {key: raw.get(key, default) for key, default in _HF_DEFAULTS.items()}
    for key, wanted in _FIXED.items():
        if field[key] != wanted:
            raise WeightsError(f"config.json's {key} is {str(field[key])[:40]}; ecdc builds only {wanted!r}",
                               where=source)
    if field["codebook_dim"] is not None and field["codebook_dim"] != field["hidden_size"]:
        raise WeightsError(f"config.json's codebook_dim ({str(field['codebook_dim'])[:20]}) differs from its "
                           f"hidden_size ({str(field['hidden_size'])[:20]}); ecdc has no projection between them",
                           where=source)
    segment = field["chunk_length_s"]
    overlap = field["overlap"]
    if segment is not None and overlap is None:
        raise WeightsError("config.json has a chunk_length_s but no overlap", where=source)
    values = dict(
        sample_rate=field["sampling_rate"], channels=field["audio_channels"], causal=field["use_causal_conv"],
        norm=field["norm_type"], bandwidths=field["target_bandwidths"], normalize=field["normalize"],
        segment=segment, overlap=0.01 if overlap is None else overlap, n_filters=field["num_filters"],
        ratios=field["upsampling_ratios"], dimension=field["hidden_size"],
        n_residual_layers=field["num_residual_layers"], lstm_layers=field["num_lstm_layers"],
        codebook_size=field["codebook_size"], conv_shortcut=field["use_conv_shortcut"],
    )
    if segment is None:  # the overlap of an unsegmented model is never used: compare without it
        values["overlap"] = 0.01
    try:
        config = EncodecConfig(name=name, **values)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WeightsError(f"invalid model config: {first_line(exc)[:300]}", where=source) from None
    for known in KNOWN_REPOS.values():
        if _architecture(config) == _architecture(known):
            return known
    return config


def _architecture(config: EncodecConfig) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("name")
    return d


def load_hf_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """The tensors of a transformers checkpoint directory, under transformers' names:
    (tensors, the file, whether memory-mapped). ``model.safetensors`` is preferred (no
    pickle at all); ``pytorch_model.bin`` is loaded weights-only."""
    safetensors_path = directory / SAFETENSORS_FILE
    bin_path = directory / BIN_FILE
    if safetensors_path.is_file():
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise WeightsError("reading model.safetensors needs the safetensors package "
                               "(pip install safetensors)", where=safetensors_path) from None
        try:
            return dict(load_file(str(safetensors_path), device="cpu")), safetensors_path, False
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"not a readable safetensors file ({first_line(exc)[:200]})",
                               where=safetensors_path) from None
    if bin_path.is_file():
        loaded, mapped = _load_checkpoint_file(bin_path)
        if isinstance(loaded, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in loaded.items()):
            return dict(loaded), bin_path, mapped
        raise WeightsError("not a state dict of named tensors", where=bin_path)
    if (directory / (SAFETENSORS_FILE + ".index.json")).is_file() or (directory / (BIN_FILE + ".index.json")).is_file():
        raise WeightsError("sharded checkpoints are not supported (EncodecModel snapshots are one file)",
                           where=directory)
    raise WeightsError(f"a transformers checkpoint directory without {SAFETENSORS_FILE} or {BIN_FILE}",
                       where=directory)


# transformers' names -> Meta's: (pattern, replacements tried in order against the layout).
_WEIGHT_NORM = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v",
                "weight_g": "weight_g", "weight_v": "weight_v", "weight": "weight", "bias": "bias"}
_CONV = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.((?:block\.\d+\.|shortcut\.)?)"
                   r"(conv\.(?:parametrizations\.weight\.original[01]|weight_g|weight_v|weight|bias)|"
                   r"norm\.(?:weight|bias))")
_LSTM = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(lstm\.(?:weight|bias)_(?:ih|hh)_l\d+)")
_CODEBOOK = re.compile(r"quantizer\.layers\.(\d+)\.codebook\.(embed|embed_avg|cluster_size|inited)")


def _meta_candidates(key: str) -> list[str] | None:
    """The Meta names a transformers key may stand for (None if it is none of its keys)."""
    match = _CONV.fullmatch(key)
    if match is not None:
        net, index, inner, param = match.groups()
        head = f"{net}.model.{index}.{inner}"
        kind, rest = param.split(".", 1)
        if kind == "norm":
            return [f"{head}conv.norm.{rest}", f"{head}convtr.norm.{rest}"]
        leaf = _WEIGHT_NORM[rest]
        return [f"{head}conv.conv.{leaf}", f"{head}convtr.convtr.{leaf}"]
    match = _LSTM.fullmatch(key)
    if match is not None:
        return [f"{match.group(1)}.model.{match.group(2)}.{match.group(3)}"]
    match = _CODEBOOK.fullmatch(key)
    if match is not None:
        return [f"quantizer.vq.layers.{match.group(1)}._codebook.{match.group(2)}"]
    return None


def meta_state_dict(state_dict: Mapping[str, torch.Tensor], config: EncodecConfig,
                    source: str) -> dict[str, torch.Tensor]:
    """A transformers EncodecModel state dict under Meta's parameter names (those of
    ``config``'s layout), the tensors themselves unchanged: weight-norm's
    ``parametrizations.weight.original0/1`` (newer transformers) and ``weight_g/weight_v``
    (older) both become ``weight_g/weight_v``, whose values they are."""
    layout = model_layout(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        candidates = _meta_candidates(key)
        if candidates is None:
            raise WeightsError(f"{key[:120]!r} is not a parameter of a transformers EncodecModel", where=source)
        target = next((c for c in candidates if c in layout), None)
        if target is None:
            raise WeightsError(f"{key[:120]!r} has no place in model {config.name!r} "
                               "(config.json does not describe these weights)", where=source)
        if target in out:
            raise WeightsError(f"{key[:120]!r} is stored twice (under both weight-norm namings)", where=source)
        out[target] = tensor
    return out


def load_hf_checkpoint(directory: Path, name: str | None = None
                       ) -> tuple[EncodecConfig, dict[str, torch.Tensor], Path, bool]:
    """(config, state dict under Meta's names, the weights file, whether memory-mapped) of a
    transformers checkpoint directory."""
    config = read_hf_config(directory, name)
    state_dict, path, mapped = load_hf_state_dict(directory)
    return config, meta_state_dict(state_dict, config, str(path)), path, mapped
