"""What ``atomic_output`` does with the output path, in real processes (issue 12, round two;
issue 14): special files and symlinks given as outputs, temp files left by killed workers,
by signals and by a killed run, two writers racing for one output, and output permissions.

Inputs that must stay open while a test acts on a running ecdc are pipes the test feeds:
stdin, or FIFOs opened read-write by the test (so a FIFO has a writer, and data written
before ecdc opens it waits in the pipe)."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import soundfile

from ecdc.codec import EncodedAudio, compress_file, load_model

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform != "linux", reason="Linux only")


def _preexec(umask: Optional[int]) -> Callable[[], None]:
    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGQUIT on the old code: no core files
        if umask is not None:
            os.umask(umask)

    return setup


def _env() -> Dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def ecdc(*args: object, umask: Optional[int] = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], cwd=str(REPO), env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, preexec_fn=_preexec(umask))


def start(*args: object, session: bool = False) -> subprocess.Popen:
    """A running ecdc with a pipe on stdin (for ``-`` inputs the test feeds)."""
    return subprocess.Popen([sys.executable, "-m", "ecdc", *map(str, args)], cwd=str(REPO), env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_preexec(None), start_new_session=session)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for ``proc`` (its stdin closed); its stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return err.decode()


def one_error_line(returncode: int, stderr: str) -> str:
    assert returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecdc: error: "), lines
    return lines[0]


def listing(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


def temps(folder: Path) -> List[str]:
    return [name for name in listing(folder) if name.startswith(".") and name.endswith(".tmp")]


def wait_for(condition: Callable[[], bool], what: str, procs: List[subprocess.Popen], timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"ecdc exited ({proc.returncode}) before {what}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def wav_frames(path: Path) -> int:
    return soundfile.info(str(path)).frames


@pytest.fixture
def speech(tmp_path: Path) -> Path:
    src = tmp_path / "speech.wav"
    soundfile.write(str(src), test_signal(3.0, 24000).T, 24000, subtype="PCM_16")
    return src


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_mono_ckpt: Path) -> Dict[int, bytes]:
    """The bytes of .ecdc files of 6 s and 4 s (different audio), by length in seconds."""
    folder = tmp_path_factory.mktemp("packed")
    codec = load_model(checkpoint=str(tiny_mono_ckpt))
    out = {}
    for seconds in (6, 4):
        wav = folder / f"{seconds}.wav"
        soundfile.write(str(wav), test_signal(seconds, 24000, seed=seconds).T, 24000, subtype="PCM_16")
        compress_file(wav, folder / f"{seconds}.ecdc", codec)
        out[seconds] = (folder / f"{seconds}.ecdc").read_bytes()
    return out


def open_fifo(path: Path, data: bytes) -> int:
    """Make ``path`` a FIFO holding ``data`` for its reader, kept open (no EOF) until closed."""
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)  # Linux: does not wait for a reader, and counts as a writer
    os.write(fd, data)
    return fd


# --------------------------------------------------------------------------- item 1: special outputs


def test_force_writes_into_a_fifo_and_keeps_it(tmp_path: Path, speech: Path, tiny_mono_ckpt: Path) -> None:
    folder = tmp_path / "o3"
    folder.mkdir()
    fifo = folder / "live.ecdc"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        proc = ecdc("compress", "-q", "-f", "--checkpoint", tiny_mono_ckpt, "-o", fifo, speech)
        assert proc.returncode == 0, proc.stderr.decode()
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
        data, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
    assert EncodedAudio.from_bytes(data).num_samples == 3 * 24000
    assert listing(folder) == ["live.ecdc"]


def test_force_writes_into_a_character_device_and_keeps_it(tmp_path: Path, speech: Path,
                                                           tiny_mono_ckpt: Path) -> None:
    folder = tmp_path / "o3"
    folder.mkdir()
    node = folder / "mynull"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    proc = ecdc("compress", "-q", "-f", "--checkpoint", tiny_mono_ckpt, "-o", node, speech)
    assert proc.returncode == 0, proc.stderr.decode()
    info = os.lstat(node)
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3), "the device node was replaced"
    assert listing(folder) == ["mynull"]


def test_symlink_to_proc_self_fd_1_writes_to_stdout(tmp_path: Path, speech: Path, tiny_mono_ckpt: Path) -> None:
    link = tmp_path / "out.ecdc"
    link.symlink_to("/proc/self/fd/1")
    proc = ecdc("compress", "-q", "-f", "--checkpoint", tiny_mono_ckpt, "-o", link, speech)
    assert proc.returncode == 0, proc.stderr.decode()
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
    assert EncodedAudio.from_bytes(proc.stdout).num_samples == 3 * 24000
    assert temps(tmp_path) == []


def test_symlink_to_a_regular_file_replaces_the_target_and_keeps_the_link(tmp_path: Path, speech: Path,
                                                                          tiny_mono_ckpt: Path) -> None:
    real, out = tmp_path / "real", tmp_path / "out"
    real.mkdir()
    out.mkdir()
    (real / "old.ecdc").write_bytes(b"old")
    link = out / "link.ecdc"
    link.symlink_to("../real/old.ecdc")
    proc = ecdc("compress", "-q", "-f", "--checkpoint", tiny_mono_ckpt, "-o", link, speech)
    assert proc.returncode == 0, proc.stderr.decode()
    assert link.is_symlink() and os.readlink(link) == "../real/old.ecdc"
    assert EncodedAudio.from_bytes((real / "old.ecdc").read_bytes()).num_samples == 3 * 24000
    assert listing(out) == ["link.ecdc"] and listing(real) == ["old.ecdc"]


def test_dangling_symlink_and_directories_are_refused(tmp_path: Path, speech: Path, tiny_mono_ckpt: Path) -> None:
    link = tmp_path / "dangling.ecdc"
    link.symlink_to("nowhere.ecdc")
    proc = ecdc("compress", "-q", "-f", "--checkpoint", tiny_mono_ckpt, "-o", link, speech)
    line = one_error_line(proc.returncode, proc.stderr.decode())
    assert "symlink to nowhere.ecdc, which does not exist" in line
    assert link.is_symlink() and os.readlink(link) == "nowhere.ecdc" and not (tmp_path / "nowhere.ecdc").exists()
    # An output that is a directory stays refused, also through a link (``-o DIR`` itself
    # means "into DIR": here DIR/speech.ecdc is the directory).
    (tmp_path / "d1" / "speech.ecdc").mkdir(parents=True)
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "speech.ecdc").symlink_to("../d1/speech.ecdc")
    for folder in ("d1", "d2"):
        proc = ecdc("compress", "-q", "-f", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / folder, speech)
        assert "is a directory" in one_error_line(proc.returncode, proc.stderr.decode())
        assert temps(tmp_path / folder) == []
    assert listing(tmp_path / "d1" / "speech.ecdc") == [] and (tmp_path / "d2" / "speech.ecdc").is_symlink()


# --------------------------------------------------------------------------- item 2: killed workers


def _holder(path: Path) -> int:
    """The process that has ``path`` open."""
    wanted = os.path.realpath(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == wanted for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:
            continue
    raise AssertionError(f"no process has {path} open")


def test_killed_workers_temp_files_are_removed_by_exact_name(tmp_path: Path, packed: Dict[int, bytes],
                                                             tiny_mono_ckpt: Path) -> None:
    """Glob characters in output names: killing the worker on ``a*`` must not take
    ``abc``'s temp file (glob ``.a*.wav.*.tmp`` matched it), and the one on ``[x]`` must
    lose its own (glob ``.[x].wav.*.tmp`` did not match it)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    half = len(packed[6]) // 2
    fds = {name: open_fifo(src / f"{name}.ecdc", packed[6][:half]) for name in ("a*", "abc", "[x]")}
    proc = start("decompress", "-q", "-j", 3, "--checkpoint", tiny_mono_ckpt, *(src / f"{name}.ecdc" for name in fds),
                 "-o", out)
    try:
        wait_for(lambda: out.is_dir() and len(temps(out)) == 3, "all three temp files", [proc])
        by_name = {name.split(".wav.")[0][1:]: out / name for name in temps(out)}
        assert sorted(by_name) == ["[x]", "a*", "abc"], by_name
        for name in ("a*", "[x]"):
            os.kill(_holder(by_name[name]), signal.SIGKILL)
        os.write(fds["abc"], packed[6][half:])
        os.close(fds.pop("abc"))
        err = finish(proc)
    finally:
        proc.kill()
        for fd in fds.values():
            os.close(fd)
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("ecdc: error:")]
    assert len(errors) == 2 and all("worker process died" in line for line in errors), err
    assert listing(out) == ["abc.wav"]  # no temp file left, abc's output complete
    assert wav_frames(out / "abc.wav") == 6 * 24000


# --------------------------------------------------------------------------- item 15: signals, stale temp files


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_hangup_or_quit_while_writing_leaves_no_temp_file(tmp_path: Path, packed: Dict[int, bytes],
                                                          tiny_mono_ckpt: Path, sig: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = start("decompress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", out / "x.wav", "-")
    try:
        proc.stdin.write(packed[6][: len(packed[6]) // 2])
        proc.stdin.flush()
        wait_for(lambda: bool(temps(out)), "the temp file", [proc])
        proc.send_signal(sig)
        proc.wait(timeout=60)
        err = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert listing(out) == []


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_hangup_or_quit_in_a_batch_leaves_no_temp_files(tmp_path: Path, packed: Dict[int, bytes],
                                                        tiny_mono_ckpt: Path, sig: int) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    fds = [open_fifo(src / f"{name}.ecdc", packed[6][: len(packed[6]) // 2]) for name in ("a", "b")]
    proc = start("decompress", "-q", "-j", 2, "--checkpoint", tiny_mono_ckpt, src / "a.ecdc", src / "b.ecdc",
                 "-o", out, session=True)
    try:
        wait_for(lambda: out.is_dir() and len(temps(out)) == 2, "both temp files", [proc])
        os.killpg(proc.pid, sig)  # as a closed terminal or Ctrl-\ does: parent and workers
        proc.wait(timeout=60)
        err = finish(proc)
    finally:
        proc.kill()
        for fd in fds:
            os.close(fd)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert listing(out) == []


def test_stale_temp_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path: Path, speech: Path,
                                                                       tiny_mono_ckpt: Path) -> None:
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    stale = [".x.ecdc.abcd1234.tmp", ".x.ecdc.k_9zq0wy.tmp"]  # ecdc's names (now hex; mkstemp's before)
    kept = [".x.ecdc.abcd123.tmp", ".x.ecdc.abcd12345.tmp", ".x.ecdc.ABCD1234.tmp", ".x.ecdc.abcd.234.tmp",
            ".x.ecdc.abcd1234.tmp.bak", "x.ecdc.abcd1234.tmp", ".y.ecdc.abcd1234.tmp", ".x.ecdcabcd1234.tmp",
            ".X.ecdc.abcd1234.tmp"]
    held, fresh = ".x.ecdc.feedf00d.tmp", ".x.ecdc.0123abcd.tmp"
    hour_ago, in_an_hour = time.time() - 3600, time.time() + 3600
    for name in stale + kept + [held, fresh]:
        (out / name).write_bytes(b"partial")
        stamp = in_an_hour if name == fresh else hour_ago  # fresh: modified after the run started
        os.utime(out / name, (stamp, stamp))
    lock = os.open(out / held, os.O_RDONLY)  # a live writer holds its temp file locked
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = ecdc("compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", out / "x.ecdc", speech)
    finally:
        os.close(lock)
    assert proc.returncode == 0, proc.stderr.decode()
    assert listing(out) == sorted(kept + [held, fresh, "x.ecdc"])


# --------------------------------------------------------------------------- item 16: concurrent writers


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_two_writers_of_one_output(tmp_path: Path, packed: Dict[int, bytes], tiny_mono_ckpt: Path,
                                   force: bool) -> None:
    """Both start before the output exists; the second finishes first. Without -f the first
    must fail rather than silently replace it; with -f the last one wins."""
    out = tmp_path / "o"
    out.mkdir()
    target = out / "x.wav"
    flags = ["-f"] if force else []
    procs: List[subprocess.Popen] = []
    try:
        for seconds, expected_temps in ((6, 1), (4, 2)):
            proc = start("decompress", "-q", *flags, "--checkpoint", tiny_mono_ckpt, "-o", target, "-")
            procs.append(proc)
            proc.stdin.write(packed[seconds][: len(packed[seconds]) // 2])
            proc.stdin.flush()
            wait_for(lambda n=expected_temps: len(temps(out)) == n, f"{expected_temps} temp files", procs)
        first, second = procs
        second.stdin.write(packed[4][len(packed[4]) // 2:])
        err = finish(second)
        assert second.returncode == 0, err
        assert wav_frames(target) == 4 * 24000
        first.stdin.write(packed[6][len(packed[6]) // 2:])
        err = finish(first)
    finally:
        for proc in procs:
            proc.kill()
    if force:
        assert first.returncode == 0, err
        assert wav_frames(target) == 6 * 24000
    else:
        line = one_error_line(first.returncode, err)
        assert line.endswith(f"{target} exists (created while ecdc was writing); use -f to overwrite"), line
        assert wav_frames(target) == 4 * 24000  # the second writer's output is kept
    assert listing(out) == ["x.wav"]


# --------------------------------------------------------------------------- issue 14 item 2: permissions


def test_outputs_get_the_permissions_of_a_plain_open(tmp_path: Path, speech: Path, tiny_mono_ckpt: Path) -> None:
    """0o666 & ~umask (here 0o640), not mkstemp's 0600: single files, replaced files, batches."""
    out = tmp_path / "o"
    proc = ecdc("compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "single.ecdc", speech,
                umask=0o027)
    assert proc.returncode == 0, proc.stderr.decode()
    (tmp_path / "old.wav").write_bytes(b"old")
    os.chmod(tmp_path / "old.wav", 0o604)  # replaced with -f: gets the umask's mode, not this one
    proc = ecdc("decompress", "-q", "-f", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "old.wav",
                tmp_path / "single.ecdc", umask=0o027)
    assert proc.returncode == 0, proc.stderr.decode()
    for name in ("a", "b"):
        soundfile.write(str(tmp_path / f"{name}.wav"), test_signal(1.0, 24000).T, 24000, subtype="PCM_16")
    proc = ecdc("compress", "-q", "-j", 2, "--checkpoint", tiny_mono_ckpt, "-o", out, tmp_path / "a.wav",
                tmp_path / "b.wav", umask=0o027)
    assert proc.returncode == 0, proc.stderr.decode()
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in (tmp_path / "single.ecdc", tmp_path / "old.wav", out / "a.ecdc", out / "b.ecdc")}
    assert modes == {name: "0o640" for name in ("single.ecdc", "old.wav", "o/a.ecdc", "o/b.ecdc")}
