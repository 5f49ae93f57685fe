"""What is inside a checkpoint file, and whether it can be used: ecdc never trusts one.

A checkpoint is loaded with ``weights_only=True`` (:func:`_load_checkpoint_file`), so it
can never run code; its layout is checked (:func:`_split_checkpoint`), its config parsed
(:func:`parse_config`) and compared with the state dict's shapes before the model is built
(:func:`check_config_fits`), and its weights are identified by a fingerprint
(:func:`weights_fingerprint`) that ecdc's own checkpoints store and that is checked on load.
A bare state dict's key names and shapes can be compared with an architecture's
(:func:`model_layout`, :func:`compare_layout`), which is how its architecture is recognised.
Nothing here knows model names, the registry or downloads: that is :mod:`ecdc.weights`,
which re-exports these names.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import math
import mmap
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import numpy as np
import torch

from .errors import WeightsError
from .messages import first_line
from .models.encodec import EncodecConfig, EncodecModel


def _load_checkpoint_file(path: Path) -> tuple[Any, bool]:
    """``torch.load`` restricted to tensors and plain containers: never runs pickled code.

    Returns (the object, whether its tensors are memory-mapped from the file). Mapped, the
    weights a process never touches (the other half of the model, training statistics)
    never take memory; files in torch's legacy format are read whole.
    """
    try:
        return _torch_load(path, mmap=True), True
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass  # reported below
    except Exception:  # legacy format, or damaged: the plain load says which
        pass
    try:
        return _torch_load(path, mmap=False), False
    except FileNotFoundError:
        raise WeightsError("no such checkpoint", where=path) from None
    except IsADirectoryError:
        raise WeightsError("is a directory, not a checkpoint", where=path) from None
    except PermissionError:
        raise WeightsError("permission denied", where=path) from None
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        refused = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
        if refused:  # not torch's advice to load with weights_only=False: what it refused
            reason = refused.group(1).split(". ")[0].rstrip(".")
            raise WeightsError(f"not a loadable weights-only checkpoint (torch's weights-only "
                               f"loader refused it: {reason[:200]})", where=path) from None
        raise WeightsError(f"not a loadable weights-only checkpoint ({first_line(exc)[:200]})", where=path) from None


def _torch_load(path: Path, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` with torch's warnings held back: its two-line
    UserWarnings (e.g. "Detected pickle protocol 4") would precede ecdc's one-line report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict | None, Mapping[str, torch.Tensor]]:
    """Accept ecdc's own ``{"config", "state_dict"}`` layout or a bare state dict (Meta's)."""
    if not isinstance(obj, Mapping):
        raise WeightsError("checkpoint is not a state dict", where=path)
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        config = obj.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise WeightsError("checkpoint 'config' is not a mapping", where=path)
        state_dict = obj["state_dict"]
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
            raise WeightsError("checkpoint 'state_dict' holds something other than named tensors", where=path)
        return (dict(config) if config is not None else None), state_dict
    if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return None, obj
    raise WeightsError("checkpoint is neither a state dict nor ecdc's checkpoint layout", where=path)


def parse_config(raw: Any, source: str) -> EncodecConfig:
    """A checkpoint's (untrusted) config as an :class:`EncodecConfig`, or a one-line
    :class:`WeightsError` naming the bad field. Only checks the config on its own; see
    :func:`check_config_fits` for whether it fits the weights."""
    try:
        return EncodecConfig.from_dict(raw)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise WeightsError(f"invalid model config: {exc}", where=source) from None


_LAYER_KEY = re.compile(r"quantizer\.vq\.layers\.(\d+)\._codebook\.embed")
_ENCODER_KEY = re.compile(r"encoder\.model\.(\d+)\.(.*)")
_LSTM_LAYER = re.compile(r"lstm\.weight_ih_l(\d+)")


def check_config_fits(config: EncodecConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse, naming the field, a config that the state dict cannot be the weights of.

    Runs before the model is built, on key names and shapes only (microseconds): the
    config decides how many codebooks and layers get built, the weights do not, so a
    checkpoint must not be able to ask for more than it holds. The strict load after the
    build then compares every tensor.
    """
    def bad(field: str, detail: str) -> WeightsError:
        return WeightsError(f"weights do not fit model {config.name!r}: the config's {field} {detail}", where=source)

    def shape(key: str) -> tuple[int, ...] | None:
        value = state_dict.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    weight = "weight_v" if config.norm == "weight_norm" else "weight"
    convs: list[int] = []  # encoder.model indices holding a plain SConv1d
    lstm_at: dict[int, set] = {}
    for key in state_dict:
        match = _ENCODER_KEY.fullmatch(key)
        if match is None:
            continue
        index, rest = int(match.group(1)), match.group(2)
        if rest == f"conv.conv.{weight}":
            convs.append(index)
        lstm = _LSTM_LAYER.fullmatch(rest)
        if lstm is not None:
            lstm_at.setdefault(index, set()).add(int(lstm.group(1)))
    convs.sort()
    first = shape(f"encoder.model.0.conv.conv.{weight}")
    if not convs or convs[0] != 0 or first is None or len(first) != 3:
        other = "weight" if weight == "weight_v" else "weight_v"
        found = "time_group_norm" if other == "weight" else "weight_norm"
        if shape(f"encoder.model.0.conv.conv.{other}") is not None:
            raise bad("norm", f"is {config.norm}, the weights are {found}'s")
        raise bad("norm", f"is {config.norm}, the weights have no encoder.model.0.conv.conv.{weight}")
    if first[1] != config.channels:
        raise bad("channels", f"is {config.channels}, the weights' first convolution takes {first[1]}")
    if first[0] != config.n_filters:
        raise bad("n_filters", f"is {config.n_filters}, the weights' first convolution makes {first[0]}")
    downsampling = convs[1:-1]
    if len(downsampling) != len(config.ratios):
        raise bad("ratios", f"has {len(config.ratios)} entries, the weights' encoder {len(downsampling)} "
                            "downsampling convolutions")
    step = config.n_residual_layers + 2  # residual blocks, ELU, downsampling convolution
    if downsampling != [step * (i + 1) for i in range(len(downsampling))]:
        raise bad("n_residual_layers", f"is {config.n_residual_layers}, the weights' encoder blocks differ")
    for index, ratio in zip(downsampling, reversed(config.ratios)):
        kernel = shape(f"encoder.model.{index}.conv.conv.{weight}")
        if kernel is None or len(kernel) != 3 or kernel[2] != 2 * ratio:
            raise bad("ratios", f"ask for a stride {ratio} (kernel {2 * ratio}), the weights' encoder has "
                                f"kernel {kernel[2] if kernel and len(kernel) == 3 else '?'}")
    lstm_index = step * len(config.ratios) + 1
    lstm_layers = lstm_at.get(lstm_index, set())
    if sorted(lstm_layers) != list(range(config.lstm_layers)) or set(lstm_at) - {lstm_index}:
        raise bad("lstm_layers", f"is {config.lstm_layers}, the weights' encoder LSTM has {len(lstm_layers)}")
    last = shape(f"encoder.model.{convs[-1]}.conv.conv.{weight}")
    if convs[-1] != lstm_index + (1 if config.lstm_layers else 0) + 1 or last is None or len(last) != 3:
        raise bad("lstm_layers", f"is {config.lstm_layers}, the weights' encoder ends differently")
    if last[0] != config.dimension:
        raise bad("dimension", f"is {config.dimension}, the weights' encoder makes {last[0]}")

    layers = sorted(int(m.group(1)) for m in map(_LAYER_KEY.fullmatch, state_dict) if m is not None)
    if layers != list(range(len(layers))) or not layers:
        raise bad("bandwidths", "need codebooks, the weights' quantiser layers are not numbered 0..N-1")
    book = shape("quantizer.vq.layers.0._codebook.embed")
    if book is None or len(book) != 2:
        raise bad("codebook_size", "is not what the weights hold (their first codebook is not a matrix)")
    if book[0] != config.codebook_size:
        raise bad("codebook_size", f"is {config.codebook_size}, the weights' codebooks hold {book[0]} codes")
    if book[1] != config.dimension:
        raise bad("dimension", f"is {config.dimension}, the weights' codebook vectors have {book[1]}")
    if len(layers) != config.max_codebooks:
        raise bad("sample_rate and bandwidths", f"give {config.max_codebooks} codebooks at "
                  f"{config.bandwidths[-1]:g} kbps (sample_rate {config.sample_rate}, hop {config.hop_length}, "
                  f"{config.bits_per_code}-bit codes); the weights hold {len(layers)}")


@functools.lru_cache(maxsize=None)
def model_layout(config: EncodecConfig) -> Mapping[str, tuple[int, ...]]:
    """The key -> shape map of ``config``'s state dict: what its weights must look like.

    Built on the meta device, so no weights are allocated (~0.1 s), and cached: a bare
    state dict is compared with the known layouts to tell which architecture it is.
    """
    with torch.device("meta"):
        model = EncodecModel(config)
    return MappingProxyType({key: tuple(value.shape) for key, value in model.state_dict().items()})


@dataclass(frozen=True)
class LayoutDifference:
    """How a state dict differs from a layout: keys missing, keys unexpected, and
    (key, found shape, expected shape) for the keys whose shapes differ."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    reshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    shared: int  # keys in both, whatever their shapes

    @property
    def matches(self) -> bool:
        return not (self.missing or self.unexpected or self.reshaped)

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.reshaped)

    def describe(self) -> str:
        """The difference in a few words, with one example: "3 keys missing, 1 shape differs,
        e.g. encoder.model.0.conv.conv.weight_v is [32, 2, 7], expected [32, 1, 7]"."""
        def count(n: int, one: str, many: str) -> str:
            return f"{n} {one if n == 1 else many}"

        parts = [text for n, text in ((len(self.missing), count(len(self.missing), "key missing", "keys missing")),
                                      (len(self.unexpected), count(len(self.unexpected), "key unexpected",
                                                                   "keys unexpected")),
                                      (len(self.reshaped), count(len(self.reshaped), "shape differs",
                                                                 "shapes differ"))) if n]
        if self.reshaped:
            key, found, expected = self.reshaped[0]
            example = f"{key} is {list(found)}, expected {list(expected)}"
        elif self.missing:
            example = f"no {self.missing[0]}"
        else:
            example = f"an unexpected {self.unexpected[0]}" if self.unexpected else ""
        text = ", ".join(parts) or "matches"
        return f"{text}, e.g. {example[:160]}" if example else text


def compare_layout(state_dict: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[int, ...]]
                   ) -> LayoutDifference:
    """Compare a state dict's key names and shapes with ``layout`` (its data is never read,
    so a memory-mapped checkpoint stays on disk). A state dict without the codebooks'
    training statistics (inference-only, as :func:`build_model` accepts) is compared with
    the layout without them."""
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    if not any(key.endswith(TRAINING_STATISTICS) and math.prod(shape) for key, shape in found.items()):
        found = {k: v for k, v in found.items() if not k.endswith(TRAINING_STATISTICS)}
        layout = {k: v for k, v in layout.items() if not k.endswith(TRAINING_STATISTICS)}
    missing = tuple(sorted((k for k in layout if k not in found), key=_natural))
    unexpected = tuple(sorted((k for k in found if k not in layout), key=_natural))
    reshaped = tuple((k, found[k], layout[k]) for k in sorted(found, key=_natural)
                     if k in layout and found[k] != layout[k])
    return LayoutDifference(missing, unexpected, reshaped, shared=sum(1 for k in found if k in layout))


def _natural(key: str) -> list[Any]:
    """Sort key for state dict names: ``model.2`` before ``model.10``, as the model lists them."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor],
                        after_each: Callable[[torch.Tensor], None] | None = None) -> bytes:
    """16 bytes identifying a set of weights, independent of how the file stored them.

    Hashes every tensor (as float32 for floating tensors, so an fp16-stored copy of the
    same values and its fp32 load agree) in sorted key order. Empty tensors hold no
    weights and are skipped (a model loaded from an inference-only release has empty
    codebook statistics; its state dict then hashes like the file). ``after_each`` is
    called with each tensor once it is hashed.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        original = state_dict[key].detach()
        if original.numel() == 0:
            continue
        tensor = original.cpu()
        if tensor.dtype == torch.float16:
            # numpy's conversion (exact, as torch's): single-threaded, so it stays ~0.1 s for a
            # release even on a busy machine, where torch's threads made it take a second.
            tensor = torch.from_numpy(tensor.contiguous().numpy().astype(np.float32))
        elif tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        digest.update(key.encode("utf-8"))
        digest.update(str(tuple(tensor.shape)).encode("ascii"))
        digest.update(tensor.contiguous().numpy().data.cast("B"))  # the array's memoryview: no copy
        if after_each is not None:
            after_each(original)
    return digest.digest()[:16]


#: Key of ecdc's own checkpoints (exported model.th, releases) holding the hex
#: :func:`weights_fingerprint` of their state dict, next to ``config``.
FINGERPRINT_KEY = "fingerprint"
_HEX_FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def checkpoint_payload(config: EncodecConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What ecdc saves for a model: its config, its tensors, and their fingerprint.

    Loading computes the fingerprint anyway (files record it), so comparing it with the
    stored one costs nothing and turns a damaged copy (a flipped block on disk, a broken
    transfer) into an error instead of a model that silently codes garbage.
    """
    tensors = dict(state_dict)
    return {"config": config.to_dict(), "state_dict": tensors,
            FINGERPRINT_KEY: weights_fingerprint(tensors).hex()}


def stored_fingerprint(obj: Any, path: Path) -> str | None:
    """The fingerprint an ecdc checkpoint stores, or None (Meta's files, ecdc's from before)."""
    if not isinstance(obj, Mapping) or FINGERPRINT_KEY not in obj:
        return None
    value = obj[FINGERPRINT_KEY]
    if not isinstance(value, str) or not _HEX_FINGERPRINT.fullmatch(value):
        raise WeightsError("the file is damaged: its stored weights fingerprint is not one", where=path)
    return value


def check_stored_fingerprint(stored: str | None, fingerprint: bytes, source: str) -> None:
    """Refuse weights whose fingerprint is not the one their file stores (damage)."""
    if stored is not None and fingerprint.hex() != stored:
        raise WeightsError(f"the file is damaged: its weights do not match the fingerprint stored "
                           f"with them ({fingerprint.hex()[:16]}, expected {stored[:16]}); use another copy",
                           where=source)


_MADV_DONTNEED = 4
_madvise: Any = None


def _release_mapped_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor memory-mapped, unmodified, from a file.

    Hashing reads every weight; without this, all of the file's pages would stay in this
    process's memory, though one direction of coding needs only half of them. The data is
    intact: the pages are read back from the file when next used. Never call it on
    anonymous memory, which it would zero. Linux only; elsewhere (or on failure) a no-op.
    """
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                _madvise = libc.madvise
                _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise.restype = ctypes.c_int
            except (OSError, AttributeError):
                _madvise = False
    if not _madvise or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    storage = tensor.untyped_storage()
    start = storage.data_ptr()
    end = start + storage.nbytes()
    first, last = -(-start // page) * page, end // page * page  # whole pages inside only
    if last > first:
        _madvise(first, last - first, _MADV_DONTNEED)


#: Codebook buffers used only to train (EMA statistics); inference-only checkpoints omit them.
TRAINING_STATISTICS = ("._codebook.embed_avg", "._codebook.cluster_size")


def inference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` without the codebooks' training statistics (what a release stores)."""
    return {k: v for k, v in state_dict.items() if not k.endswith(TRAINING_STATISTICS)}


def build_model(config: EncodecConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> EncodecModel:
    """Instantiate ``config`` and load ``state_dict`` strictly (a mismatch is the user's error).

    The one thing a checkpoint may leave out is all of the codebooks' training statistics
    (an inference-only checkpoint, like ecdc's releases): the model then holds empty
    statistics, as after :meth:`~ecdc.models.EncodecModel.release_unused`, and codes
    exactly as with them, but cannot be trained further.
    """
    check_config_fits(config, state_dict, source)  # before building what the config asks for
    # Built on the meta device and given the checkpoint's tensors (assign=True): no random
    # initialisation and no second copy of the weights, which would double the load's peak
    # memory. fp16-stored weights become float32 here, one tensor at a time.
    with torch.device("meta"):
        model = EncodecModel(config)
    tensors = {key: value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
               for key, value in state_dict.items()}
    statistics = {k for k in model.state_dict() if k.endswith(TRAINING_STATISTICS)}
    present = {k for k in statistics if k in tensors and tensors[k].numel()}
    inference_only = bool(statistics) and not present
    if inference_only:
        tensors = {k: v for k, v in tensors.items() if k not in statistics}
    try:
        result = model.load_state_dict(tensors, strict=not inference_only, assign=True)
        missing = [k for k in result.missing_keys if k not in statistics] if inference_only else []
        if missing or (inference_only and result.unexpected_keys):
            problem = (f"Missing key(s) in state_dict: {', '.join(repr(k) for k in missing)}" if missing else
                       f"Unexpected key(s) in state_dict: {', '.join(repr(k) for k in result.unexpected_keys)}")
            raise RuntimeError(f"Error(s) in loading state_dict:\n{problem}")
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "mismatch")
        raise WeightsError(f"weights do not fit model {config.name!r} ({detail[:200]})", where=source) from None
    if inference_only:
        for layer in model.quantizer.vq.layers:
            book = cast(torch.nn.Module, layer._codebook)
            book.embed_avg = torch.empty(0, dtype=torch.float32)
            book.cluster_size = torch.empty(0, dtype=torch.float32)
    model.eval()
    return model
