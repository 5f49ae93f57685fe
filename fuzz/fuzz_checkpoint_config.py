#!/usr/bin/env python3
"""Coverage-guided fuzzing of checkpoint config validation (issue 12, item 7) with atheris.

Each input becomes a config dict paired with the state dict of a small valid model and
goes through what loading a checkpoint does before building anything:
``weights.parse_config`` then ``weights.check_config_fits``. Anything other than a
``WeightsError`` is a crash. A config that is accepted must be finite and in range
(JSON-able without NaN, the same after a ``to_dict`` round trip) and must build its model
(``weights.build_model``) in well under a second.

Inputs starting with ``{`` are JSON (Python's dialect: NaN and Infinity allowed) merged
over the valid config; any other input drives a ``FuzzedDataProvider`` that replaces,
deletes or adds fields with hostile values: NaN, infinities, huge and negative numbers,
strings, bools, None, nested lists and dicts, and near-valid numbers.

atheris is only needed to fuzz (``python fuzz/fuzz_checkpoint_config.py DIR ...``, see
fuzz/README.md); without it the module imports, and tests/test_fuzz_targets.py replays the
seed corpus through :func:`TestOneInput` (with a small stand-in for the data provider).
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

#: Seed corpus (written by make_corpus.py).
CORPUS = _ROOT / "fuzz" / "corpus_checkpoint_config"
#: An accepted config must build in this many CPU seconds (a small model builds in ~0.06 s;
#: what validation exists to stop took over a minute).
BUILD_LIMIT_S = 1.0

weights: Any = None
EncodecConfig: Any = None
WeightsError: Any = Exception
#: (valid config dict, its state dict), mono weight_norm and stereo time_group_norm.
MODELS: list[tuple] = []
#: The data provider class: atheris' when fuzzing, else a stand-in good enough for replays.
Provider: Any = None


def _import_targets() -> None:
    """Import what is fuzzed (under atheris' instrumentation when fuzzing) and make the models."""
    global weights, EncodecConfig, WeightsError
    import torch

    from ecdc import weights as module
    from ecdc.errors import WeightsError as error
    from ecdc.models.encodec import EncodecConfig as config_class
    from ecdc.models.encodec import EncodecModel

    weights, EncodecConfig, WeightsError = module, config_class, error
    mono = config_class(name="small_fuzz", sample_rate=24000, channels=1, causal=True, norm="weight_norm",
                        bandwidths=(1.5, 3.0, 6.0), normalize=False, segment=None, n_filters=4, dimension=16,
                        lstm_layers=1, codebook_size=64)
    stereo = config_class(**{**mono.to_dict(), "name": "small_fuzz_stereo", "channels": 2,
                             "norm": "time_group_norm", "causal": False, "normalize": True, "segment": 1.0})
    torch.manual_seed(0)
    MODELS[:] = [(c.to_dict(), {k: v.clone() for k, v in EncodecModel(c).state_dict().items()})
                 for c in (mono, stereo)]


class StandInProvider:
    """The few ``atheris.FuzzedDataProvider`` calls used here, for replays without atheris."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out.ljust(n, b"\0")

    def remaining_bytes(self) -> int:
        return len(self._data) - self._pos

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:  # noqa: N802 - atheris' names
        span = hi - lo + 1
        width = max(1, (span.bit_length() + 7) // 8)
        return lo + int.from_bytes(self._take(width), "little") % span

    def ConsumeBool(self) -> bool:  # noqa: N802
        return bool(self.ConsumeIntInRange(0, 1))

    def ConsumeRegularFloat(self) -> float:  # noqa: N802
        value = struct.unpack("<d", self._take(8))[0]
        return value if math.isfinite(value) else 0.0

    def ConsumeUnicodeNoSurrogates(self, count: int) -> str:  # noqa: N802
        return self._take(self.ConsumeIntInRange(0, count)).decode("latin-1")


_FIELDS = ["name", "sample_rate", "channels", "causal", "norm", "bandwidths", "normalize", "segment", "overlap",
           "n_filters", "ratios", "dimension", "n_residual_layers", "lstm_layers", "codebook_size"]
_SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 5e-324, 1e300, 1.7976931348623157e308,
                   0.5, 1.0 - 2**-53, 1.0, 2.0**53 + 1]
_SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 2**15, 2**16, 2**16 + 1, 2**31 - 1, 2**31, 2**32, 2**40, 2**63 - 1, 2**63,
                 2**64, -2**63, 10**12, 10**300, 2**4000]
_STRINGS = ["", "weight_norm", "time_group_norm", "nan", "inf", "24000", "8542", "a\nb", "x" * 300, "\u00e9\u4e2d"]


def _value(fdp: Any, base: Any, depth: int = 0) -> Any:
    """A hostile value, often near ``base`` (the field's valid value) so deeper checks run."""
    kind = fdp.ConsumeIntInRange(0, 11)
    if kind == 0:
        return _SPECIAL_FLOATS[fdp.ConsumeIntInRange(0, len(_SPECIAL_FLOATS) - 1)]
    if kind == 1:
        return _SPECIAL_INTS[fdp.ConsumeIntInRange(0, len(_SPECIAL_INTS) - 1)] * (-1 if fdp.ConsumeBool() else 1)
    if kind == 2:
        return fdp.ConsumeIntInRange(-2**20, 2**20)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return _STRINGS[fdp.ConsumeIntInRange(0, len(_STRINGS) - 1)]
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(12)
    if kind == 6:
        return fdp.ConsumeBool()
    if kind == 7:
        return None
    if kind == 8 and depth < 3:  # a list, of values near base's elements when it is a list
        items = base if isinstance(base, list) and base else [base]
        n = fdp.ConsumeIntInRange(0, 20)
        return [_value(fdp, items[i % len(items)], depth + 1) if fdp.ConsumeBool() else items[i % len(items)]
                for i in range(n)]
    if kind == 9 and depth < 3:
        return {fdp.ConsumeUnicodeNoSurrogates(4): _value(fdp, base, depth + 1)
                for _ in range(fdp.ConsumeIntInRange(0, 3))}
    # Near the valid value: scaled, shifted, or a power of two.
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        return base
    how = fdp.ConsumeIntInRange(0, 3)
    if how == 0:
        return base * 2 ** fdp.ConsumeIntInRange(-4, 40)
    if how == 1:
        return base + fdp.ConsumeIntInRange(-3, 3)
    if how == 2:
        return 2 ** fdp.ConsumeIntInRange(0, 70)
    return float(base) + fdp.ConsumeRegularFloat() % 10


def config_from_bytes(data: bytes, provider: Callable[[bytes], Any]) -> tuple:
    """(the config an input stands for, the index of the model whose weights it meets):
    JSON merged over a valid config (the stereo one when it says time_group_norm), or one
    built by the data provider (the model chosen by the input's last byte)."""
    if data[:1] == b"{":
        try:
            parsed = json.loads(data.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            return None, 0
        if not isinstance(parsed, dict):
            return parsed, 0
        index = 1 if parsed.get("norm") == "time_group_norm" else 0
        return {**MODELS[index][0], **parsed}, index
    index = data[-1] % len(MODELS) if data else 0
    base = MODELS[index][0]
    fdp = provider(data)
    config: dict[str, Any] = dict(base)
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        action = fdp.ConsumeIntInRange(0, 9)
        if action == 0:  # drop a field
            config.pop(_FIELDS[fdp.ConsumeIntInRange(0, len(_FIELDS) - 1)], None)
        elif action == 1:  # an unknown field
            config[fdp.ConsumeUnicodeNoSurrogates(8)] = _value(fdp, 1)
        elif action == 2:  # one element of a list field
            field = "bandwidths" if fdp.ConsumeBool() else "ratios"
            items = list(config[field]) if isinstance(config.get(field), list) else []
            if items:
                items[fdp.ConsumeIntInRange(0, len(items) - 1)] = _value(fdp, items[0])
                config[field] = items
        else:
            field = _FIELDS[fdp.ConsumeIntInRange(0, len(_FIELDS) - 1)]
            config[field] = _value(fdp, base.get(field))
    return config, index


def check(raw: Any, base_index: int = 0) -> Any | None:
    """Validate ``raw`` against model ``base_index``'s weights; the config if accepted."""
    _, state = MODELS[base_index]
    try:
        config = weights.parse_config(raw, "fuzz")
        weights.check_config_fits(config, state, "fuzz")
    except WeightsError as exc:
        assert "\n" not in str(exc), str(exc)
        return None
    # Accepted: a finite, in-range config that survives a round trip...
    text = json.dumps(config.to_dict(), allow_nan=False)
    assert EncodecConfig.from_dict(json.loads(text)) == config
    # ...and builds quickly (the strict load may still find a mismatch the checks left to it).
    # Timed in CPU seconds, and once more when slow: on a busy machine wall time stalls.
    for attempt in range(2):
        began = time.process_time()
        try:
            model = weights.build_model(config, state, "fuzz")
        except WeightsError:
            return config
        elapsed = time.process_time() - began
        if elapsed < BUILD_LIMIT_S:
            break
    assert elapsed < BUILD_LIMIT_S, f"an accepted config took {elapsed:.2f} CPU s to build"
    assert model.max_codebooks == len(model.quantizer.vq.layers) == config.max_codebooks
    return config


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    if weights is None:
        _import_targets()
    raw, index = config_from_bytes(data, Provider or StandInProvider)
    if raw is not None:
        check(raw, index)


def main() -> None:
    global Provider
    import atheris

    with atheris.instrument_imports(include=["ecdc"]):
        _import_targets()
    Provider = atheris.FuzzedDataProvider
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
