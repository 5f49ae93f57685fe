"""What a run says when it ends, and what it says about input it cannot read (issue 14,
items 7, 13 and the rest of 15): opusenc-style figures after a single conversion and totals
in the batch summary; formats libsndfile does not decode (m4a, wma, a FLAC that ffmpeg
wrote to a pipe, ...) named, with the ffmpeg pipe that converts them; a batch that finds
nothing to convert; a batch collision reported the same way on a rerun. The real CLI in
subprocesses, tiny random-weight models only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from click.testing import CliRunner

from ecdc import audio
from ecdc.cli import main

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]
RATE = 16000

#: The figures of one line, as messages.stats_text writes them.
STATS = re.compile(r"(?P<seconds>\d+\.\d\d) s of audio in (?P<wall>\d+\.\d\d) s \((?P<speed>\d+\.\d)x real time\), "
                   r"(?P<kbps>\d+\.\d\d) kbps, (?P<bytes_in>\d+) -> (?P<bytes_out>\d+) bytes "
                   r"\(ratio (?P<ratio>1:\d+\.\d|\d+\.\d:1)\)$")


def ecdc(*args: object, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """``python -m ecdc ARGS`` from the repository root; stdin, stdout and stderr are pipes."""
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], cwd=REPO, input=stdin,
                          capture_output=True, timeout=180)


class Ran:
    """What a run of the CLI in this process (:func:`run`) left, shaped like a subprocess's."""

    def __init__(self, returncode: int, stderr: bytes):
        self.returncode = returncode
        self.stderr = stderr


def run(*args: object, stdin: bytes | None = None) -> Ran:
    """The CLI in this process (no interpreter and torch start-up to wait for): for the
    checks that do not depend on being a separate process."""
    result = CliRunner().invoke(main, [str(a) for a in args], input=stdin, catch_exceptions=False)
    return Ran(result.exit_code, result.stderr_bytes or b"")


def stderr_lines(proc: subprocess.CompletedProcess | Ran) -> list[str]:
    text = proc.stderr.decode()
    assert "Traceback" not in text, text
    return [ln for ln in text.splitlines() if ln.strip()]


def write_wav(path: Path, seconds: float = 1.0, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), test_signal(seconds, RATE, seed=seed).T, RATE, subtype="PCM_16")
    return path


def figures(line: str, prefix: str) -> dict[str, str]:
    assert line.startswith(prefix), line
    match = STATS.fullmatch(line[len(prefix):])
    assert match, line
    return match.groupdict()


def check_figures(got: dict[str, str], seconds: float, pcm_bytes: int, ecdc_bytes: int, compressing: bool) -> None:
    """The figures are those of the files: duration, bitrate of the .ecdc side, sizes, ratio."""
    assert got["seconds"] == f"{seconds:.2f}"
    assert got["kbps"] == f"{ecdc_bytes * 8 / seconds / 1000:.2f}"
    bytes_in, bytes_out = (pcm_bytes, ecdc_bytes) if compressing else (ecdc_bytes, pcm_bytes)
    assert (int(got["bytes_in"]), int(got["bytes_out"])) == (bytes_in, bytes_out)
    ratio = f"{pcm_bytes / ecdc_bytes:.1f}"
    assert got["ratio"] == (f"{ratio}:1" if compressing else f"1:{ratio}")
    speed = float(got["seconds"]) / float(got["wall"])
    assert float(got["speed"]) == pytest.approx(speed, rel=0.2, abs=0.1)


# --------------------------------------------------------------------------- item 13: end-of-run figures


def test_single_conversions_end_with_figures_unless_quiet(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    wav = write_wav(tmp_path / "in.wav", seconds=1.5)
    coded = tmp_path / "in.ecdc"
    proc = ecdc("compress", wav, "--checkpoint", tiny_mono_ckpt)  # stderr is a pipe: printed all the same
    assert proc.returncode == 0
    lines = stderr_lines(proc)
    assert len(lines) == 1, lines
    check_figures(figures(lines[0], f"ecdc: {wav} -> {coded}: "), 1.5, wav.stat().st_size, coded.stat().st_size,
                  compressing=True)

    back = tmp_path / "back.wav"
    proc = ecdc("decompress", coded, "-o", back, "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 0
    lines = stderr_lines(proc)
    assert len(lines) == 1, lines
    check_figures(figures(lines[0], f"ecdc: {coded} -> {back}: "), 1.5, back.stat().st_size,
                  coded.stat().st_size, compressing=False)

    quiet = run("decompress", coded, "-o", tmp_path / "quiet.wav", "-q", "--checkpoint", tiny_mono_ckpt)
    assert quiet.returncode == 0 and quiet.stderr == b""


def test_figures_count_the_bytes_of_pipes(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    pcm = write_wav(tmp_path / "in.wav").read_bytes()
    proc = ecdc("compress", "-", "--checkpoint", tiny_mono_ckpt, stdin=pcm)
    assert proc.returncode == 0 and proc.stdout[:4] == b"ECDC"
    lines = stderr_lines(proc)
    assert len(lines) == 1, lines
    check_figures(figures(lines[0], "ecdc: <stdin> -> <stdout>: "), 1.0, len(pcm), len(proc.stdout),
                  compressing=True)

    coded = proc.stdout
    proc = ecdc("decompress", "-", "--checkpoint", tiny_mono_ckpt, stdin=coded)
    assert proc.returncode == 0 and proc.stdout[:4] == b"RIFF"
    lines = stderr_lines(proc)
    assert len(lines) == 1, lines
    check_figures(figures(lines[0], "ecdc: <stdin> -> <stdout>: "), 1.0, len(proc.stdout), len(coded),
                  compressing=False)


def test_batch_summary_adds_totals(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = tmp_path / "in"
    wavs = [write_wav(src / "a.wav", 1.0, seed=1), write_wav(src / "sub" / "b.wav", 0.5, seed=2)]
    out = tmp_path / "out"
    proc = run("compress", "-r", src, "-o", out, "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 0
    lines = stderr_lines(proc)
    assert len(lines) == 1, lines  # no per-file lines in a batch: the summary has the totals
    coded = [out / "a.ecdc", out / "sub" / "b.ecdc"]
    pcm_bytes = sum(p.stat().st_size for p in wavs)
    ecdc_bytes = sum(p.stat().st_size for p in coded)
    check_figures(figures(lines[0], "ecdc: 2 converted, 0 skipped, 0 failed; "), 1.5, pcm_bytes, ecdc_bytes,
                  compressing=True)

    proc = run("decompress", "-r", out, "-o", tmp_path / "back", "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 0
    lines = stderr_lines(proc)
    assert len(lines) == 1, lines
    back = [tmp_path / "back" / "a.wav", tmp_path / "back" / "sub" / "b.wav"]
    check_figures(figures(lines[0], "ecdc: 2 converted, 0 skipped, 0 failed; "), 1.5,
                  sum(p.stat().st_size for p in back), ecdc_bytes, compressing=False)


# --------------------------------------------------------------------------- item 15: collisions on a rerun


def test_batch_collision_is_reported_the_same_way_on_a_rerun(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = tmp_path / "in"
    write_wav(src / "z.wav", seed=1)
    soundfile.write(str(src / "z.ogg"), test_signal(1.0, RATE, seed=2).T, RATE, format="OGG")
    first = run("compress", "-r", src, "--checkpoint", tiny_mono_ckpt)
    written = (src / "z.ecdc").read_bytes()
    second = run("compress", "-r", src, "--checkpoint", tiny_mono_ckpt)
    assert first.returncode == second.returncode == 1
    errors = [[ln for ln in stderr_lines(p) if ln.startswith("ecdc: error:")] for p in (first, second)]
    # z.ogg comes first in the walk, so it is written; z.wav collides with it, both times.
    expected = f"ecdc: error: {src / 'z.wav'}: its output {src / 'z.ecdc'} would also be written from {src / 'z.ogg'}"
    assert errors == [[expected], [expected]], errors
    assert "1 converted, 0 skipped, 1 failed" in first.stderr.decode()
    assert "0 converted, 1 skipped (output exists; -f overwrites), 1 failed" in second.stderr.decode()
    assert (src / "z.ecdc").read_bytes() == written  # the rerun wrote nothing
    forced = run("compress", "-r", "-f", "-q", src, "--checkpoint", tiny_mono_ckpt)
    assert forced.returncode == 1 and stderr_lines(forced) == [expected]


# --------------------------------------------------------------------------- item 7: formats libsndfile cannot read


def flac_of_unknown_length(path: Path) -> bytes:
    """A FLAC as ffmpeg writes one to a pipe: STREAMINFO's total samples (and MD5, frame sizes) 0."""
    soundfile.write(str(path), test_signal(0.5, RATE).T, RATE, format="FLAC", subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first, at byte 8
    data[8 + 4:8 + 10] = bytes(6)  # min/max frame size: unknown
    data[8 + 13] &= 0xF0  # the 36-bit sample count ends the 18th byte of STREAMINFO
    data[8 + 14:8 + 18] = bytes(4)
    data[8 + 18:8 + 34] = bytes(16)  # MD5: unknown
    return bytes(data)


#: Minimal starts of files in formats libsndfile has no decoder for, with what the error calls them.
FOREIGN = {
    "song.m4a": (b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isommp42\x00\x00\x00\x08free", "MPEG-4 audio"),
    "clip.mp4": (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41\x00\x00\x00\x08free", "an MPEG-4 file"),
    "voice.wma": (bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c") + bytes(14), "Windows Media"),
    "raw.aac": (b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(40), "AAC (.aac, ADTS)"),
    "film.mka": (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01" + bytes(20), "Matroska"),
    "music.ape": (b"MAC \x96\x0f" + bytes(40), "Monkey's Audio"),
}


def test_unreadable_formats_are_named_by_their_first_bytes(tmp_path: Path) -> None:
    for name, (head, what) in FOREIGN.items():
        assert what in (audio.unreadable_format(head) or ""), name
    assert "unknown length" in (audio.unreadable_format(flac_of_unknown_length(tmp_path / "a.flac")) or "")
    soundfile.write(str(tmp_path / "b.flac"), test_signal(0.1, RATE).T, RATE, format="FLAC")
    write_wav(tmp_path / "c.wav")
    for readable in ("b.flac", "c.wav"):
        assert audio.unreadable_format((tmp_path / readable).read_bytes()[:64]) is None, readable
    assert audio.unreadable_format(b"") is None and audio.unreadable_format(b"ID3\x04") is None  # mp3: readable here
    # Not a real STREAMINFO (zeros): left to libsndfile, and on a pipe to the buffer limit.
    assert audio.unreadable_format(b"fLaC" + bytes(60)) is None


def test_unreadable_formats_get_one_line_with_the_ffmpeg_pipe(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name, (head, _) in FOREIGN.items():
        (src / name).write_bytes(head + bytes(200))
    (src / "piped.flac").write_bytes(flac_of_unknown_length(tmp_path / "made.flac"))
    names = sorted([*FOREIGN, "piped.flac"])
    # As inputs of a batch: one line each, naming the format and the ffmpeg command for that file.
    proc = ecdc("compress", *(src / n for n in names), "-o", tmp_path / "out", "--checkpoint", tiny_mono_ckpt)
    assert proc.returncode == 1
    errors = [ln for ln in stderr_lines(proc) if ln.startswith("ecdc: error:")]
    assert len(errors) == len(names), errors
    for name, line in zip(names, errors):
        what = FOREIGN[name][1] if name in FOREIGN else "FLAC with an unknown length"
        stem = os.path.splitext(name)[0]
        assert line.startswith(f"ecdc: error: {src / name}: cannot read audio: this is "), line
        assert what in line and line.endswith(f"ffmpeg -i {src / name} -f wav - | ecdc compress - -o {stem}.ecdc")
        assert "Format not recognised" not in line and "psf_fseek" not in line, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    # One file, and the same bytes on stdin (the FLAC as it comes from `ffmpeg ... -f flac -`).
    one = run("compress", src / "song.m4a", "--checkpoint", tiny_mono_ckpt)
    assert one.returncode == 1 and len(stderr_lines(one)) == 1 and not (src / "song.ecdc").exists()
    assert stderr_lines(one)[0] == [ln for ln in errors if "song.m4a" in ln][0]
    for name in ("song.m4a", "piped.flac"):
        piped = run("compress", "-", "-o", tmp_path / "piped.ecdc", "--checkpoint", tiny_mono_ckpt,
                     stdin=(src / name).read_bytes())
        lines = stderr_lines(piped)
        assert piped.returncode == 1 and len(lines) == 1, lines
        assert lines[0].startswith("ecdc: error: <stdin>: cannot read audio: this is "), lines
        assert lines[0].endswith("ffmpeg -i INPUT -f wav - | ecdc compress - -o OUTPUT.ecdc"), lines
        assert not (tmp_path / "piped.ecdc").exists()


def test_batch_that_finds_nothing_to_convert_says_so(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = tmp_path / "music"
    src.mkdir()
    for name in ("a.m4a", "b.m4a", "notes.txt"):
        (src / name).write_bytes(FOREIGN["song.m4a"][0])
    proc = ecdc("compress", "-r", src, "--checkpoint", tiny_mono_ckpt)
    lines = stderr_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"ecdc: error: {src}: no audio files to compress found (-r takes .aif, "), lines
    assert "found other files: 2 .m4a, 1 .txt" in lines[0] and "ffmpeg" in lines[0], lines

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("decompress", "-r", "-q", src, empty, "--checkpoint", tiny_mono_ckpt)  # -q does not hide errors
    lines = stderr_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("ecdc: error: no .ecdc files to decompress found (-r takes .ecdc)"), lines
    assert sorted(os.listdir(tmp_path)) == ["empty", "music"]
