"""The atheris fuzz targets of fuzz/ replay their seed corpora here, without atheris.

A target that no longer imports, or whose seeds now crash it, fails the normal test run
instead of the next long fuzzing session. (fuzz/fuzz_container.py's corpus is replayed
by tests/test_fuzz.py.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _target(name: str) -> ModuleType:
    """Import fuzz/NAME.py with atheris made unimportable: only fuzzing may need it."""
    spec = importlib.util.spec_from_file_location(f"fuzz_target_{name}", FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("atheris", ...)
    sys.modules["atheris"] = None  # type: ignore[assignment]  # "import atheris" now fails
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is ...:
            del sys.modules["atheris"]
        else:
            sys.modules["atheris"] = saved
    return module


TARGETS = ["fuzz_wavstream", "fuzz_checkpoint_config"]


@pytest.mark.parametrize("name", TARGETS)
def test_target_replays_its_seed_corpus(name: str) -> None:
    target = _target(name)
    seeds = sorted(target.CORPUS.iterdir())
    assert 5 <= len(seeds) <= 40 and sum(p.stat().st_size for p in seeds) < 50_000, seeds
    for path in seeds:
        target.TestOneInput(path.read_bytes())


def test_wavstream_target_refuses_with_ecdc_errors_only() -> None:
    """Mangled seeds (truncated, sizes and formats flipped) are refused or read, never a crash."""
    target = _target("fuzz_wavstream")
    for path in sorted(target.CORPUS.iterdir()):
        data = path.read_bytes()
        for cut in (0, 1, 11, 12, 20, 36, 44, len(data) - 1):
            target.TestOneInput(data[:cut])
        for at in (4, 16, 22, 24, 34, 40):
            if at + 4 <= len(data):
                target.TestOneInput(data[:at] + b"\xff\xff\xff\xff" + data[at + 4:])


def test_checkpoint_config_target_accepts_valid_and_refuses_hostile_seeds() -> None:
    target = _target("fuzz_checkpoint_config")
    target._import_targets()
    outcome = {}
    for path in sorted(target.CORPUS.iterdir()):
        raw, index = target.config_from_bytes(path.read_bytes(), target.StandInProvider)
        outcome[path.stem] = target.check(raw, index) is not None
    assert outcome["valid"] and outcome["valid_full"] and outcome["stereo_group_norm"]
    assert not any(accepted for stem, accepted in outcome.items() if stem.startswith(("issue_", "wrong_", "misfit_")))
    # The data-provider path (what most fuzzer inputs take) runs too.
    for data in (b"\x00" * 8, bytes(range(64)), b"\xff" * 40, b"\x03\x05\x07" * 11):
        target.TestOneInput(data)
