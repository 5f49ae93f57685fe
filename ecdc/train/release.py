"""Package a trained run as a versioned release of ecdc's bundled default model.

    python -m ecdc.train.release training/ecdc_24khz --version 1 \\
        --description "ecdc's own 24 kHz mono codec (2.9 M parameters). Quality: ..."

reads ``RUN_DIR/model.th`` (the inference weights ``ecdc train`` exports) and, in the
source checkout this ``ecdc`` is imported from:

1. writes ``ecdc/releases/<family>_v<N>-<sha256[:8]>.th``: ``{"config", "state_dict"}``
   with every floating tensor in float16 and without the codebooks' training statistics
   (ecdc loads it as float32; the release *is* these fp16-rounded weights, and its
   fingerprint is theirs). The config is the run's architecture under the versioned
   name ``<family>_v<N>``, the name every file it writes records in its header;
2. adds the release to ``ecdc/releases/releases.json`` (the one list of releases:
   file, sha256, weights fingerprint, config, description, provenance), which makes
   ``<family>`` (the run's model name, ``ecdc_24khz``) stand for it and, by default,
   makes that family the model used when none is named;
3. writes the release's golden files under ``tests/data/releases/``: a short
   deterministic test signal (``<name>.wav``), the ``.ecdc`` this release makes of it
   at 6 kbps (``<name>.ecdc``) and its decoded audio (``<name>.npy``), with which
   ``tests/test_releases.py`` checks that every later ecdc still decodes the file.

Then run ``python -m pytest -q tests/test_releases.py`` and commit ``ecdc/releases/`` and
``tests/data/releases/``. Releases are never removed or changed once published: files in
the wild name them. ``--replace`` re-packages the family's newest version and is only for
a release that has not been published (committed) yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

from .. import weights
from ..codec import Codec, EncodedAudio, compress_file
from ..errors import EcdcError
from ..models.encodec import EncodecConfig
from ..outputs import atomic_output
from .metrics import si_sdr

#: The golden file's bitrate and signal (see :func:`golden_signal`).
GOLDEN_BANDWIDTH = 6.0
GOLDEN_SECONDS = 1.5
GOLDEN_DIR = Path("tests") / "data" / "releases"

_FAMILY = re.compile(r"[a-z][a-z0-9_]*")


class ReleaseError(EcdcError):
    """A release cannot be made as asked (bad run, version, name or checkout)."""


def golden_signal(rate: int, seconds: float = GOLDEN_SECONDS) -> np.ndarray:
    """Deterministic speech-like audio ``[1, T]`` float32: a gliding harmonic voice with a
    syllable envelope, plus a little fixed-seed noise; peaks below 0.6, so no clipping."""
    t = np.arange(int(round(seconds * rate))) / rate
    f0 = 130.0 + 40.0 * np.sin(2 * np.pi * 0.7 * t) + 6.0 * np.sin(2 * np.pi * 5.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum((0.35 / k) * (1.0 + 0.5 * np.sin(2 * np.pi * 1.3 * k * t)) * np.sin(k * phase)
                for k in range(1, 9))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.0 * t) ** 2
    noise = 0.01 * np.random.default_rng(1234).standard_normal(t.shape)
    wav = envelope * voice / 1.6 + noise
    return np.asarray(wav[None], dtype=np.float32)


def checkout_root() -> Path:
    """The source checkout this ecdc is imported from (releases are written into it)."""
    root = Path(weights.__file__).resolve().parent.parent
    if not ((root / "setup.cfg").is_file() and (root / "tests").is_dir()):
        raise ReleaseError(f"ecdc is imported from {root}, which is not a source checkout; run this "
                           "from the checkout (an editable install or its root directory)")
    return root


def release_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inference weights in float16 (fresh, contiguous tensors; no training statistics)."""
    out = {}
    for key, value in weights.inference_state_dict(state_dict).items():
        value = value.detach().cpu()
        if value.is_floating_point():
            half = value.to(torch.float16)
            if not torch.isfinite(half).all():
                raise ReleaseError(f"{key}: not finite in float16 (|x| up to {value.abs().max().item():.3g})")
            out[key] = half.contiguous().clone()
        else:
            out[key] = value.contiguous().clone()
    return out


def _read_run(source: Path) -> tuple[Path, bytes, EncodecConfig, dict[str, torch.Tensor]]:
    path = source / "model.th" if source.is_dir() else source
    try:
        data = path.read_bytes()  # one snapshot, however often the live run rewrites it
    except OSError as exc:
        raise ReleaseError(f"{path}: {exc.strerror or exc}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReleaseError(f"{path}: not a loadable weights-only checkpoint ({exc})") from None
    embedded, state_dict = weights._split_checkpoint(obj, path)
    if embedded is None:
        raise ReleaseError(f"{path}: has no embedded config (expected ecdc train's model.th)")
    try:
        config = EncodecConfig.from_dict(embedded)
    except ValueError as exc:
        raise ReleaseError(f"{path}: {exc}") from None
    # Never release damaged weights: model.th stores their fingerprint (since ecdc wrote it).
    weights.check_stored_fingerprint(weights.stored_fingerprint(obj, path),
                                     weights.weights_fingerprint(state_dict), str(path))
    return path, data, config, dict(state_dict)


def _run_step(model_path: Path) -> int | None:
    """The training step model.th was exported at, when checkpoint.pt provably belongs to it.

    ``ecdc train`` writes checkpoint.pt, then model.th, at every save; a checkpoint.pt not
    newer than model.th, unchanged while read, is from the same save. Otherwise: None.
    """
    ckpt = model_path.with_name("checkpoint.pt")
    try:
        before = ckpt.stat().st_mtime_ns
        if before > model_path.stat().st_mtime_ns:
            return None
        step = int(torch.load(str(ckpt), map_location="cpu", weights_only=True, mmap=True)["step"])
        return step if ckpt.stat().st_mtime_ns == before else None
    except Exception:
        return None


def _quality(codec: Codec, wav: np.ndarray, rate: int, bandwidth: float) -> float:
    decoded, _ = codec.decode(codec.encode(wav, rate, bandwidth=bandwidth))
    ref = torch.from_numpy(wav[None]).float()
    est = torch.from_numpy(decoded[None, :, : wav.shape[-1]]).float()
    return float(si_sdr(ref, est)[0])


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)
    os.chmod(path, 0o644)  # atomic_output's temporary file is private; these are package/test data


def make_release(source: Path, version: int, description: str, family: str | None = None,
                 make_default: bool = True, replace: bool = False, root: Path | None = None,
                 audio: Path | None = None, log=print) -> dict[str, Any]:
    """Package ``source`` (a run directory or its model.th) as release ``version``; returns its entry."""
    root = Path(root) if root is not None else checkout_root()
    releases_dir = root / "ecdc" / weights.RELEASES_DIR.name
    manifest_path = releases_dir / weights.RELEASES_MANIFEST.name
    model_path, data, config, state_dict = _read_run(Path(source))
    family = family or config.name
    if not _FAMILY.fullmatch(family) or re.search(r"_v\d+$", family):
        raise ReleaseError(f"family name {family!r}: use lower case, digits and _, without a _vN suffix "
                           "(--family NAME)")
    if family in weights.available_models() and weights.available_models()[family].release is None:
        raise ReleaseError(f"{family!r} is already a model that is not one of ecdc's releases")
    if version < 1:
        raise ReleaseError("--version must be 1 or more")
    if not description.strip():
        raise ReleaseError("--description must say what the model is and how good it is")

    manifest = weights.read_manifest(manifest_path)
    entries: list[dict[str, Any]] = manifest["releases"]
    versions = sorted(int(e["version"]) for e in entries if e["family"] == family)
    newest = versions[-1] if versions else 0
    if version in versions:
        if not replace:
            raise ReleaseError(f"{family} v{version} exists; releases are never changed once published "
                               f"(the next is --version {newest + 1}; --replace re-packages an unpublished one)")
        if version != newest:
            raise ReleaseError(f"only the newest release (v{newest}) can be replaced, and only before it is published")
    elif version != newest + 1:
        raise ReleaseError(f"the next release of {family} is --version {newest + 1}")

    name = f"{family}_v{version}"
    release_config = dataclasses.replace(config, name=name)
    packed = release_state_dict(state_dict)
    # The release is what ecdc will load: build it, and check it fits and runs in float32.
    model = weights.build_model(release_config, packed, name)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and v.dtype != torch.float32]
    if bad:
        raise ReleaseError(f"the loaded release holds non-float32 tensors: {bad[:3]}")
    fingerprint = weights.weights_fingerprint(packed)
    parameters = sum(p.numel() for p in model.parameters())
    if weights.weights_fingerprint(model.state_dict()) != fingerprint:
        raise ReleaseError("the loaded release's fingerprint differs from its file's")

    buf = io.BytesIO()
    torch.save(weights.checkpoint_payload(release_config, packed), buf)  # with its fingerprint
    blob = buf.getvalue()
    sha = hashlib.sha256(blob).hexdigest()
    filename = f"{name}-{sha[:8]}.th"

    # fp32 (the run's) versus fp16 (the release's) weights on the same audio: rounding cost.
    rate = config.sample_rate
    source_model = weights.build_model(config, state_dict, str(model_path))
    pair = (Codec(source_model, weights.weights_fingerprint(state_dict)), Codec(model, fingerprint))
    clips = [("golden signal", golden_signal(rate), rate)]
    if audio is not None:
        frames = int(soundfile.info(str(audio)).samplerate * 10)
        wav, audio_rate = soundfile.read(str(audio), dtype="float32", always_2d=True, frames=frames)
        clips.append((Path(audio).name, np.ascontiguousarray(wav.T[:1]), audio_rate))
    quality = {}
    for label, wav, wav_rate in clips:
        for bw in (6.0, 24.0):
            fp32, fp16 = (_quality(c, wav, wav_rate, bw) for c in pair)
            quality[f"{label} @ {bw:g} kbps"] = {"fp32": round(fp32, 2), "fp16": round(fp16, 2)}
            log(f"SI-SDR {label} at {bw:g} kbps: run (fp32) {fp32:.2f} dB, release (fp16) {fp16:.2f} dB")
    del pair, source_model, model

    try:
        run = os.path.relpath(model_path.resolve(), root)
    except ValueError:
        run = str(model_path.resolve())
    entry = {
        "name": name,
        "family": family,
        "version": version,
        "file": filename,
        "sha256": sha,
        "fingerprint": fingerprint.hex(),
        "bytes": len(blob),
        "parameters": parameters,
        "released": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "description": description.strip(),
        "source": {"checkpoint": run, "sha256": hashlib.sha256(data).hexdigest(), "step": _run_step(model_path)},
        "quality_si_sdr_db": quality,
        "config": release_config.to_dict(),
    }

    releases_dir.mkdir(parents=True, exist_ok=True)
    old = [e for e in entries if e["family"] == family and int(e["version"]) == version]
    _write_bytes(releases_dir / filename, blob)
    for e in old:
        if e["file"] != filename and (releases_dir / e["file"]).exists():
            (releases_dir / e["file"]).unlink()
    entries = [e for e in entries if e not in old] + [entry]
    entries.sort(key=lambda e: (e["family"], int(e["version"])))
    manifest["releases"] = entries
    if make_default or manifest.get("default") is None:
        manifest["default"] = family
    _write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    log(f"wrote {releases_dir / filename} ({len(blob) / 1e6:.1f} MB, sha256 {sha[:16]}..., "
        f"fingerprint {fingerprint.hex()}) and {manifest_path}")

    if manifest_path.resolve() == weights.RELEASES_MANIFEST.resolve():
        weights.load_releases()
        write_golden(name, root / GOLDEN_DIR, log=log)
    else:  # a manifest elsewhere (tests): register it for the golden files, then restore
        weights.load_releases(manifest_path)
        try:
            write_golden(name, root / GOLDEN_DIR, log=log)
        finally:
            weights.load_releases()
    return entry


def write_golden(name: str, directory: Path, log=print) -> tuple[Path, Path, Path]:
    """(Re)write ``name``'s golden files: the test signal, its .ecdc, the decoded audio."""
    from ..codec import load_model

    codec = load_model(name, device="cpu")  # through the registry: exactly what users load
    directory.mkdir(parents=True, exist_ok=True)
    wav_path, ecdc_path, npy_path = (directory / f"{name}{ext}" for ext in (".wav", ".ecdc", ".npy"))
    with atomic_output(wav_path) as f:
        soundfile.write(f, golden_signal(codec.sample_rate).T, codec.sample_rate, subtype="PCM_16", format="WAV")
    compress_file(wav_path, ecdc_path, model=codec, bandwidth=GOLDEN_BANDWIDTH)
    with open(ecdc_path, "rb") as f:
        decoded, _ = codec.decode(EncodedAudio.read(f))
    buf = io.BytesIO()
    np.save(buf, decoded.astype(np.float32))
    _write_bytes(npy_path, buf.getvalue())
    for path in (wav_path, ecdc_path):
        os.chmod(path, 0o644)
    log(f"wrote golden files {wav_path}, {ecdc_path}, {npy_path}")
    return wav_path, ecdc_path, npy_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ecdc.train.release",
        description="Package RUN_DIR/model.th as release N of ecdc's bundled model (ecdc/releases/), "
                    "register it in releases.json and write its golden test files (tests/data/releases/).")
    parser.add_argument("run", metavar="RUN_DIR", type=Path, help="run directory (or its model.th)")
    parser.add_argument("--version", required=True, type=int, help="release number: the family's newest + 1")
    parser.add_argument("--description", required=True,
                        help="one line for `ecdc models`: what the model is and an honest note on its quality")
    parser.add_argument("--family", help="unversioned name (default: the run's model name, e.g. ecdc_24khz)")
    parser.add_argument("--no-default", dest="make_default", action="store_false",
                        help="do not make this family the model used when none is named")
    parser.add_argument("--replace", action="store_true",
                        help="re-package the newest version (only for a release not yet published)")
    parser.add_argument("--audio", type=Path, help="also report SI-SDR on (the first 10 s of) this file")
    args = parser.parse_args(argv)
    try:
        entry = make_release(args.run, args.version, args.description, family=args.family,
                             make_default=args.make_default, replace=args.replace, audio=args.audio)
    except EcdcError as exc:
        print(f"ecdc.train.release: error: {exc}", file=sys.stderr)
        return 1
    print(f"released {entry['name']}; now run: python -m pytest -q tests/test_releases.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
