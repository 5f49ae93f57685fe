"""Which files a training run uses: discovery, the train/valid split, folder groups.

Also what the data modules share: the pipeline's errors and warning, ``PathLike`` and
``FULL_SCALE``. See :mod:`ecdc.train.data` for the whole pipeline.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import EcdcError

PathLike = str | os.PathLike

#: File name endings (lower case) that :func:`find_audio_files` picks up; all are formats
#: libsndfile can decode (mp3 needs libsndfile >= 1.1).
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64",
})

#: int16 magnitude counted as full scale when looking for clipped crops.
FULL_SCALE = 32767


class DataError(EcdcError):
    """The training data cannot be used (no readable audio, bad folder or setting)."""


class CacheWriteError(DataError):
    """The decode cache cannot be written (full disk, permissions): fatal, not a skipped file."""


class DataWarning(UserWarning):
    """A file was skipped (unreadable, empty) but training can go on without it."""


def find_audio_files(folders: Sequence[PathLike],
                     extensions: Sequence[str] | None = None) -> list[Path]:
    """Audio files under ``folders``, recursively, in a deterministic order.

    Files of each folder are sorted by their relative path and the folders' lists joined
    in the order given; a file reached twice (nested folders) is kept once. Hidden files
    and folders (leading ``.``) are ignored; symlinked folders are followed once.
    """
    exts = AUDIO_EXTENSIONS if extensions is None else frozenset(e.lower() for e in extensions)
    seen = set()
    out: list[Path] = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise DataError(f"not a folder: {root}")
        found = []
        visited = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in visited:  # a symlink loop
                dirnames[:] = []
                continue
            visited.add((st.st_dev, st.st_ino))
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                    continue
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
        for _, path in sorted(found):
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def valid_hash(relative_path: str) -> float:
    """Where a file falls in [0, 1) for the hash split: SHA-1 of its relative POSIX path."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_files(files: Sequence[Path], roots: Sequence[Path],
                valid_fraction: float) -> tuple[list[Path], list[Path]]:
    """Split ``files`` into (train, valid) by a hash of each path relative to its root.

    Each file is taken relative to the first of ``roots`` that contains it, so the split
    depends neither on where the corpus lives nor on which other files exist. Order is kept.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    abs_roots = [Path(os.path.abspath(r)) for r in roots]
    train: list[Path] = []
    valid: list[Path] = []
    for file in files:
        rel = _relative_to_roots(file, abs_roots).as_posix()
        (valid if valid_hash(rel) < valid_fraction else train).append(Path(file))
    return train, valid


def folder_groups(files: Sequence[Path], roots: Sequence[Path]) -> list[str]:
    """Each file's first folder below the data folder holding it (``speech/a.wav`` ->
    ``speech``; a file directly in a data folder -> ``""``), for balanced sampling."""
    abs_roots = [Path(os.path.abspath(r)) for r in roots]
    labels: list[str] = []
    for file in files:
        parts = _relative_to_roots(file, abs_roots).parts
        labels.append(parts[0] if len(parts) > 1 else "")
    return labels


def _relative_to_roots(file: PathLike, abs_roots: Sequence[Path]) -> Path:
    """``file`` relative to the first of ``abs_roots`` (absolute paths) that contains it."""
    path = Path(os.path.abspath(file))
    for root in abs_roots:
        try:
            return path.relative_to(root)
        except ValueError:
            continue
    raise DataError(f"{file} is not inside any of the data folders")
