"""Model registry, weight cache and verified downloads.

A model is known by name (``encodec_24khz``) or given as a checkpoint path. Downloaded
checkpoints are verified against the sha256 prefix in their file name before they are
cached (a cached file that does not match is refused, never deleted: ecdc cannot know it
put it there), and every checkpoint is loaded with ``weights_only=True``: a checkpoint is
untrusted input and must never be able to run code, nor (through its config) make ecdc
build more than its weights hold: the config is checked against the state dict's shapes
before the model is built (:func:`check_config_fits`). ecdc's own checkpoints store their
weights fingerprint, and files named ``<model>-<sha256 prefix>.th`` state their hash:
both are checked on load, so a damaged copy is refused rather than used.

ecdc's own models ship inside the package, in ``ecdc/releases/``: ``releases.json`` (the
one list of releases, written by ``python -m ecdc.train.release``) and one fp16 weights
file per release. Each release has a versioned name (``ecdc_24khz_v1``), which is what
files record in their header, so a file always decodes with the release that wrote it;
the unversioned family name (``ecdc_24khz``) means the family's newest release, and the
manifest's ``default`` family is what is used when no model is named. Releases are never
removed: every file ever written must stay decodable.

Reading and checking a checkpoint file (weights-only loading, config fit, fingerprints,
building the model) is in :mod:`ecdc.checkpoint`, whose public names this module
re-exports; this one holds what is named: the registry, the bundled releases, the
download cache, and :func:`load_weights`, which puts them together.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import (
    FINGERPRINT_KEY,
    TRAINING_STATISTICS,
    _load_checkpoint_file,
    _release_mapped_pages,
    _split_checkpoint,
    build_model,
    check_config_fits,
    check_stored_fingerprint,
    checkpoint_payload,
    compare_layout,
    inference_state_dict,
    model_layout,
    parse_config,
    stored_fingerprint,
    weights_fingerprint,
)
from .errors import ModelError, WeightsError
from .hf import is_hf_dir, is_hf_name, load_hf_checkpoint, snapshot_dir
from .models.encodec import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ, EncodecConfig, EncodecModel
from .outputs import rename_noreplace

__all__ = [
    "DEFAULT_BASE_URL", "BASE_URL_ENV", "CACHE_DIR_ENV", "DOWNLOAD_TIMEOUT_S",
    "ModelSpec", "register_model", "unregister_model", "available_models", "aliases", "resolve_name",
    "is_known", "get_spec",
    "RELEASES_DIR", "RELEASES_MANIFEST", "DEFAULT_MODEL", "default_model", "read_manifest", "load_releases",
    "release_history",
    "cache_dir", "base_url", "expected_hash_prefix", "download_checkpoint", "load_weights",
    "MAX_CACHED_CANDIDATES", "cached_checkpoints", "holds_other_weights", "checkpoint_needed_message",
    "DETECTABLE", "detect_config",
    # from ecdc.checkpoint
    "parse_config", "check_config_fits", "weights_fingerprint", "FINGERPRINT_KEY", "checkpoint_payload",
    "stored_fingerprint", "check_stored_fingerprint", "TRAINING_STATISTICS", "inference_state_dict",
    "build_model", "model_layout", "compare_layout",
]

#: Meta's official download address for the released EnCodec checkpoints.
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/encodec/v0/"
BASE_URL_ENV = "ECDC_WEIGHTS_URL"
CACHE_DIR_ENV = "ECDC_CACHE_DIR"
DOWNLOAD_TIMEOUT_S = 30.0

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class ModelSpec:
    """Where a named model's weights come from.

    ``filename`` is fetched from the base URL into the cache unless ``packaged`` names
    a file shipped inside the ``ecdc`` package (relative to it, or absolute).
    """

    config: EncodecConfig
    filename: str
    packaged: str | None = None
    description: str = ""
    #: hex weights fingerprint the loaded weights must have (bundled releases), or None
    fingerprint: str | None = None
    #: the release's entry in releases.json (bundled releases), else None
    release: Mapping[str, Any] | None = field(default=None, compare=False)


_REGISTRY: dict[str, ModelSpec] = {}
#: unversioned family name -> the versioned name of its newest bundled release
_ALIASES: dict[str, str] = {}


def register_model(spec: ModelSpec) -> None:
    """Make a model loadable by name (used for the built-in models and by tests/plugins)."""
    _REGISTRY[spec.config.name] = spec


def unregister_model(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_models() -> dict[str, ModelSpec]:
    """The models loadable by their own (for releases: versioned) name."""
    return dict(_REGISTRY)


def aliases() -> dict[str, str]:
    """Family names and the release each stands for (``ecdc_24khz`` -> ``ecdc_24khz_v1``)."""
    return dict(_ALIASES)


def resolve_name(name: str) -> str:
    """The registered name ``name`` stands for: an alias's release, else ``name`` itself."""
    return _ALIASES.get(name, name)


def is_known(name: str) -> bool:
    return name in _REGISTRY or name in _ALIASES


register_model(ModelSpec(ENCODEC_24KHZ, "encodec_24khz-d7cc33bc.th",
                         description="Meta's EnCodec 24 kHz mono (downloaded on first use)"))
register_model(ModelSpec(ENCODEC_48KHZ, "encodec_48khz-7e698e3e.th",
                         description="Meta's EnCodec 48 kHz stereo (downloaded on first use)"))

#: Where the bundled releases live, and their manifest.
RELEASES_DIR = Path(__file__).parent / "releases"
RELEASES_MANIFEST = RELEASES_DIR / "releases.json"

#: Name of the model used when the user names none (a family alias); None while no
#: release is bundled. Set from releases.json by :func:`load_releases`.
DEFAULT_MODEL: str | None = None


def default_model() -> str | None:
    return DEFAULT_MODEL


def read_manifest(path: Path = RELEASES_MANIFEST) -> dict[str, Any]:
    """releases.json as a dict (``{"default": None, "releases": []}`` when there is none)."""
    if not path.is_file():
        return {"default": None, "releases": []}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("releases"), list):
        raise ModelError("not a releases manifest", where=path)
    return manifest


def load_releases(path: Path = RELEASES_MANIFEST) -> None:
    """(Re)register the bundled releases listed in ``path``, their aliases and the default."""
    global DEFAULT_MODEL
    for spec in [s for s in _REGISTRY.values() if s.release is not None]:
        unregister_model(spec.config.name)
    _ALIASES.clear()
    manifest = read_manifest(path)
    newest: dict[str, tuple[int, str]] = {}
    for entry in manifest["releases"]:
        config = EncodecConfig.from_dict(entry["config"])
        if config.name != entry["name"]:
            raise ModelError(f"release {entry['name']!r} has config name {config.name!r}", where=path)
        register_model(ModelSpec(config, entry["file"], packaged=str(path.parent / entry["file"]),
                                 description=entry.get("description", ""), fingerprint=entry["fingerprint"],
                                 release=entry))
        family, version = entry["family"], int(entry["version"])
        if family not in newest or version > newest[family][0]:
            newest[family] = (version, entry["name"])
    _ALIASES.update({family: name for family, (_, name) in newest.items()})
    default = manifest.get("default")
    if default is not None and default not in _ALIASES:
        raise ModelError(f"default {default!r} names no bundled release family", where=path)
    DEFAULT_MODEL = default


def release_history(family: str | None = None) -> list[ModelSpec]:
    """The bundled releases' specs, newest first (of one family, or all)."""
    releases = [(s, r) for s in _REGISTRY.values() if (r := s.release) is not None
                and (family is None or r["family"] == family)]
    return [s for s, _ in sorted(releases, key=lambda sr: (sr[1]["family"], -int(sr[1]["version"])))]


load_releases()


def cache_dir() -> Path:
    """Directory holding downloaded checkpoints (``$ECDC_CACHE_DIR`` overrides)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ecdc"


#: At most this many checkpoints of one model name are tried from the cache (each is loaded in full).
MAX_CACHED_CANDIDATES = 8
_CHECKPOINT_SUFFIXES = (".th", ".pt", ".pth")


def cached_checkpoints(model_name: str, directory: Path | None = None) -> list[Path]:
    """Checkpoint files in the cache named for ``model_name`` (``NAME.th``, or
    ``NAME-anything.th``; ``.pt`` and ``.pth`` too), sorted, at most
    :data:`MAX_CACHED_CANDIDATES`: where ``decompress`` looks for the weights of a file that
    was made with ``--checkpoint`` when none is given (a user may keep them there)."""
    directory = Path(directory) if directory is not None else cache_dir()
    try:
        names = sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
    except OSError:
        return []  # no cache (yet), or unreadable: nothing to find
    found = [directory / n for n in names if n.endswith(_CHECKPOINT_SUFFIXES)
             and (os.path.splitext(n)[0] == model_name or n.startswith(model_name + "-"))]
    return found[:MAX_CACHED_CANDIDATES]


def holds_other_weights(name: str, fingerprint: bytes | None) -> bool:
    """Whether the registered model ``name`` certainly does not have the weights
    ``fingerprint`` (a bundled release states its own; Meta's are known only once loaded)."""
    spec = _REGISTRY.get(resolve_name(name))
    return fingerprint is not None and spec is not None and spec.fingerprint is not None \
        and spec.fingerprint != fingerprint.hex()


def checkpoint_needed_message(name: str, fingerprint: bytes | None) -> str:
    """Why a file whose weights ecdc cannot find by itself (made with ``--checkpoint``)
    cannot be decoded, and what to pass."""
    if is_known(name):
        spec = _REGISTRY[resolve_name(name)]
        shown = f" (weights {fingerprint.hex()[:16]}, not {spec.fingerprint[:16]})" \
            if fingerprint is not None and spec.fingerprint else ""
        what = f"encoded with other weights than ecdc's model {name!r}{shown}, e.g. with --checkpoint"
    else:
        what = f"encoded with model {name!r}, which ecdc does not know by name (made with --checkpoint?)"
    return (f"{what}; no checkpoint of that name with these weights is in {cache_dir()} either: decompress "
            f"with the same --checkpoint PATH it was compressed with (or copy that file into the cache as "
            f"{name}.th, where ecdc finds it)")


def base_url() -> str:
    url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return url if url.endswith("/") else url + "/"


def expected_hash_prefix(filename: str) -> str:
    """The sha256 prefix a checkpoint's file name promises (``name-<hex>.th``)."""
    match = _HASH_IN_NAME.search(filename)
    if not match:
        raise WeightsError(f"checkpoint name {filename!r} carries no sha256 prefix", where="")
    return match.group(1)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_checkpoint(filename: str, *, url: str | None = None,
                        directory: Path | None = None,
                        progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Return the cached path of ``filename``, downloading and verifying it if needed.

    The file is streamed into a temporary file inside the cache directory and only
    moved into place once its sha256 matches the prefix in its name, so the cache never
    holds an unverified file of ecdc's. A file already there under that name whose hash
    does not match is refused, never deleted or overwritten: ecdc cannot know it wrote it
    (a user's own checkpoint copied in under Meta's name was once removed). The only file
    ecdc removes is its own temporary one.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / filename
    prefix = expected_hash_prefix(filename)
    if target.is_file():
        _check_cached(target, prefix)
        return target
    url = url or base_url() + filename
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the cache directory: {exc.strerror or exc}", where=directory) from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=directory)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    done = 0
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise WeightsError(
                    f"cannot download {url}: {reason}. Without network access, download it "
                    f"elsewhere and pass it with --checkpoint PATH, or place it in {directory}", where=""
                ) from None
        actual = digest.hexdigest()
        if not actual.startswith(prefix):
            raise WeightsError(
                f"downloaded {url} has sha256 {actual[:16]}..., expected a prefix {prefix}: "
                "refusing to use it", where=""
            )
        _move_into_cache(tmp, target, prefix)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _check_cached(target: Path, prefix: str) -> None:
    """Refuse, leaving it as it is, a cached file whose sha256 is not the one its name states."""
    try:
        actual = _sha256_of(target)
    except OSError as exc:
        raise WeightsError(f"cannot read this cached checkpoint: {exc.strerror or exc}", where=target) from None
    if not actual.startswith(prefix):
        raise WeightsError(
            f"its sha256 ({actual[:16]}...) does not match the expected prefix {prefix}; ecdc leaves "
            "the file as it is: move it away (or delete it yourself) to download it again, or pass it with "
            "--checkpoint PATH if it is your own checkpoint", where=target
        )


def _move_into_cache(tmp: Path, target: Path, prefix: str) -> None:
    """Put a verified download at ``target`` without replacing a file that appeared there
    meanwhile (another ecdc's download is kept; anything else is refused, not overwritten)."""
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        _check_cached(target, prefix)


#: Architectures recognised from a bare state dict's key names and shapes: Meta's
#: checkpoints hold no config, and their layouts differ (channels, norm, codebooks).
DETECTABLE: tuple[EncodecConfig, ...] = (ENCODEC_24KHZ, ENCODEC_48KHZ, ENCODEC_32KHZ)


def detect_config(state_dict: Mapping[str, Any], source: str) -> EncodecConfig | None:
    """The one architecture of :data:`DETECTABLE` whose every key and shape ``state_dict``
    has (None if none does); two matching would be ambiguous, and is refused."""
    matches = [c for c in DETECTABLE if compare_layout(state_dict, model_layout(c)).matches]
    if len(matches) > 1:
        raise WeightsError(f"the state dict matches several architectures "
                           f"({', '.join(c.name for c in matches)}); pass --model NAME", where=source)
    return matches[0] if matches else None


def _no_layout_message(path: Path, state_dict: Mapping[str, Any]) -> str:
    """What a bare state dict of no known architecture holds, and the closest one (the
    message about ``path``, which does not name it)."""
    n = len(state_dict)
    found = f"a state dict of {n} tensor{'' if n == 1 else 's'} that matches no known EnCodec layout"
    differences = [(c.name, compare_layout(state_dict, model_layout(c))) for c in DETECTABLE]
    shared = [(name, d) for name, d in differences if d.shared]
    if shared:
        name, closest = min(shared, key=lambda nd: nd[1].size)
        found += f" (closest: {name}, {closest.describe()})"
    elif n:
        found += f" (it shares no key with {' or '.join(name for name, _ in differences)})"
    return (f"{found}; pass --model NAME for another registered architecture (ecdc models "
            f"lists them), or put its config in {path.with_suffix('.json').name}")


def _config_for_path(path: Path, embedded: dict | None, model_name: str | None,
                     state_dict: Mapping[str, Any]) -> EncodecConfig:
    """The architecture of a checkpoint file, in order: the config it embeds (ecdc's own),
    its ``.json`` sidecar, the model the user names (checked against the weights when
    built), the known layout its keys and shapes match (Meta's), a registered name its
    file name starts with; else a one-line error saying what the file holds."""
    if embedded is not None:
        return parse_config(embedded, f"{path}")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            raw = json.loads(sidecar.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise WeightsError(f"invalid model config: {exc}", where=sidecar) from None
        return parse_config(raw, str(sidecar))
    if model_name is not None:
        return get_spec(model_name).config
    detected = detect_config(state_dict, str(path))
    if detected is not None:
        return detected
    for spec in _REGISTRY.values():
        if path.name.startswith(spec.config.name + "-") or path.stem == spec.config.name:
            return spec.config
    raise WeightsError(_no_layout_message(path, state_dict), where=path)


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered name or family alias (``ecdc_24khz`` gives its newest release)."""
    try:
        return _REGISTRY[resolve_name(name)]
    except KeyError:
        known = sorted(set(_REGISTRY) | set(_ALIASES))
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(known)}", where="") from None


def _check_promised_sha256(path: Path) -> None:
    """Verify a file named like Meta's checkpoints and ecdc's releases, ``<model>-<sha256
    prefix>.th`` with a registered model name: its name states its hash (only such names:
    a user's ``run-20261201.th`` promises nothing)."""
    match = _HASH_IN_NAME.search(path.name)
    if match is None or path.name[:match.start()] not in _REGISTRY or not path.is_file():
        return
    try:
        actual = _sha256_of(path)
    except OSError:
        return  # unreadable: the load says why
    if not actual.startswith(match.group(1)):
        raise WeightsError(f"the file is damaged: its sha256 is {actual[:16]}..., its name promises "
                           f"{match.group(1)}; download or copy it again", where=path)


def load_weights(name: str | None = None, checkpoint: str | None = None,
                 progress: Callable[[int, int | None], None] | None = None
                 ) -> tuple[EncodecModel, bytes]:
    """Load a model by registry name and/or checkpoint path; return it and its fingerprint.

    A transformers checkpoint (a directory with config.json, or ``hf:OWNER/NAME`` in the
    local Hugging Face cache, as ``checkpoint`` or as ``name``) is read by :mod:`ecdc.hf`:
    its config.json gives the architecture, and its weights are renamed to Meta's before
    they are hashed, so the fingerprint is the one of the same weights in Meta's layout.
    """
    hf_dir = _hf_directory(name, checkpoint)
    if hf_dir is not None:
        config, tensors, path, mapped = load_hf_checkpoint(hf_dir)
        state_dict: Mapping[str, Any] = tensors
        stored, embedded, source = None, None, str(path)
    elif checkpoint is not None:
        path = Path(checkpoint)
        _check_promised_sha256(path)
        loaded, mapped = _load_checkpoint_file(path)
        embedded, state_dict = _split_checkpoint(loaded, path)
        stored = stored_fingerprint(loaded, path)
        del loaded
        config = _config_for_path(path, embedded, name, state_dict)
        source = str(path)
    else:
        if name is None:
            raise ModelError(_no_default_message(), where="")
        spec = get_spec(name)
        name = spec.config.name
        if spec.packaged is not None:
            path = Path(__file__).parent / spec.packaged
        else:
            path = download_checkpoint(spec.filename, progress=progress)
        loaded, mapped = _load_checkpoint_file(path)
        embedded, state_dict = _split_checkpoint(loaded, path)
        stored = stored_fingerprint(loaded, path)
        del loaded
        config = spec.config
        source = str(path)
    # The checkpoint's keys are the model's (build_model loads strictly), so its
    # fingerprint is the model's. Hashed before the model exists: a mapped file's pages
    # are released as they are hashed, before anything can have written to them.
    fingerprint = weights_fingerprint(state_dict, _release_mapped_pages if mapped else None)
    check_stored_fingerprint(stored, fingerprint, source)
    if (checkpoint is None and hf_dir is None and spec.fingerprint is not None
            and fingerprint.hex() != spec.fingerprint):
        raise WeightsError(f"these are not the weights of release {name!r} (fingerprint "
                           f"{fingerprint.hex()[:16]}, expected {spec.fingerprint[:16]}): the installation "
                           "is damaged; reinstall ecdc", where=source)
    model = build_model(config, state_dict, source)
    del state_dict, embedded  # the model holds the tensors it needs now
    return model, fingerprint


def _hf_directory(name: str | None, checkpoint: str | None) -> Path | None:
    """The transformers checkpoint directory ``name`` or ``checkpoint`` means, if any: an
    ``hf:`` name (looked up in the local Hugging Face cache; a path of that name wins) or a
    directory holding config.json."""
    if checkpoint is not None:
        if is_hf_name(checkpoint) and not os.path.exists(checkpoint):
            return snapshot_dir(checkpoint)
        path = Path(checkpoint)
        if path.is_dir() and not is_hf_dir(path):
            raise WeightsError("a directory without config.json: neither a checkpoint file nor a transformers "
                               "EncodecModel directory", where=path)
        return path if is_hf_dir(path) else None
    if name is not None and is_hf_name(name):
        return snapshot_dir(name)
    return None


def _no_default_message() -> str:
    return (
        "no model given and ecdc does not ship a default model yet: pass --model encodec_24khz "
        "(or encodec_48khz), which downloads Meta's weights on first use, or --checkpoint PATH"
    )
