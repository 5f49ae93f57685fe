"""Hostile input, round two (issue 12), through the real command line in subprocesses.

Endless devices and pipes are refused with bounded memory; named pipes, devices and
sockets found in a ``-r`` tree are skipped with a warning instead of blocking the batch;
a tree deeper than Python's recursion limit is walked; and file names that are not
UTF-8 or are very long are converted like any other.

Every run is capped (address space, wall time, killed with its whole process group), so
on code without these fixes a test fails quickly instead of eating the machine. Peak
memory (``ru_maxrss``) is measured around each run by a small launcher process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Tuple, Union

import pytest
import soundfile

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="POSIX only")

#: Peak resident memory allowed for a refused endless input.
RSS_LIMIT_MB = 600
#: Address-space cap of each run: old code reading /dev/zero stops here, not at the machine's RAM.
AS_LIMIT = 3 << 30

# Runs argv[3:] with its address space capped at argv[1] bytes, then writes the peak RSS of
# its children (KiB) to the file argv[2] and exits with the child's status.
_LAUNCHER = """
import resource, subprocess, sys
limit = int(sys.argv[1])
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
code = subprocess.call(sys.argv[3:], preexec_fn=cap)
with open(sys.argv[2], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""

Arg = Union[str, bytes, os.PathLike]


class Run:
    """What one ``ecdc`` run did: exit status, output, and peak RSS in MB."""

    def __init__(self, returncode: int, stdout: bytes, stderr: bytes, rss_mb: float):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr.decode("utf-8", "backslashreplace")
        self.rss_mb = rss_mb

    def lines(self, level: str) -> List[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith(f"ecdc: {level}: ")]


def ecdc(tmp_path: Path, *args: Arg, stdin=None, timeout: float = 90) -> Run:
    """``python -m ecdc ARGS`` in the repository, capped, in its own process group."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rss_file = tmp_path / f".rss-{os.urandom(4).hex()}"
    argv: List[Arg] = [sys.executable, "-c", _LAUNCHER, str(AS_LIMIT), str(rss_file),
                       sys.executable, "-m", "ecdc", *[a if isinstance(a, bytes) else str(a) for a in args]]
    proc = subprocess.Popen(argv, cwd=str(REPO), env=env, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and any workers: its own session
        proc.communicate()
        pytest.fail(f"ecdc {' '.join(map(repr, args))} did not finish within {timeout} s")
    try:
        rss_mb = int(rss_file.read_text()) / 1024
        rss_file.unlink()
    except (OSError, ValueError):
        rss_mb = float("nan")
    return Run(proc.returncode, out, err, rss_mb)


def one_error_line(run: Run, *needles: str) -> str:
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecdc: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def bounded(run: Run, what: str) -> None:
    print(f"peak RSS of {what}: {run.rss_mb:.0f} MB")
    assert run.rss_mb < RSS_LIMIT_MB, f"{what} peaked at {run.rss_mb:.0f} MB"


def write_wav(path: Union[Path, bytes], seconds: float = 0.3, rate: int = 16000, seed: int = 0) -> None:
    """A short WAV; ``path`` may be bytes (names that are not UTF-8)."""
    with open(path, "wb") as f:
        soundfile.write(f, test_signal(seconds, rate, seed=seed).T, rate, format="WAV", subtype="PCM_16")


def wav_frames(path: Union[Path, bytes]) -> Tuple[int, int]:
    with open(path, "rb") as f:
        info = soundfile.info(f)
    return info.samplerate, info.frames


def remove_tree(root: Path) -> None:
    """rmtree without recursion (shutil.rmtree recurses once per level)."""
    if not os.path.lexists(root):
        return
    folders = []
    stack = [os.fsencode(root)]
    while stack:
        folder = stack.pop()
        folders.append(folder)
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                os.unlink(entry.path)
    for folder in reversed(folders):
        os.rmdir(folder)


# --------------------------------------------------------------------------- 6: endless input


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_info_on_an_endless_device_reads_only_its_first_bytes(tmp_path: Path, device: str) -> None:
    run = ecdc(tmp_path, "info", device, timeout=60)
    one_error_line(run, f"{device}: ", "not an .ecdc stream")
    bounded(run, f"ecdc info {device}")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "stdin"])
def test_compress_of_an_endless_device_is_refused_at_once(tmp_path: Path, tiny_mono_ckpt: Path,
                                                          device: str) -> None:
    out = tmp_path / "out.ecdc"
    if device == "stdin":
        with open("/dev/zero", "rb") as zeros:
            run = ecdc(tmp_path, "compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", out, "-", stdin=zeros,
                       timeout=60)
    else:
        run = ecdc(tmp_path, "compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", out, device, timeout=60)
    line = one_error_line(run)
    if device == "/dev/urandom":
        # 1 in ~2000 random starts looks like an MP3 frame: then the buffer limit stops it.
        assert "Format not recognised" in line or "MiB limit" in line, line
    else:
        assert "Format not recognised" in line, line
    bounded(run, f"ecdc compress {device}")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".rss")) == []


def test_endless_pipe_that_looks_like_flac_is_refused_at_the_buffer_limit(tmp_path: Path,
                                                                         tiny_mono_ckpt: Path) -> None:
    """Not WAV, so it must be buffered to be decoded: only up to a stated limit."""
    read_end, write_end = os.pipe()

    def feed() -> None:
        piece = bytes(1 << 20)
        try:
            with open(write_end, "wb", buffering=0) as f:
                f.write(b"fLaC" + piece)
                while True:
                    f.write(piece)
        except OSError:  # the reader exited (EPIPE)
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        with open(read_end, "rb", buffering=0) as stdin:
            run = ecdc(tmp_path, "compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "out.ecdc",
                       "-", stdin=stdin, timeout=120)
    finally:
        feeder.join(timeout=10)
    line = one_error_line(run, "<stdin>: ", "256 MiB limit", "give it as a file", "ffmpeg")
    assert "not PCM WAV" in line
    bounded(run, "ecdc compress - (endless fLaC... pipe)")
    assert not (tmp_path / "out.ecdc").exists()


def test_special_files_in_a_tree_are_skipped_with_a_warning(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    """A link to /dev/zero, a link to /dev/null and a socket, named like audio, in a -r tree."""
    root = tmp_path / "in"
    root.mkdir()
    write_wav(root / "a.wav")
    os.symlink("/dev/zero", root / "z.wav")
    os.symlink("/dev/null", root / "n.flac")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(root / "s.wav"))
    except OSError:  # path too long for a socket address
        sock.close()
        sock = None
    try:
        run = ecdc(tmp_path, "compress", "-r", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "out", root,
                   timeout=90)
    finally:
        if sock is not None:
            sock.close()
    assert run.returncode == 0, run.stderr
    assert run.lines("error") == []
    warnings = run.lines("warning")
    expected = {"n.flac": "a link to a character device", "z.wav": "a link to a character device"}
    if sock is not None:
        expected["s.wav"] = "a socket"
    assert len(warnings) == len(expected), warnings
    for name, kind in expected.items():
        line = next(w for w in warnings if f"{root / name}: " in w)
        assert f"skipped: {kind}, not a regular file" in line, line
    assert "1 converted" in run.stderr and "0 failed" in run.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["a.ecdc"]
    bounded(run, "ecdc compress -r (tree with a z.wav link to /dev/zero)")

    # Named on the command line the link is read, and refused from its first bytes.
    run = ecdc(tmp_path, "compress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "out2",
               root / "a.wav", root / "z.wav", timeout=90)
    assert run.returncode == 1
    errors = run.lines("error")
    assert len(errors) == 1 and f"{root / 'z.wav'}: " in errors[0] and "Format not recognised" in errors[0], errors
    assert sorted(os.listdir(tmp_path / "out2")) == ["a.ecdc"]
    bounded(run, "ecdc compress a.wav z.wav (z.wav a link to /dev/zero)")


# --------------------------------------------------------------------------- 8: FIFOs in a tree


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_mono_ckpt: Path) -> Path:
    """Two .ecdc files (made once) to decompress."""
    folder = tmp_path_factory.mktemp("packed")
    for seed, name in enumerate(("a", "c")):
        write_wav(folder / f"{name}.wav", seed=seed)
    run = ecdc(folder, "compress", "-q", "--checkpoint", tiny_mono_ckpt, folder / "a.wav", folder / "c.wav")
    assert run.returncode == 0, run.stderr
    return folder


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("kind", ["compress", "decompress"])
def test_fifo_in_a_tree_is_skipped_not_waited_for(tmp_path: Path, tiny_mono_ckpt: Path, packed: Path,
                                                  kind: str, jobs: int) -> None:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    ext = ".wav" if kind == "compress" else ".ecdc"
    for name in ("a", "c"):
        target = root / (f"{name}{ext}" if name == "a" else f"sub/{name}{ext}")
        if kind == "compress":
            write_wav(target, seed=ord(name))
        else:
            target.write_bytes((packed / f"{name}.ecdc").read_bytes())
    fifo = root / f"b{ext}"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it would block forever
    run = ecdc(tmp_path, kind, "-r", "-j", str(jobs), "--checkpoint", tiny_mono_ckpt, "-o", tmp_path / "out", root,
               timeout=60)
    assert run.returncode == 0, run.stderr
    warnings = run.lines("warning")
    assert len(warnings) == 1, run.stderr
    assert warnings[0].startswith(f"ecdc: warning: {fifo}: skipped: a named pipe (FIFO), not a regular file")
    assert "2 converted" in run.stderr and "0 failed" in run.stderr
    suffix = ".ecdc" if kind == "compress" else ".wav"
    out = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert out == [f"a{suffix}", f"sub/c{suffix}"]


# --------------------------------------------------------------------------- 10: deep trees


def test_tree_deeper_than_the_recursion_limit(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    depth = 1100
    root = tmp_path / "in"
    folder = root
    try:
        folder.mkdir()
        write_wav(folder / "top.wav", seed=1)
        for level in range(depth):
            folder = folder / "d"
            folder.mkdir()  # one level at a time: os.makedirs recurses once per level too
            if level == depth // 2:
                write_wav(folder / "middle.wav", seed=2)
        write_wav(folder / "bottom.wav", seed=3)
        out = tmp_path / "out"
        run = ecdc(tmp_path, "compress", "-r", "--checkpoint", tiny_mono_ckpt, "-o", out, root, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stderr.strip().splitlines()[-1].startswith("ecdc: 3 converted, 0 skipped, 0 failed"), run.stderr
        rel = Path(*["d"] * depth)
        assert (out / "top.ecdc").is_file() and (out / rel / "bottom.ecdc").is_file()
        assert (out / Path(*["d"] * (depth // 2 + 1)) / "middle.ecdc").is_file()

        back = tmp_path / "back"
        run = ecdc(tmp_path, "decompress", "-r", "-q", "--checkpoint", tiny_mono_ckpt, "-o", back, out, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert wav_frames(back / rel / "bottom.wav") == (16000, int(0.3 * 16000))
    finally:
        for tree in ("in", "out", "back"):
            remove_tree(tmp_path / tree)


def test_tree_order_is_os_walks(tmp_path: Path) -> None:
    """Guard: the iterative walk lists files in the order os.walk did (a folder's files,
    then each subfolder in name order), hidden files and folders left out."""
    from ecdc.batch import CompressOptions, plan_batch

    root = tmp_path / "in"
    for rel in ("b.wav", "a.wav", "A/z.wav", "A/B/y.wav", "A/a.flac", "c/x.wav", "c/.h/no.wav", ".hidden.wav",
                "Z.wav", "b/q.ogg", "b/b/p.wav", "notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    expected = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        expected += [os.path.join(dirpath, n) for n in sorted(filenames)
                     if not n.startswith(".") and os.path.splitext(n)[1] in (".wav", ".flac", ".ogg")]
    plan = plan_batch("compress", [str(root)], str(tmp_path / "out"), True, False, CompressOptions())
    assert [job.src for job in plan.jobs] == expected


# --------------------------------------------------------------------------- 13: awkward names


def _non_utf8_dir(tmp_path: Path) -> bytes:
    folder = os.fsencode(tmp_path) + b"/\xffdir"
    try:
        os.mkdir(folder)
    except OSError as exc:  # pragma: no cover - a file system that insists on UTF-8
        pytest.skip(f"file system refuses non-UTF-8 names: {exc}")
    return folder


def _long_dir(tmp_path: Path) -> Path:
    """A folder whose path is about 1900 characters (libsndfile's limit is 1 KiB)."""
    folder = tmp_path
    while len(str(folder)) < 1850:
        folder = folder / ("L" * 200)
    folder.mkdir(parents=True)
    return folder


def test_non_utf8_name_compresses_and_decompresses(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    folder = _non_utf8_dir(tmp_path)
    src = folder + b"/\xfe\xff.wav"
    write_wav(src)
    run = ecdc(tmp_path, "compress", "-q", "--checkpoint", tiny_mono_ckpt, src)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert sorted(os.listdir(folder)) == [b"\xfe\xff.ecdc", b"\xfe\xff.wav"]
    os.unlink(src)
    run = ecdc(tmp_path, "decompress", "-q", "--checkpoint", tiny_mono_ckpt, folder + b"/\xfe\xff.ecdc")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert sorted(os.listdir(folder)) == [b"\xfe\xff.ecdc", b"\xfe\xff.wav"]
    assert wav_frames(src) == (16000, int(0.3 * 16000))


def test_very_long_path_compresses_and_decompresses(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    folder = _long_dir(tmp_path)
    src = folder / "speech.wav"
    write_wav(src)
    assert len(str(src)) > 1850
    run = ecdc(tmp_path, "compress", "-q", "--checkpoint", tiny_mono_ckpt, src)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    run = ecdc(tmp_path, "decompress", "-q", "--checkpoint", tiny_mono_ckpt, "-o", folder / "back.wav",
               folder / "speech.ecdc")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert sorted(os.listdir(folder)) == ["back.wav", "speech.ecdc", "speech.wav"]
    assert wav_frames(folder / "back.wav") == (16000, int(0.3 * 16000))


@pytest.mark.parametrize("jobs", [1, 2])
def test_awkward_names_in_a_batch(tmp_path: Path, tiny_mono_ckpt: Path, jobs: int) -> None:
    root = tmp_path / "in"
    root.mkdir()
    write_wav(os.fsencode(root) + b"/\xff.wav", seed=1)
    long_dir = _long_dir(root)
    write_wav(long_dir / "deep.wav", seed=2)
    (root / "\udcfebad.wav").write_bytes(b"not audio" * 10)  # a name with the byte 0xfe
    out, back = tmp_path / "out", tmp_path / "back"
    run = ecdc(tmp_path, "compress", "-r", "-j", str(jobs), "--checkpoint", tiny_mono_ckpt, "-o", out, root)
    assert run.returncode == 1, run.stderr
    errors = run.lines("error")
    # The bad file's name is shown (its undecodable byte escaped), on one line.
    assert len(errors) == 1 and "bad.wav: cannot read audio" in errors[0], run.stderr
    assert "2 converted" in run.stderr and "1 failed" in run.stderr
    rel = long_dir.relative_to(root)
    assert sorted(os.listdir(os.fsencode(out))) == sorted([b"\xff.ecdc", os.fsencode(rel.parts[0])])
    assert (out / rel / "deep.ecdc").is_file()

    run = ecdc(tmp_path, "decompress", "-r", "-q", "-j", str(jobs), "--checkpoint", tiny_mono_ckpt, "-o", back, out)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert b"\xff.wav" in os.listdir(os.fsencode(back))
    assert wav_frames(os.fsencode(back) + b"/\xff.wav") == (16000, int(0.3 * 16000))
    assert wav_frames(back / rel / "deep.wav") == (16000, int(0.3 * 16000))


# --------------------------------------------------------------- found by fuzz/fuzz_wavstream.py

#: A 101-byte WAV in G.721 ADPCM (format tag 0x40), found by the WAV stream fuzzer:
#: libsndfile reads it but cannot seek in it, and SoundFile.blocks() refused that with a
#: ValueError that reached the user as a traceback.
_G721_WAV = ("UklGRmUAAABXQVZFTElTVAUAAABJTkZPeABmbXQgEAAAAEAAAQBAHwAAQB8AAAEACABkYXRhMwDD9fo=")


def test_wav_libsndfile_cannot_seek_in_is_converted(tmp_path):
    import base64

    src = tmp_path / "g721.wav"
    src.write_bytes(base64.b64decode(_G721_WAV))
    run = ecdc(tmp_path, "compress", src, "-o", tmp_path / "g721.ecdc")
    assert "Traceback" not in run.stderr
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "g721.ecdc").stat().st_size > 0
