"""ecdc's bundled releases (ecdc/releases/): they load, decode their golden files forever,
and are what ``ecdc compress`` uses when no model is named.

A release is made with ``python -m ecdc.train.release RUN_DIR --version N --description ...``
(docs/RELEASES.md), which also writes the golden files these tests decode.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner

import ecdc
from ecdc import weights
from ecdc.cli import main
from ecdc.container import EcdcReader
from ecdc.errors import EcdcError
from ecdc.train import release as release_tool
from ecdc.train.metrics import si_sdr

from conftest import TINY_MONO, random_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / release_tool.GOLDEN_DIR
SPEECH = REPO.parent / "shared" / "data" / "corpus-lite" / "valid" / "speech" / "speech_000.opus"
RELEASES = [spec.config.name for spec in weights.release_history()]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def ecdc_cli(*args, cwd=None):
    """The real command line in its own process (what a user runs)."""
    result = subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], capture_output=True, text=True,
                            env=ENV, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_a_default_release_is_bundled():
    default = weights.default_model()
    assert default is not None and RELEASES, "no release in ecdc/releases/releases.json"
    family = weights.release_history(default)
    versions = [int(s.release["version"]) for s in family]
    assert versions == list(range(len(versions), 0, -1)), versions  # v1..vN, none ever removed
    assert weights.resolve_name(default) == f"{default}_v{versions[0]}"  # the alias is the newest
    assert weights.get_spec(default) is weights.get_spec(f"{default}_v{versions[0]}")


def test_manifest_lists_exactly_the_files_in_the_package():
    manifest = weights.read_manifest()
    files = {e["file"] for e in manifest["releases"]}
    assert {p.name for p in weights.RELEASES_DIR.glob("*.th")} == files
    assert len({e["name"] for e in manifest["releases"]}) == len(manifest["releases"])


@pytest.mark.parametrize("name", RELEASES)
def test_release_file_is_fp16_and_loads_in_float32(name):
    spec = weights.get_spec(name)
    entry = spec.release
    path = weights.RELEASES_DIR / entry["file"]
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert sha == entry["sha256"] and entry["file"] == f"{name}-{sha[:8]}.th"
    stored = torch.load(str(path), map_location="cpu", weights_only=True)
    assert stored["config"] == spec.config.to_dict() == entry["config"]  # architecture recorded with it
    assert spec.config.name == name
    floats = {k: v.dtype for k, v in stored["state_dict"].items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float16}
    assert not [k for k in stored["state_dict"] if k.endswith(weights.TRAINING_STATISTICS)]

    model, fingerprint = weights.load_weights(name)
    assert fingerprint.hex() == entry["fingerprint"] == spec.fingerprint
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float32}
    assert weights.weights_fingerprint(model.state_dict()) == fingerprint  # what is loaded is what is hashed
    for key, value in stored["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value.float()), key
    wav = torch.from_numpy(release_tool.golden_signal(spec.config.sample_rate)).float()[None]
    with torch.inference_mode():
        out = model.decode(model.encode(wav, 6.0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", RELEASES)
def test_golden_file_still_decodes(tmp_path, name):
    """Each release's own .ecdc, committed when it was made, decodes with today's ecdc by
    the name in its header (no model flags), to the audio it decoded to then."""
    wav_in, ecdc_file, expected = (GOLDEN / f"{name}{ext}" for ext in (".wav", ".ecdc", ".npy"))
    assert ecdc_file.is_file(), f"{ecdc_file} missing: run python -m ecdc.train.release (see docs/RELEASES.md)"
    with open(ecdc_file, "rb") as f:
        header = EcdcReader(f).header
    assert header.model_name == name
    assert header.weights_fingerprint.hex() == weights.get_spec(name).fingerprint

    out = tmp_path / "out.wav"
    ecdc_cli("decompress", ecdc_file, "-o", out, "--device", "cpu", "-q")
    decoded, rate = soundfile.read(str(out), dtype="float32", always_2d=True)
    original, original_rate = soundfile.read(str(wav_in), dtype="float32", always_2d=True)
    reference = np.load(expected)
    assert rate == original_rate == weights.get_spec(name).config.sample_rate
    assert decoded.shape == original.shape == reference.T.shape
    diff = np.abs(decoded.T - np.clip(reference, -1, 1)).max()
    assert diff < 1e-3, diff  # 16-bit output; any change of model or decoder is far larger
    assert np.abs(reference).max() > 0.05  # the reference is audio, not silence

    # Today's encoder still writes (nearly: rounding may flip a rare near-tie) the same codes.
    again = ecdc.compress_file(wav_in, tmp_path / "again.ecdc", model=ecdc.load_model(name),
                               bandwidth=header.bandwidth)
    with open(ecdc_file, "rb") as f:
        old_codes = np.concatenate([c.codes for c in EcdcReader(f)], axis=-1)
    new_codes = np.concatenate([c.codes for c in again.chunks], axis=-1)
    assert old_codes.shape == new_codes.shape
    assert (old_codes == new_codes).mean() > 0.9


@pytest.mark.skipif(not SPEECH.is_file(), reason=f"corpus-lite speech not found at {SPEECH}")
def test_default_round_trips_speech_without_model_flags(tmp_path):
    rate = soundfile.info(str(SPEECH)).samplerate
    speech, _ = soundfile.read(str(SPEECH), dtype="float32", always_2d=True, frames=4 * rate)
    wav = tmp_path / "speech.wav"
    soundfile.write(str(wav), speech, rate, subtype="FLOAT")
    ecdc_cli("compress", wav, "-b", "24", "--device", "cpu", "-q")
    with open(tmp_path / "speech.ecdc", "rb") as f:
        header = EcdcReader(f).header
    assert header.model_name == weights.resolve_name(weights.default_model())  # the versioned name
    ecdc_cli("decompress", tmp_path / "speech.ecdc", "-o", tmp_path / "out.wav", "--device", "cpu", "-q")
    decoded, out_rate = soundfile.read(str(tmp_path / "out.wav"), dtype="float32", always_2d=True)
    assert out_rate == rate and decoded.shape == speech.shape
    score = float(si_sdr(torch.from_numpy(speech.T[None].copy()), torch.from_numpy(decoded.T[None].copy()))[0])
    print(f"{header.model_name}: SI-SDR {score:.2f} dB on 4 s of {SPEECH.name} at 24 kbps")
    assert score > 3.0, f"SI-SDR {score:.2f} dB"


def test_models_lists_the_default_first():
    lines = CliRunner().invoke(main, ["models"]).stdout.splitlines()
    default = weights.default_model()
    newest = weights.resolve_name(default)
    assert lines[0].startswith(f"{default} (default, = {newest}):")
    assert weights.get_spec(default).description in lines[0]
    history = [ln.split(" ", 1)[0] for ln in lines[1:1 + len(RELEASES)]]
    assert history[0] == newest and sorted(history) == sorted(RELEASES)
    rest = [ln.split(":", 1)[0] for ln in lines[1 + len(RELEASES):]]
    assert rest[:2] == ["encodec_24khz", "encodec_48khz"]


# -- the release tool, on a scratch checkout (tiny random weights; never a real release) -------

@pytest.fixture
def scratch_root(tmp_path):
    root = tmp_path / "checkout"
    (root / "ecdc" / "releases").mkdir(parents=True)
    yield root
    weights.load_releases()  # the real registry back, whatever happened


def test_release_tool_packages_versions_and_golden_files(tmp_path, scratch_root):
    model = random_model(TINY_MONO, seed=3)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(model, run / "model.th")
    quiet = lambda *a: None  # noqa: E731

    entry = release_tool.make_release(run, 1, "test release", root=scratch_root, log=quiet)
    assert entry["name"] == "tiny_mono_v1" and entry["family"] == "tiny_mono"
    releases = scratch_root / "ecdc" / "releases"
    manifest = json.loads((releases / "releases.json").read_text())
    assert manifest["default"] == "tiny_mono" and [e["name"] for e in manifest["releases"]] == ["tiny_mono_v1"]
    stored = torch.load(str(releases / entry["file"]), weights_only=True)
    assert stored["config"]["name"] == "tiny_mono_v1"
    assert {v.dtype for v in stored["state_dict"].values()} == {torch.float16}
    # The fp16 weights are the run's, rounded; the training statistics are left out.
    expected = weights.inference_state_dict(model.state_dict())
    assert stored["state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(stored["state_dict"][key], value.half()), key
    for ext in (".wav", ".ecdc", ".npy"):
        assert (scratch_root / release_tool.GOLDEN_DIR / f"tiny_mono_v1{ext}").is_file()
    assert "tiny_mono_v1" not in weights.available_models()  # the real registry is restored

    with pytest.raises(EcdcError, match="never changed"):
        release_tool.make_release(run, 1, "again", root=scratch_root, log=quiet)
    with pytest.raises(EcdcError, match="--version 2"):
        release_tool.make_release(run, 3, "gap", root=scratch_root, log=quiet)
    with pytest.raises(EcdcError, match="description"):
        release_tool.make_release(run, 2, " ", root=scratch_root, log=quiet)

    save_checkpoint(random_model(TINY_MONO, seed=4), run / "model.th")
    second = release_tool.make_release(run, 2, "second", root=scratch_root, log=quiet)
    weights.load_releases(releases / "releases.json")
    assert weights.resolve_name("tiny_mono") == "tiny_mono_v2"
    assert weights.default_model() == "tiny_mono"
    assert [s.config.name for s in weights.release_history()] == ["tiny_mono_v2", "tiny_mono_v1"]
    # v1's files keep decoding with v1 (the name in their header), not with the newer default.
    old = scratch_root / release_tool.GOLDEN_DIR / "tiny_mono_v1.ecdc"
    wav, _ = ecdc.decompress_file(old, tmp_path / "old.wav")
    assert np.allclose(wav, np.load(scratch_root / release_tool.GOLDEN_DIR / "tiny_mono_v1.npy"), atol=1e-4)
    assert ecdc.load_model().name == "tiny_mono_v2"

    replaced = release_tool.make_release(run, 2, "second, replaced", root=scratch_root, replace=True, log=quiet)
    assert sorted(p.name for p in releases.glob("*.th")) == sorted([entry["file"], replaced["file"]])
    with pytest.raises(EcdcError, match="newest"):
        release_tool.make_release(run, 1, "old", root=scratch_root, replace=True, log=quiet)
    assert second["fingerprint"] == replaced["fingerprint"]


def test_a_damaged_release_file_is_refused(tmp_path, scratch_root):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(random_model(TINY_MONO, seed=5), run / "model.th")
    entry = release_tool.make_release(run, 1, "test", root=scratch_root, log=lambda *a: None)
    releases = scratch_root / "ecdc" / "releases"
    other = release_tool.release_state_dict(random_model(TINY_MONO, seed=6).state_dict())
    torch.save({"config": entry["config"], "state_dict": other}, str(releases / entry["file"]))
    weights.load_releases(releases / "releases.json")
    with pytest.raises(EcdcError, match="damaged"):
        weights.load_weights("tiny_mono")
