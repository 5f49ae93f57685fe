"""Tags (issue 14, item 8): the tags chunk (docs/FORMAT.md, section 13), and tags from an input
file through ``.ecdc`` to the decoded output, through the real command line."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import soundfile
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_container import NonSeekable, small_file

from ecdc.cli import main
from ecdc.container import CHUNK_TAGS, EcdcReader, read_ecdc, write_ecdc
from ecdc.container.tags import (
    MAX_TAGS,
    MAX_TAGS_PAYLOAD,
    MAX_VALUE_BYTES,
    TAG_KEYS,
    clean_value,
    encode_tags,
    parse_tags,
    tag_problem,
    tags_chunk,
)
from ecdc.errors import ChecksumError, FormatError
from ecdc.wavstream import open_audio_stream

from conftest import test_signal

TAGS = {"title": "Tïtle ☃", "artist": "Someone", "album": "An album", "date": "2024-05-01",
        "comment": "a comment"}
_SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

keys = st.from_regex(r"[a-z0-9_]{1,32}", fullmatch=True)
# Text a tag may hold: any character but the control characters, the line separators and
# surrogates (categories Cc and Cs; U+2028/U+2029 are Zl/Zp).
values = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60)
tag_dicts = st.dictionaries(keys, values, max_size=MAX_TAGS)


def header_end(data: bytes) -> int:
    """Where the first chunk of a version 1 file starts (after the header and its CRC)."""
    (body_len,) = struct.unpack_from("<H", data, 6)
    return 8 + body_len + 4


def with_chunk(data: bytes, chunk: bytes, at: int | None = None) -> bytes:
    """``data`` with ``chunk`` inserted at byte ``at`` (default: right after the header)."""
    at = header_end(data) if at is None else at
    return data[:at] + chunk + data[at:]


def raw_chunk(payload: bytes, ctype: int = CHUNK_TAGS, length: int | None = None) -> bytes:
    """A chunk with a valid CRC whatever its payload (encode_chunk refuses nothing small)."""
    head = struct.pack("<BI", ctype, len(payload) if length is None else length)
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def entry(key: bytes, value: bytes) -> bytes:
    return bytes([len(key)]) + key + struct.pack("<H", len(value)) + value


# --------------------------------------------------------------------------- the chunk


@_SETTINGS
@given(tag_dicts)
def test_tags_round_trip(tags: dict[str, str]) -> None:
    """Every valid set of tags is stored and read back exactly, in order."""
    parsed = parse_tags(encode_tags(tags))
    assert parsed == tags and list(parsed) == list(tags)


@_SETTINGS
@given(st.binary(max_size=300))
def test_garbage_payloads_parse_to_valid_tags_or_a_format_error(payload: bytes) -> None:
    try:
        tags = parse_tags(payload, "the tags chunk at byte 81")
    except FormatError as exc:
        assert "tags chunk at byte 81" in str(exc) and "\n" not in str(exc)
        return
    assert len(tags) <= MAX_TAGS
    assert all(tag_problem(k, v) is None for k, v in tags.items())


@_SETTINGS
@given(st.text(max_size=200), st.integers(0, 3))
def test_clean_value_always_gives_a_storable_value(text: str, repeat: int) -> None:
    """What an input file holds is made storable (or empty, and dropped), and cleaning is stable."""
    cleaned = clean_value(text * repeat)
    assert cleaned == "" or tag_problem("title", cleaned) is None
    assert clean_value(cleaned) == cleaned


def test_clean_value_limits() -> None:
    assert clean_value("  line 1\r\nline 2\t\x1b[31mred\x00 ") == "line 1 line 2 [31mred"
    long = clean_value("é" * MAX_VALUE_BYTES)  # 2 bytes each: cut at a character boundary
    assert len(long.encode()) == MAX_VALUE_BYTES and long == "é" * (MAX_VALUE_BYTES // 2)


@pytest.mark.parametrize("payload, fragment", [
    (entry(b"title", b"\xff\xfe"), "not valid UTF-8"),
    (entry(b"title", b"a\x1b]0;pwned\x07"), "control characters"),
    (entry(b"title", "a\u2028b".encode()), "control characters"),
    (entry(b"Title", b"x"), "invalid name"),
    (entry(b"title", b"x") + entry(b"title", b"y"), "appears twice"),
    (entry(b"title", b"x")[:-1], "invalid length"),
    (entry(b"title", b""), "invalid length"),
    (b"\x00", "invalid name length"),
    (b"".join(entry(b"k%d" % i, b"v") for i in range(MAX_TAGS + 1)), f"more than {MAX_TAGS}"),
])
def test_invalid_payloads_are_named_format_errors(payload: bytes, fragment: str) -> None:
    with pytest.raises(FormatError, match=fragment):
        parse_tags(payload)


def test_writer_refuses_tags_readers_would() -> None:
    header, chunks, total, _ = small_file()
    for bad in ({"title": "a\nb"}, {"Title": "x"}, {"title": "x" * (MAX_VALUE_BYTES + 1)},
                {f"k{i}": "v" for i in range(MAX_TAGS + 1)}):
        with pytest.raises(ValueError):
            write_ecdc(header, chunks, total, tags=bad)


def test_documented_example_bytes() -> None:
    """docs/FORMAT.md, section 13, shows these bytes."""
    chunk = tags_chunk({"title": "Take 5", "artist": "Q"})
    assert chunk.hex(" ") == ("54 18 00 00 00 05 74 69 74 6c 65 06 00 54 61 6b 65 20 35 "
                              "06 61 72 74 69 73 74 01 00 51 fc 8b e1 8b")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md").read_text()
    assert "fc 8b e1 8b" in doc and "## 13. Tags chunk" in doc


# --------------------------------------------------------------------------- readers


def test_tags_chunk_after_the_header_and_read_back_on_pipes_too() -> None:
    header, chunks, total, plain = small_file()
    tagged = write_ecdc(header, chunks, total, tags=TAGS)
    assert tagged == with_chunk(plain, tags_chunk(TAGS))  # the only place a writer puts it
    for salvage in (False, True):
        for f in (io.BytesIO(tagged), NonSeekable(tagged, max_read=3)):
            reader = EcdcReader(f, salvage=salvage)  # type: ignore[arg-type]
            assert reader.tags == TAGS  # known before any chunk is read
            assert list(reader) == chunks and reader.total_samples == total and reader.damage == []
            assert reader.bytes_read == len(tagged)


def test_a_reader_that_knows_no_tags_reads_a_tagged_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older readers (this one, its tags chunk support switched off) skip the tags chunk as an
    unknown chunk type, strict and salvaging, and get exactly the audio of the untagged file."""
    header, chunks, total, plain = small_file()
    tagged = write_ecdc(header, chunks, total, tags=TAGS)
    monkeypatch.setattr(EcdcReader, "_read_tags", lambda self: None)
    assert read_ecdc(tagged) == read_ecdc(plain)
    reader = EcdcReader(io.BytesIO(tagged), salvage=True)
    assert list(reader) == chunks and reader.damage == [] and reader.total_samples == total
    assert reader.tags == {}


def test_a_tags_chunk_elsewhere_is_skipped_like_an_unknown_chunk() -> None:
    header, chunks, total, plain = small_file()
    first = header_end(plain)
    after_first_code_chunk = first + 9 + struct.unpack_from("<I", plain, first + 1)[0]
    moved = with_chunk(plain, tags_chunk(TAGS), at=after_first_code_chunk)
    for salvage in (False, True):
        reader = EcdcReader(io.BytesIO(moved), salvage=salvage)
        assert list(reader) == chunks and reader.tags == {} and reader.damage == []


@pytest.mark.parametrize("chunk, strict_error, fragment", [
    # A flipped byte in a tag: the CRC fails.
    (tags_chunk({"title": "Hello"})[:-6] + b"J" + tags_chunk({"title": "Hello"})[-5:], ChecksumError,
     "CRC32 mismatch in tags chunk"),
    # A valid CRC around invalid contents.
    (raw_chunk(entry(b"title", b"\xc3\x28")), FormatError, "not valid UTF-8"),
    (raw_chunk(entry(b"title", b"\x1b[2J\x1b[H")), FormatError, "control characters"),
    # A length over the tags chunk's limit (old readers would read up to 16 MiB): refused unread.
    (struct.pack("<BI", CHUNK_TAGS, MAX_TAGS_PAYLOAD + 1), FormatError, "more than the 65536-byte limit"),
])
def test_damaged_tags_strict_refuses_salvage_keeps_the_audio(chunk: bytes, strict_error: type,
                                                              fragment: str) -> None:
    header, chunks, total, plain = small_file()
    data = with_chunk(plain, chunk)
    with pytest.raises(strict_error, match=fragment) as info:
        read_ecdc(data)
    assert "tags chunk" in str(info.value) and "\n" not in str(info.value)
    reader = EcdcReader(io.BytesIO(data), salvage=True)
    assert list(reader) == chunks and reader.total_samples == total
    assert reader.tags == {} and reader.gaps == []
    assert any("tags are dropped" in line for line in reader.damage), reader.damage


def test_truncated_inside_the_tags_chunk() -> None:
    header, chunks, total, plain = small_file()
    data = with_chunk(plain, tags_chunk(TAGS))[:header_end(plain) + 20]
    with pytest.raises(FormatError, match="truncated"):
        read_ecdc(data)
    reader = EcdcReader(io.BytesIO(data), salvage=True)
    assert list(reader) == [] and reader.tags == {}
    assert any("tags are dropped" in line for line in reader.damage)


# --------------------------------------------------------------------------- audio files


def wav_with_info(info: list[tuple[bytes, bytes]], seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A 16-bit mono WAV whose LIST/INFO chunk (before 'data') holds ``info`` as given."""
    body = b"INFO"
    for cid, value in info:
        body += cid + struct.pack("<I", len(value)) + value + b"\0" * (len(value) & 1)
    pcm = (test_signal(seconds, rate)[0] * 20000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    chunks = (b"fmt " + struct.pack("<I", 16) + fmt + b"LIST" + struct.pack("<I", len(body)) + body
              + b"data" + struct.pack("<I", len(pcm)) + pcm)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def test_wav_info_from_a_pipe_matches_libsndfile(tmp_path: Path) -> None:
    """A WAV's tags read the same from a pipe (parsed here) and from a file (libsndfile)."""
    data = wav_with_info([(b"INAM", b"Song\0"), (b"IART", "Ärtist\r\nTwo\0".encode()),
                          (b"ICMT", b"\xffbad utf-8\0"), (b"IXYZ", b"other\0")])
    path = tmp_path / "t.wav"
    path.write_bytes(data)
    piped = open_audio_stream(NonSeekable(data, max_read=1000)).tags  # type: ignore[arg-type]
    assert piped == {"title": "Song", "artist": "Ärtist Two", "comment": "\ufffdbad utf-8"}
    with soundfile.SoundFile(str(path)) as sf:
        from ecdc.audiotags import read_soundfile_tags
        assert read_soundfile_tags(sf) == piped


# --------------------------------------------------------------------------- the command line


def ecdc(*args: object, input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ecdc", *map(str, args)], input=input, capture_output=True,
                          env=env, timeout=300, cwd=cwd)


def info_rows(stdout: bytes) -> dict[str, str]:
    rows = {}
    for line in stdout.decode().splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def write_tagged(path: Path, tags: dict[str, str], rate: int = 16000, seconds: float = 0.6) -> Path:
    fmt = path.suffix[1:].upper()
    with soundfile.SoundFile(str(path), "w", rate, 1, format=fmt) as sf:
        for key, value in tags.items():
            setattr(sf, key, value)
        sf.write(test_signal(seconds, rate)[0])
    return path


def test_tags_flow_flac_to_ecdc_to_info_to_wav_and_flac(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = write_tagged(tmp_path / "in.flac", {**TAGS, "license": "CC-BY-4.0", "genre": "Jazz"})
    r = ecdc("compress", src, "--checkpoint", tiny_mono_ckpt, "-q")
    assert r.returncode == 0, r.stderr.decode()
    r = ecdc("info", tmp_path / "in.ecdc")
    assert r.returncode == 0, r.stderr.decode()
    rows = info_rows(r.stdout)
    assert {k: rows.get(k) for k in (*TAGS, "license", "genre")} == {**TAGS, "license": "CC-BY-4.0",
                                                                    "genre": "Jazz"}
    for suffix in (".wav", ".flac"):
        out = tmp_path / f"out{suffix}"
        r = ecdc("decompress", tmp_path / "in.ecdc", "-o", out, "--checkpoint", tiny_mono_ckpt, "-q")
        assert r.returncode == 0, r.stderr.decode()
        with soundfile.SoundFile(str(out)) as sf:
            got = sf.copy_metadata()
        for key, value in TAGS.items():
            assert got.get(key) == value, (suffix, key, got)
        assert got.get("genre") == "Jazz"
        if suffix == ".flac":
            assert got.get("license") == "CC-BY-4.0"  # WAV INFO has no licence field


def test_options_set_override_and_drop_tags(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    """--title overrides the input's, --title '' removes it, --comment KEY=VALUE sets KEY
    (opusenc's habit), --no-tags keeps only what the command line sets; also through stdin."""
    src = write_tagged(tmp_path / "in.wav", {"title": "Old", "artist": "Kept", "album": "Gone"})
    runner = CliRunner()
    result = runner.invoke(main, ["compress", str(src), "--checkpoint", str(tiny_mono_ckpt), "-q",
                                  "--title", "New", "--album", "", "--comment", "genre=Folk",
                                  "--comment", "just text"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert EcdcReader(open(tmp_path / "in.ecdc", "rb")).tags == {
        "title": "New", "artist": "Kept", "genre": "Folk", "comment": "just text"}
    r = ecdc("compress", "-", "--checkpoint", tiny_mono_ckpt, "-q", "--no-tags", "--artist", "Only",
             input=src.read_bytes())
    assert r.returncode == 0, r.stderr.decode()
    assert EcdcReader(io.BytesIO(r.stdout)).tags == {"artist": "Only"}


def test_batch_keeps_each_files_tags(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    a = write_tagged(tmp_path / "a.wav", {"title": "A"})
    b = write_tagged(tmp_path / "b.flac", {"title": "B"})
    result = CliRunner().invoke(main, ["compress", str(a), str(b), "-o", str(tmp_path / "out"), "-j", "2",
                                       "--checkpoint", str(tiny_mono_ckpt), "-q", "--artist", "Both"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name, title in (("a", "A"), ("b", "B")):
        with open(tmp_path / "out" / f"{name}.ecdc", "rb") as f:
            assert EcdcReader(f).tags == {"title": title, "artist": "Both"}


def test_bad_tag_options_are_refused_before_anything_is_written(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    src = write_tagged(tmp_path / "in.wav", {})
    r = ecdc("compress", src, "--checkpoint", tiny_mono_ckpt, "--title", "a\x1b[2Jb")
    assert r.returncode == 2, r.stderr.decode()
    assert "Traceback" not in r.stderr.decode() and "control characters" in r.stderr.decode()
    assert b"\x1b" not in r.stderr
    result = CliRunner().invoke(main, ["compress", str(src), "--checkpoint", str(tiny_mono_ckpt),
                                       "--comment", "x" * (MAX_VALUE_BYTES + 1)])
    assert result.exit_code == 2 and "more than 4096" in result.output
    assert not (tmp_path / "in.ecdc").exists()


def test_hostile_tags_in_files(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    """A WAV with escape sequences in its tags: stored cleaned, shown escaped. A crafted .ecdc
    (valid CRC, invalid UTF-8 or control characters): one-line errors, no output; --salvage
    decodes the audio without the tags, with a warning."""
    hostile = wav_with_info([(b"INAM", b"\x1b]0;owned\x07\x1b[2J\0"), (b"IART", b"x" * 9000 + b"\0")])
    # Through a pipe (ecdc parses the LIST chunk): the long value is cut to the limit.
    # (From a file, libsndfile drops a value that long itself.)
    r = ecdc("compress", "-", "-o", tmp_path / "in.ecdc", "--checkpoint", tiny_mono_ckpt, "-q", input=hostile)
    assert r.returncode == 0, r.stderr.decode()
    r = ecdc("info", tmp_path / "in.ecdc")
    assert r.returncode == 0 and b"\x1b" not in r.stdout and b"\x07" not in r.stdout
    rows = info_rows(r.stdout)
    assert rows["title"] == "]0;owned [2J" and rows["artist"] == "x" * MAX_VALUE_BYTES

    good = (tmp_path / "in.ecdc").read_bytes()
    end = header_end(good)
    plain = good[:end] + good[end + 9 + struct.unpack_from("<I", good, end + 1)[0]:]  # without its tags
    bad = tmp_path / "bad.ecdc"
    bad.write_bytes(with_chunk(plain, raw_chunk(entry(b"title", b"\xed\xa0\x80"))))  # a UTF-8 surrogate
    for command in (["info", bad], ["decompress", bad, "-o", tmp_path / "bad.wav", "--checkpoint", tiny_mono_ckpt]):
        r = ecdc(*command)
        lines = r.stderr.decode().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr.decode()
        assert lines[0].startswith("ecdc: error:") and "tags chunk" in lines[0] and "UTF-8" in lines[0]
    assert not (tmp_path / "bad.wav").exists()
    r = ecdc("decompress", bad, "-o", tmp_path / "bad.wav", "--checkpoint", tiny_mono_ckpt, "--salvage")
    assert r.returncode == 0, r.stderr.decode()
    assert "tags are dropped" in r.stderr.decode()
    with soundfile.SoundFile(str(tmp_path / "bad.wav")) as sf:
        assert sf.frames > 0 and not sf.copy_metadata()
    # Control characters that would drive the terminal, in a crafted file: info refuses
    # the file in one line and shows none of them.
    bad.write_bytes(with_chunk(plain, raw_chunk(entry(b"artist", b"\x1b]0;owned\x07"))))
    result = CliRunner().invoke(main, ["info", str(bad)])
    assert result.exit_code == 1 and "\x1b" not in result.output and "control characters" in result.stderr


def test_tag_keys_are_the_soundfile_ones() -> None:
    """The keys ecdc carries are exactly libsndfile's string fields, as soundfile names them."""
    assert set(TAG_KEYS) == set(soundfile._str_types)


def test_info_shows_keys_ecdc_does_not_write_as_tags(tmp_path: Path) -> None:
    """A key another writer added is shown, but cannot pass for one of info's own rows."""
    header, chunks, total, _ = small_file()
    path = tmp_path / "k.ecdc"
    path.write_bytes(write_ecdc(header, chunks, total, tags={"title": "x", "bitrate": "999 kbps"}))
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    rows = info_rows(result.stdout_bytes)
    assert rows["title"] == "x" and rows["tag bitrate"] == "999 kbps" and rows["bitrate"] != "999 kbps"
