"""Writing output files so that a failure never leaves a half-written one behind.

:func:`atomic_output` is the one place ecdc writes an output file (conversions, training
checkpoints, releases); :func:`remove_temp_files` takes away what a killed writer left.
Torch-free, so every layer, training included, may use it without loading the codec.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import OutputError
from .messages import output_name
from .streams import STDIO

#: errno values that mean "the output cannot grow", and what usually causes them.
_WRITE_ERRNOS = {errno.ENOSPC: "disk full", errno.EFBIG: "a file-size limit or the file system's maximum",
                 errno.EDQUOT: "disk quota exceeded"}

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temp files are told apart by age alone
    fcntl = None  # type: ignore[assignment]

#: When this run started: a temp file of ours older than this was left by a killed run.
_RUN_START = time.time()
_TEMP_SUFFIX = ".tmp"
#: The characters of the 8-character middle of ``.NAME.XXXXXXXX.tmp`` (ours are hex; older
#: ecdc versions used tempfile.mkstemp, whose names use all of these).
_TEMP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Write an output so that a failure never leaves a half-written file behind.

    This is the one place ecdc writes output files; what it does depends on what ``path``
    is (docs/ROBUSTNESS.md, "Output safety"):

    * nothing, or a regular file: the data goes to a new ``.NAME.XXXXXXXX.tmp`` beside it,
      which is renamed over ``path`` only when complete. A failure (disk full, a signal, a
      corrupt input found half way) removes the temp file and leaves an existing file as it
      was. Without ``overwrite`` an existing file is refused, and the rename itself fails if
      a file appeared at ``path`` while writing (so of two concurrent writers one fails
      instead of one output being silently lost).
    * a character or block device, a FIFO or a socket: written directly, as ``cat > path``
      would; a special file is never replaced by a regular one (``-o /dev/null -f``).
    * a symlink: followed, and its final target gets these rules: a regular file is replaced
      at the target's path (the link stays), a device or FIFO is written directly. A
      dangling link is refused: ecdc does not create files where a link points.
    * a directory: refused.

    A new file gets mode ``0o666 & ~umask`` (and the directory's default ACL), as a plain
    ``open()`` gives, also when it replaces a file with other permissions. Temp files of the
    same pattern for the same output that a killed run left (older than this run, held by
    no live writer) are removed first.
    """
    shown = Path(path)
    kind, final = _output_target(shown, overwrite)
    if kind == "special":
        with _direct_output(shown) as handle:
            yield handle
        return
    remove_temp_files(final, older_than=_RUN_START)
    fd, tmp = _create_temp(final, shown)
    try:
        with os.fdopen(fd, "wb") as handle:
            _try_lock(fd)  # held until the rename: cleanup never takes a live writer's file
            yield handle
            handle.flush()
            os.fsync(fd)
            _commit(tmp, final, shown, overwrite)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write {shown}: {exc.strerror} ({_WRITE_ERRNOS[exc.errno]}); "
                              f"nothing was written", where="") from None
        raise


def _output_target(shown: Path, overwrite: bool) -> tuple[str, Path]:
    """``("special", path)`` to write directly, or ``("file", path)`` of the regular file to
    create or replace (a symlink's target); refusals as :class:`OutputError`."""
    try:
        info = os.stat(shown)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(shown):
            raise OutputError(f"cannot write {shown}: it is a symlink to {_link_text(shown)}, which does not "
                              f"exist (ecdc writes through links only to existing files)", where="") from None
        return "file", shown
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror or exc}", where="") from None
    if stat.S_ISDIR(info.st_mode):
        raise OutputError(f"cannot write {shown}: it is a directory", where="")
    if not overwrite:
        raise OutputError(f"{shown} exists; use -f to overwrite", where="")
    if not stat.S_ISREG(info.st_mode):
        return "special", shown
    if not os.path.islink(shown):
        return "file", shown
    final = Path(os.path.realpath(shown))
    try:
        same = os.path.samestat(info, os.stat(final))
    except OSError:
        same = False
    if not same:  # e.g. /proc/self/fd/N of a deleted file: no path to put a new file at
        raise OutputError(f"cannot write {shown}: its symlink does not lead to a path where a file can be replaced",
                          where="")
    return "file", final


def _link_text(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "a missing file"


def _create_temp(final: Path, shown: Path) -> tuple[int, Path]:
    """A new ``.NAME.XXXXXXXX.tmp`` beside ``final``, created with mode 0o666 so that the
    kernel applies the umask (and default ACLs) as for a plain open(); mkstemp's 0600
    would stay on the output."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    for _ in range(100):
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create {shown}: {exc.strerror or exc}", where="") from None
    raise OutputError(f"cannot create {shown}: no unused temporary name beside it", where="")


@contextlib.contextmanager
def _direct_output(shown: Path) -> Iterator[BinaryIO]:
    """Write straight into a device, FIFO or socket (opening a FIFO waits for a reader)."""
    try:
        fd = os.open(shown, os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))  # no O_CREAT
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror or exc}", where="") from None
    if stat.S_ISREG(os.fstat(fd).st_mode) or stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)  # replaced by a file since it was looked at: writing in place would not be atomic
        raise OutputError(f"cannot write {shown}: it was replaced while ecdc opened it", where="")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write {shown}: {exc.strerror} ({_WRITE_ERRNOS[exc.errno]})", where="") from None
        raise


def _commit(tmp: Path, final: Path, shown: Path, overwrite: bool) -> None:
    """Rename the finished temp file into place; without ``overwrite`` never over a file."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        rename_noreplace(tmp, final)
    except FileExistsError:
        raise OutputError(f"{shown} exists (created while ecdc was writing); use -f to overwrite", where="") from None


@contextlib.contextmanager
def stdout_failures() -> Iterator[None]:
    """Name standard output in the errors its writes fail with (a full disk behind ``-o - >
    file``), as :func:`atomic_output` names its file: the OSError names no file, and the
    command's line would blame the input."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS and exc.filename is None:
            raise OutputError(f"{exc.strerror} ({_WRITE_ERRNOS[exc.errno]})", where=output_name(STDIO)) from None
        raise


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that fails with FileExistsError when ``dst`` exists, atomically: Linux's
    renameat2(RENAME_NOREPLACE), else link(2) (which never replaces) and unlink."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # else: not on this file system
            raise OSError(err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(dst):  # no hard links here (FAT, some network file systems): not atomic
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


@functools.lru_cache(maxsize=None)
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (old glibc, some musl)
        return None


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if another process holds one
    (or the file system cannot tell: then the file is treated as held)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _is_temp_name(name: str, target_name: str) -> bool:
    """Whether ``name`` is exactly ``.TARGET.XXXXXXXX.tmp``; compared as strings, because
    output names may hold glob characters (``a*.ecdc``, ``[x].ecdc``)."""
    prefix = f".{target_name}."
    if len(name) != len(prefix) + 8 + len(_TEMP_SUFFIX):
        return False
    middle = name[len(prefix):-len(_TEMP_SUFFIX)]
    return name.startswith(prefix) and name.endswith(_TEMP_SUFFIX) and all(c in _TEMP_CHARS for c in middle)


def remove_temp_files(path: str | Path, older_than: float | None = None) -> list[str]:
    """Remove the temp files :func:`atomic_output` left for ``path`` (a killed process's).

    Only files named exactly ``.NAME.XXXXXXXX.tmp`` for this output are candidates, and of
    them only those no live process is writing (each writer holds an exclusive flock on its
    temp file until the rename) and, with ``older_than``, not modified since that time.
    Nothing else in the folder is ever touched. Returns the paths removed.
    """
    target = Path(path)
    if os.path.islink(target):
        target = Path(os.path.realpath(target))  # where atomic_output puts a link's temp file
    directory = target.parent
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed: list[str] = []
    for name in names:
        if not _is_temp_name(name, target.name):
            continue
        tmp = directory / name
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or (older_than is not None and info.st_mtime >= older_than):
                continue
            if not _try_lock(fd) or not os.path.samestat(info, os.lstat(tmp)):
                continue
            os.unlink(tmp)
            removed.append(str(tmp))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed



def make_parents(path: str) -> None:
    """Create the folders above ``path``; a loop, as os.makedirs recurses once per level."""
    missing = []
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent):
        missing.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not os.path.isdir(folder):  # another worker may have made it; a file may not
                raise
