"""Named models: download from a loopback HTTP server, hash checks, caching, safe loading."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ecdc
from ecdc import weights
from ecdc.cli import main
from ecdc.errors import WeightsError
from ecdc.weights import ModelSpec, register_model, unregister_model

from conftest import TINY_MONO, random_model, test_signal


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_server(tmp_path):
    """Serve a fresh directory on 127.0.0.1; yields (directory, base_url, request_log)."""
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(_QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(directory))
    return directory


def _bare_state_dict_file(directory: Path, seed: int = 0) -> bytes:
    path = directory / "tmp.th"
    torch.save(random_model(TINY_MONO, seed).state_dict(), str(path))
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture
def registered_tiny(tmp_path):
    """Register a tiny model whose file name carries its real sha256 prefix."""
    data = _bare_state_dict_file(tmp_path)
    filename = f"tiny_mono-{hashlib.sha256(data).hexdigest()[:8]}.th"
    register_model(ModelSpec(TINY_MONO, filename))
    yield filename, data
    unregister_model(TINY_MONO.name)


def test_good_download_is_verified_and_cached(http_server, cache, registered_tiny, monkeypatch):
    root, url, requests = http_server
    filename, data = registered_tiny
    (root / filename).write_bytes(data)
    monkeypatch.setenv(weights.BASE_URL_ENV, url)

    codec = ecdc.load_model("tiny_mono")
    assert (cache / filename).read_bytes() == data
    assert requests == ["/" + filename]
    assert [p.name for p in cache.iterdir()] == [filename]  # no temp files left

    # Cached: a second load makes no request, and the model works.
    ecdc.load_model("tiny_mono")
    assert requests == ["/" + filename]
    encoded = codec.encode(test_signal(0.5, 24000), 24000, bandwidth=6)
    assert encoded.header.model_name == "tiny_mono"


def test_bad_hash_is_refused_and_not_cached(http_server, cache, registered_tiny, monkeypatch, tmp_path):
    root, url, _ = http_server
    filename, _ = registered_tiny
    (root / filename).write_bytes(_bare_state_dict_file(tmp_path, seed=3))  # other content, same name
    monkeypatch.setenv(weights.BASE_URL_ENV, url)
    with pytest.raises(WeightsError, match="sha256"):
        ecdc.load_model("tiny_mono")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_cached_file_with_the_wrong_hash_is_refused_and_kept(http_server, cache, registered_tiny, monkeypatch):
    """ecdc cannot tell a damaged download from a user's file copied in under the registered
    name (93 MB of someone's checkpoint were once deleted): it refuses it and leaves it."""
    root, url, requests = http_server
    filename, data = registered_tiny
    (root / filename).write_bytes(data)
    cache.mkdir()
    (cache / filename).write_bytes(data[:100])
    monkeypatch.setenv(weights.BASE_URL_ENV, url)
    with pytest.raises(WeightsError) as info:
        ecdc.load_model("tiny_mono")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{cache / filename}: its sha256 (")
    assert f"does not match the expected prefix {filename[10:18]}" in message
    assert "move it away" in message and "--checkpoint" in message
    assert (cache / filename).read_bytes() == data[:100]  # byte for byte
    assert requests == [] and [p.name for p in cache.iterdir()] == [filename]


def test_download_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    """A verified download is linked into place, not renamed over what is there: another
    ecdc's identical download is kept as is, anything else is refused and kept."""
    good = b"weights"
    prefix = hashlib.sha256(good).hexdigest()[:8]
    target = tmp_path / f"m-{prefix}.th"
    for present, refused in ((good, False), (b"someone else's", True)):
        target.write_bytes(present)
        tmp = tmp_path / ".part"
        tmp.write_bytes(good)
        if refused:
            with pytest.raises(WeightsError, match="does not match the expected prefix"):
                weights._move_into_cache(tmp, target, prefix)
        else:
            weights._move_into_cache(tmp, target, prefix)
        assert target.read_bytes() == present
        tmp.unlink()


def test_cli_refuses_a_foreign_file_in_the_cache_and_keeps_it(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / "encodec_24khz-d7cc33bc.th"
    torch.save(random_model(TINY_MONO, seed=9).state_dict(), str(cached))  # someone's own checkpoint
    before = cached.read_bytes()
    wav = tmp_path / "a.wav"
    import soundfile

    soundfile.write(str(wav), test_signal(0.2, 24000).T, 24000)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1",
           weights.CACHE_DIR_ENV: str(cache), weights.BASE_URL_ENV: _closed_port_url()}
    done = subprocess.run([sys.executable, "-m", "ecdc", "compress", str(wav), "--model", "encodec_24khz"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecdc: error: "), done.stderr[-2000:]
    assert f"{cached}: its sha256 (" in lines[0] and "Traceback" not in done.stderr
    assert "does not match the expected prefix d7cc33bc" in lines[0] and "--checkpoint" in lines[0]
    assert cached.read_bytes() == before and [p.name for p in cache.iterdir()] == [cached.name]
    assert not wav.with_suffix(".ecdc").exists()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_no_network_names_url_and_checkpoint_option(cache, monkeypatch, tmp_path):
    url = _closed_port_url()
    monkeypatch.setenv(weights.BASE_URL_ENV, url)
    wav = tmp_path / "a.wav"
    import soundfile

    soundfile.write(str(wav), test_signal(0.3, 24000).T, 24000)
    result = CliRunner().invoke(main, ["compress", str(wav), "--model", "encodec_24khz"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert url + "encodec_24khz-d7cc33bc.th" in line
    assert "--checkpoint" in line
    assert not cache.exists() or list(cache.iterdir()) == []
    assert not wav.with_suffix(".ecdc").exists()


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (os.devnull, self.marker))


def test_checkpoint_that_runs_code_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(str(marker))}, str(path))
    with pytest.raises(WeightsError, match="weights-only"):
        ecdc.load_model(str(path))
    assert not marker.exists()


def test_state_dict_that_does_not_fit_is_a_clear_error(tmp_path):
    path = tmp_path / "wrong.th"
    state = random_model(TINY_MONO).state_dict()
    state.pop(next(iter(state)))
    torch.save({"config": TINY_MONO.to_dict(), "state_dict": state}, str(path))
    with pytest.raises(WeightsError, match="do not fit"):
        ecdc.load_model(str(path))


def test_bare_state_dict_with_model_name(tmp_path, registered_tiny):
    _, data = registered_tiny
    path = tmp_path / "weights.th"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match="--model"):
        ecdc.load_model(checkpoint=str(path))
    assert ecdc.load_model("tiny_mono", checkpoint=str(path)).name == "tiny_mono"


def test_fingerprint_ignores_storage_precision():
    state = random_model(TINY_MONO).state_dict()
    halved = {k: (v.half().float() if v.is_floating_point() else v) for k, v in state.items()}
    as_half = {k: (v.half() if v.is_floating_point() else v) for k, v in halved.items()}
    assert weights.weights_fingerprint(halved) == weights.weights_fingerprint(as_half)
    assert weights.weights_fingerprint(state) != weights.weights_fingerprint(random_model(TINY_MONO, 1).state_dict())


@pytest.mark.parametrize("zipfile", [True, False], ids=["mapped", "legacy-format"])
def test_mapped_checkpoint_pages_released_after_hashing_are_intact(tmp_path, zipfile):
    """Checkpoints are memory-mapped and each tensor's pages dropped once hashed (so the
    half of the model a process never uses takes no memory); the data must come back
    from the file unchanged. torch's legacy format cannot be mapped and is read whole."""
    model = random_model(TINY_MONO, seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "w.th"
    torch.save({"config": TINY_MONO.to_dict(), "state_dict": state}, path,
               _use_new_zipfile_serialization=zipfile)
    loaded, fingerprint = weights.load_weights(checkpoint=str(path))
    assert fingerprint == weights.weights_fingerprint(state)
    for key, value in loaded.state_dict().items():  # read back after the release
        assert torch.equal(value, state[key]), key
    assert weights.weights_fingerprint(loaded.state_dict()) == fingerprint
    wav = torch.from_numpy(test_signal(1.0, 24000)[None]).float()
    with torch.inference_mode():
        assert torch.equal(loaded.encode(wav, 6.0)[0].codes, model.encode(wav, 6.0)[0].codes)


def test_state_dict_with_non_tensors_is_refused(tmp_path):
    path = tmp_path / "w.th"
    torch.save({"config": TINY_MONO.to_dict(), "state_dict": {"a": 1}}, path)
    with pytest.raises(WeightsError, match="other than named tensors"):
        weights.load_weights(checkpoint=str(path))


def test_loading_weights_stays_out_of_torchs_symbolic_machinery(tiny_mono_ckpt):
    """Building the model on the meta device must not run torch's Python decompositions:
    their first use imports sympy and ~800 modules, ~65 MiB of resident memory in every
    CLI process (the streaming memory target is a few hundred MiB)."""
    script = (
        "import sys, torch\n"
        "from ecdc import weights\n"
        "assert 'sympy' not in sys.modules, 'torch itself imported sympy'\n"
        f"model, _ = weights.load_weights(checkpoint={str(tiny_mono_ckpt)!r})\n"
        "with torch.inference_mode():\n"
        "    model.decode(model.encode(torch.zeros(1, 1, 24000), 6.0))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sympy', 'mpmath')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
