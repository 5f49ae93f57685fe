"""Hostile and damaged checkpoints (issue 12, items 7 and 17).

A checkpoint's config decides how big a model gets built, so it is validated (types,
finite, in range, and consistent with the state dict's shapes) before anything is built:
every hostile config is refused in milliseconds with one line naming the field. ecdc's
own checkpoints store their weights' fingerprint, so a damaged copy is refused instead of
coding garbage; files named ``<model>-<sha256 prefix>.th`` (Meta's, ecdc's releases) are
checked against the hash their name states.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import soundfile
import torch

from ecdc import weights
from ecdc.errors import EcdcError, WeightsError
from ecdc.models.encodec import EncodecConfig
from ecdc.weights import ModelSpec, register_model, unregister_model

from conftest import TINY_MONO, random_model, save_checkpoint, test_signal

REPO = Path(__file__).resolve().parents[1]

#: Small enough that a file per hostile case costs ~100 KB: 13 codebooks of 64 x 16.
SMALL = EncodecConfig(
    name="small_safety", sample_rate=24000, channels=1, causal=True, norm="weight_norm",
    bandwidths=(1.5, 3.0, 6.0), normalize=False, segment=None,
    n_filters=4, dimension=16, lstm_layers=1, codebook_size=64,
)

NAN, INF = float("nan"), float("inf")
#: Values no numeric field may hold (each case also names the field it breaks).
HOSTILE = {"nan": NAN, "inf": INF, "-inf": -INF, "negative": -1, "huge": 10**12, "huge_float": 1e300,
           "2**64": 2**64, "string": "12", "list": [1], "bool": True, "null": None, "dict": {"a": 1}}

#: Every numeric field of EncodecConfig, with the hostile values it must refuse.
NUMERIC_FIELDS = ["sample_rate", "channels", "bandwidths", "segment", "overlap", "n_filters", "ratios",
                  "dimension", "n_residual_layers", "lstm_layers", "codebook_size"]


def _cases() -> List[Tuple[str, Dict[str, Any], str]]:
    """(case id, config changes, field the error must name)."""
    cases: List[Tuple[str, Dict[str, Any], str]] = []
    for field in NUMERIC_FIELDS:
        for label, value in HOSTILE.items():
            if field == "segment" and value is None:
                continue  # null = unsegmented: valid
            if field in ("bandwidths", "ratios") and label == "list":
                value = [1.5, 3.0, 6.0, 1.0] if field == "bandwidths" else [8, 5, 4, 2, 0]
            cases.append((f"{field}-{label}", {field: value}, field))
        if field not in ("overlap", "segment"):  # zero is valid for these (segment: refused below)
            cases.append((f"{field}-zero", {field: 0}, field))
    cases.append(("segment-zero", {"segment": 0}, "segment"))
    cases.append(("overlap-one", {"overlap": 1.0}, "overlap"))
    cases.append(("segment-below-one-sample", {"segment": 1e-9}, "segment"))
    # The cases of the issue.
    cases += [
        ("issue-bandwidth-1e12", {"bandwidths": [6, 1e12]}, "bandwidths"),
        ("issue-ratio-2**40", {"ratios": [8, 5, 4, 2**40]}, "ratios"),
        ("issue-sample_rate-7", {"sample_rate": 7}, "sample_rate"),
        ("issue-segment-nan", {"segment": NAN}, "segment"),
        ("issue-segment-inf", {"segment": INF}, "segment"),
        ("issue-bandwidths-nan", {"bandwidths": [1.5, NAN]}, "bandwidths"),
        ("issue-bandwidths-inf", {"bandwidths": [1.5, INF]}, "bandwidths"),
    ]
    # Elements of the two list fields.
    for label, value in [("nan", NAN), ("inf", INF), ("negative", -6.0), ("zero", 0), ("huge", 10**400),
                         ("string", "6"), ("list", [6]), ("bool", True), ("null", None)]:
        cases.append((f"bandwidths-element-{label}", {"bandwidths": [1.5, 3.0, value]}, "bandwidths"))
        cases.append((f"ratios-element-{label}", {"ratios": [8, 5, 4, value]}, "ratios"))
    cases += [
        ("bandwidths-empty", {"bandwidths": []}, "bandwidths"),
        ("bandwidths-string", {"bandwidths": "136"}, "bandwidths"),
        ("bandwidths-descending", {"bandwidths": [6.0, 3.0, 1.5]}, "bandwidths"),
        ("bandwidths-1000", {"bandwidths": [1.5 + i / 1000 for i in range(1000)]}, "bandwidths"),
        ("bandwidths-too-many-codebooks", {"bandwidths": [1.5, 3.0, 60.0]}, "bandwidths"),
        ("ratios-empty", {"ratios": []}, "ratios"),
        ("ratios-string", {"ratios": "8542"}, "ratios"),  # once iterated into (8, 5, 4, 2)
        ("ratios-float", {"ratios": [8, 5, 4, 2.0]}, "ratios"),
        ("ratios-many-ones", {"ratios": [1] * 1000}, "ratios"),
        ("ratios-hop-over-format", {"ratios": [64, 64, 64]}, "ratios"),
        ("n_filters-too-wide", {"n_filters": 10**4, "ratios": [8, 5, 4, 2]}, "n_filters"),
        ("codebook_size-not-power-of-two", {"codebook_size": 100}, "codebook_size"),
        ("codebook_size-over-16-bits", {"codebook_size": 1 << 17}, "codebook_size"),
        ("segment-too-many-samples", {"segment": 1e6}, "segment"),
        # Not numeric, but just as hostile.
        ("causal-string", {"causal": "yes"}, "causal"),
        ("causal-int", {"causal": 1}, "causal"),
        ("normalize-null", {"normalize": None}, "normalize"),
        ("conv_shortcut-int", {"conv_shortcut": 0}, "conv_shortcut"),
        ("norm-int", {"norm": 5}, "norm"),
        ("norm-unknown", {"norm": "batch_norm"}, "norm"),
        ("name-int", {"name": 7}, "name"),
        ("name-empty", {"name": ""}, "name"),
        ("name-huge", {"name": "x" * 100_000}, "name"),
        ("name-newline", {"name": "a\nb"}, "name"),
        ("unknown-key", {"layers": 10**9}, "layers"),
    ]
    # In range, but not what the state dict holds.
    cases += [
        ("fit-channels", {"channels": 2}, "channels"),
        ("fit-n_filters", {"n_filters": 8}, "n_filters"),
        ("fit-dimension", {"dimension": 32}, "dimension"),
        ("fit-codebook_size", {"codebook_size": 128}, "codebook_size"),
        ("fit-ratios-count", {"ratios": [8, 5, 4]}, "ratios"),
        ("fit-ratios-value", {"ratios": [8, 5, 4, 4]}, "ratios"),
        ("fit-ratios-order", {"ratios": [2, 4, 5, 8]}, "ratios"),
        ("fit-n_residual_layers", {"n_residual_layers": 2}, "n_residual_layers"),
        ("fit-lstm_layers", {"lstm_layers": 2}, "lstm_layers"),
        ("fit-bandwidths", {"bandwidths": [1.5, 3.0]}, "bandwidths"),
        ("fit-sample_rate", {"sample_rate": 48000}, "sample_rate"),
        ("fit-sample_rate-max", {"sample_rate": 1_000_000}, "sample_rate"),
        ("fit-norm", {"norm": "time_group_norm", "causal": False}, "norm"),
    ]
    return cases


CASES = _cases()

#: Loads every case's file in a child process with a bounded address space and a per-case
#: alarm, so that the old code (a minute and 1.5 GB for some cases) fails fast instead.
_CHILD = r"""
import json, resource, signal, sys, time
import torch
from ecdc import weights

plan = json.load(open(sys.argv[1]))
weights.load_weights(checkpoint=plan["valid"])  # warm up: imports, lazy initialisation

class Hang(Exception):
    pass

def expire(*_):
    raise Hang("still running after 3 s")

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

signal.signal(signal.SIGALRM, expire)
with open("/proc/self/statm") as f:
    pages = int(f.read().split()[0])
limit = pages * resource.getpagesize() + (768 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
start = peak_kib()  # the peak only grows: a case that used memory shows from there on
results = {}
for case, path in plan["cases"].items():
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    began = time.perf_counter()
    try:
        weights.load_weights(checkpoint=path)
        outcome, message = "accepted", ""
    except BaseException as exc:
        outcome, message = type(exc).__name__, str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.perf_counter() - began
    # The checks alone, without reading the file: what refusing costs beyond torch.load.
    validate = None
    if outcome == "WeightsError" and hasattr(weights, "check_config_fits"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        began = time.perf_counter()
        try:
            weights.check_config_fits(weights.parse_config(obj["config"], path), obj["state_dict"], path)
        except weights.WeightsError:
            pass
        validate = time.perf_counter() - began
    results[case] = {"outcome": outcome, "message": message[:2000], "seconds": seconds,
                     "validate_seconds": validate, "peak_growth_kib": peak_kib() - start}
print(json.dumps({"results": results, "rss_growth_kib": peak_kib() - start}))
"""


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory) -> Dict[str, Any]:
    """Write one checkpoint per case (a valid SMALL state dict, a hostile config) and load
    them all in one guarded child process; its per-case outcome, time and memory."""
    root = tmp_path_factory.mktemp("hostile")
    state = random_model(SMALL).state_dict()
    valid = root / "valid.th"
    torch.save({"config": SMALL.to_dict(), "state_dict": state}, valid)
    paths = {}
    for case, changes, _ in CASES:
        path = root / f"{len(paths)}.th"
        torch.save({"config": {**SMALL.to_dict(), **changes}, "state_dict": state}, path)
        paths[case] = str(path)
    plan = root / "plan.json"
    plan.write_text(json.dumps({"valid": str(valid), "cases": paths}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(plan)], capture_output=True, text=True,
                              env=env, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("loading the hostile checkpoints took over 240 s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, field", [(c, f) for c, _, f in CASES], ids=[c for c, _, _ in CASES])
def test_hostile_config_is_refused_fast_naming_the_field(hostile_results, case, field):
    result = hostile_results["results"][case]
    assert result["outcome"] == "WeightsError", result
    message = result["message"]
    assert "\n" not in message and len(message) < 600, message
    assert field in message, message
    assert result["seconds"] < 0.5, result  # the whole load, refused before anything is built
    assert result["validate_seconds"] is not None and result["validate_seconds"] < 0.05, result  # the checks
    assert result["peak_growth_kib"] < 8 * 1024, result  # a few MB at most, not a model's worth


def test_hostile_configs_leave_memory_flat(hostile_results):
    """All the cases together grow the peak resident memory by a few MB at most."""
    seconds = [r["seconds"] for r in hostile_results["results"].values()]
    checks = [r["validate_seconds"] or 0.0 for r in hostile_results["results"].values()]
    print(f"{len(seconds)} hostile configs: slowest refusal {max(seconds) * 1000:.1f} ms, median "
          f"{sorted(seconds)[len(seconds) // 2] * 1000:.1f} ms (torch.load included; the checks alone: "
          f"median {sorted(checks)[len(checks) // 2] * 1e6:.0f} us, at most {max(checks) * 1e6:.0f} us); "
          f"peak RSS growth over all of them "
          f"{hostile_results['rss_growth_kib'] / 1024:.1f} MiB")
    assert hostile_results["rss_growth_kib"] < 8 * 1024


def test_every_numeric_field_is_covered():
    import dataclasses

    numeric = {f.name for f in dataclasses.fields(EncodecConfig)
               if f.name not in ("name", "causal", "norm", "normalize", "conv_shortcut")}
    assert numeric == set(NUMERIC_FIELDS)
    covered = {c.split("-")[0] for c, _, _ in CASES}
    assert numeric <= covered


def test_valid_edge_configs_still_load(tmp_path):
    """What the checks must not refuse: zero overlap, a segment, lists from JSON, numpy ints."""
    import numpy as np

    state = random_model(SMALL).state_dict()
    for changes in [{"overlap": 0.0}, {"segment": 1.0, "overlap": 0.5}, {"bandwidths": [1.5, 3, 6]},
                    {"causal": False}]:
        path = tmp_path / "ok.th"
        torch.save({"config": {**SMALL.to_dict(), **changes}, "state_dict": state}, path)
        model, _ = weights.load_weights(checkpoint=str(path))
        assert model.max_codebooks == 13
    for config in (weights.get_spec("encodec_24khz").config, weights.get_spec("encodec_48khz").config):
        assert EncodecConfig.from_dict(config.to_dict()) == config
    numpy_made = EncodecConfig.from_dict({**SMALL.to_dict(), "sample_rate": np.int64(24000),
                                          "bandwidths": np.array([1.5, 3.0, 6.0]).tolist()})
    assert numpy_made == SMALL and type(numpy_made.sample_rate) is int


def test_sidecar_config_is_validated_too(tmp_path):
    path = tmp_path / "bare.th"
    torch.save(random_model(SMALL).state_dict(), path)
    for text, field in [('{"sample_rate": NaN}', "sample_rate"), ('{"bandwidths": [6, 1e12]}', "bandwidths"),
                        ("[" * 100_000 + "]" * 100_000, "config")]:
        raw = json.loads(text) if not text.startswith("[[") else None
        body = json.dumps({**SMALL.to_dict(), **raw}) if raw is not None else text
        path.with_suffix(".json").write_text(body)
        began = time.perf_counter()
        with pytest.raises(WeightsError, match=field) as info:
            weights.load_weights(checkpoint=str(path))
        assert time.perf_counter() - began < 1.0
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- item 17: damage


def _flip(data: bytearray, start: int, size: int = 4096) -> None:
    data[start:start + size] = bytes(b ^ 0x5A for b in data[start:start + size])


def corrupt_largest_tensor(path: Path) -> None:
    """Flip 4 KiB in the middle of the file's largest tensor (the zip framing stays intact)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    assert info.file_size >= 3 * 4096
    _flip(data, start + info.file_size // 2 - 2048)
    path.write_bytes(bytes(data))


def corrupt_middle(path: Path) -> None:
    """Flip the 4 KiB in the middle of the file, wherever they fall."""
    data = bytearray(path.read_bytes())
    _flip(data, len(data) // 2 - 2048)
    path.write_bytes(bytes(data))


def _assert_damaged(path: Path, **kw: Any) -> str:
    with pytest.raises(WeightsError) as info:
        weights.load_weights(checkpoint=str(path), **kw)
    message = str(info.value)
    assert "\n" not in message and "damaged" in message, message
    return message


@pytest.mark.parametrize("corrupt", [corrupt_largest_tensor, corrupt_middle], ids=["in-a-tensor", "mid-file"])
def test_damaged_checkpoint_of_ours_is_refused(tmp_path, corrupt):
    """ecdc's layout with the fingerprint stored next to the config (what ecdc writes now)."""
    state = random_model(TINY_MONO, seed=2).state_dict()
    path = tmp_path / "model.th"
    torch.save({"config": TINY_MONO.to_dict(), "state_dict": state,
                "fingerprint": weights.weights_fingerprint(state).hex()}, path)
    model, fingerprint = weights.load_weights(checkpoint=str(path))  # intact: loads
    assert fingerprint == weights.weights_fingerprint(state)
    corrupt(path)
    _assert_damaged(path)


def test_checkpoint_of_ours_from_before_still_loads(tmp_path):
    """Files written before fingerprints were stored carry none: they load as before."""
    model = random_model(TINY_MONO, seed=3)
    path = save_checkpoint(model, tmp_path / "old-20261201.th")  # a hex-looking suffix promises nothing
    loaded, fingerprint = weights.load_weights(checkpoint=str(path))
    assert fingerprint == weights.weights_fingerprint(model.state_dict())


def test_stored_fingerprint_that_is_not_one_is_refused(tmp_path):
    state = random_model(TINY_MONO).state_dict()
    path = tmp_path / "model.th"
    for bad in (12, "x" * 32, "ab"):
        torch.save({"config": TINY_MONO.to_dict(), "state_dict": state, "fingerprint": bad}, path)
        _assert_damaged(path)


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        soundfile.write(str(root / f"clip{i}.wav"), test_signal(1.5, 24000, seed=i).T, 24000)
    return root


def test_trainer_export_stores_its_fingerprint(tmp_path, tiny_corpus):
    """ecdc train's model.th carries its fingerprint; damaged, it is refused on load and
    by the release tool."""
    from ecdc.train import release as release_tool
    from ecdc.train.config import TrainConfig
    from ecdc.train.loop import Trainer

    config = TrainConfig.from_dict({
        "model": "tiny_24khz", "batch_size": 2, "steps": 10, "loss": {"discriminator_filters": 8},
        "data": {"train_folders": [str(tiny_corpus)], "valid_fraction": 0.34, "segment_seconds": 0.5,
                 "num_workers": 0, "cache_dir": str(tmp_path / "cache"), "valid_seconds": 0.5,
                 "valid_items": 1}})
    run = tmp_path / "run"
    trainer = Trainer(config, run, device="cpu", quiet=True)
    trainer.save_checkpoint()
    stored = torch.load(str(run / "model.th"), map_location="cpu", weights_only=True)
    assert stored["fingerprint"] == weights.weights_fingerprint(stored["state_dict"]).hex()
    weights.load_weights(checkpoint=str(run / "model.th"))
    corrupt_largest_tensor(run / "model.th")
    _assert_damaged(run / "model.th")
    with pytest.raises(EcdcError, match="damaged"):
        release_tool._read_run(run)


def test_release_tool_writes_the_fingerprint(tmp_path):
    from ecdc.train import release as release_tool

    root = tmp_path / "checkout"
    (root / "ecdc" / "releases").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(random_model(TINY_MONO, seed=7), run / "model.th")  # a model.th from before
    try:
        entry = release_tool.make_release(run, 1, "test", root=root, log=lambda *a: None)
    finally:
        weights.load_releases()
    path = root / "ecdc" / "releases" / entry["file"]
    stored = torch.load(str(path), map_location="cpu", weights_only=True)
    assert stored["fingerprint"] == entry["fingerprint"]
    assert entry["file"] == f"tiny_mono_v1-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}.th"


@pytest.fixture
def meta_style_file(tmp_path):
    """A bare state dict (Meta's layout) named ``<registered model>-<its sha256 prefix>.th``."""
    path = tmp_path / "tmp.th"
    torch.save(random_model(TINY_MONO, seed=5).state_dict(), path)
    named = tmp_path / f"tiny_mono-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}.th"
    path.rename(named)
    register_model(ModelSpec(TINY_MONO, named.name))
    yield named
    unregister_model(TINY_MONO.name)


def test_meta_style_file_is_checked_against_the_hash_in_its_name(meta_style_file):
    weights.load_weights(checkpoint=str(meta_style_file))  # intact
    corrupt_largest_tensor(meta_style_file)
    message = _assert_damaged(meta_style_file)
    assert "sha256" in message


def test_bundled_release_is_unchanged_and_a_damaged_copy_is_refused(tmp_path):
    name = weights.resolve_name(weights.default_model())
    spec = weights.get_spec(name)
    bundled = weights.RELEASES_DIR / spec.release["file"]
    assert hashlib.sha256(bundled.read_bytes()).hexdigest() == spec.release["sha256"]  # never rewritten
    _, by_name = weights.load_weights(name)
    _, by_path = weights.load_weights(checkpoint=str(bundled))
    assert by_name.hex() == by_path.hex() == spec.fingerprint
    copy = tmp_path / bundled.name
    shutil.copy(bundled, copy)
    corrupt_largest_tensor(copy)
    _assert_damaged(copy)


def test_integrity_checks_are_cheap(tmp_path):
    """Hashing is a small part of a load: 80 MB through the name check, and the weights of
    the bundled release through the fingerprint, each well under a second."""
    big = tmp_path / f"tiny_mono-{'0' * 8}.th"
    big.write_bytes(os.urandom(80 << 20))
    register_model(ModelSpec(TINY_MONO, big.name))
    try:
        began = time.perf_counter()
        with pytest.raises(WeightsError, match="damaged"):
            weights._check_promised_sha256(big)
        name_check = time.perf_counter() - began
    finally:
        unregister_model(TINY_MONO.name)
    spec = weights.get_spec(weights.resolve_name(weights.default_model()))
    state = torch.load(str(weights.RELEASES_DIR / spec.release["file"]), map_location="cpu",
                       weights_only=True)["state_dict"]
    weights.weights_fingerprint(state)  # warm
    began = time.perf_counter()
    assert weights.weights_fingerprint(state).hex() == spec.fingerprint
    fingerprint = time.perf_counter() - began
    print(f"sha256 of 80 MB: {name_check * 1000:.0f} ms; fingerprint of the release: {fingerprint * 1000:.0f} ms")
    assert name_check < 0.75 and fingerprint < 0.75
