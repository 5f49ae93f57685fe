"""What a .ecdc file claims is bounded by what it holds (issue 12, "Hostile input, round two").

* Item 3: salvage puts silence only where an intact chunk after the loss proves it, and
  no more in all than the file's size supports (81 bytes once made 29 GB); a WAV over
  4 GiB is written as RF64.
* Item 4: the output rate and channel count a header claims are bounded, and decoded in
  flat memory (1024 channels at 1 MHz once asked for an 11.4 GiB array).
* Item 5: a 48 kHz (segmented) code chunk is one segment, no more frames.
* Item 11: a scale no encoder writes (3e38) is refused in one line, or a gap when salvaging.

Tests that could fill the disk or the memory on code without these fixes run the CLI in
a subprocess under RLIMIT_FSIZE / RLIMIT_AS and a timeout, so that they fail fast.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pytest
import soundfile

from ecdc import wavstream
from ecdc.bitpack import pack_codes
from ecdc.codec import Codec
from ecdc.container import (
    CHUNK_CODES,
    CHUNK_END,
    CodeChunk,
    EcdcHeader,
    EcdcReader,
    EcdcWriter,
    Gap,
    StereoMode,
    encode_chunk,
    encode_header,
    max_samples,
    read_ecdc,
    write_ecdc,
)
from ecdc.errors import FormatError
from ecdc.wavstream import WavStreamReader, WavStreamWriter, to_pcm16
from ecdc.weights import load_weights

from conftest import TINY_MONO, TINY_STEREO, random_model, test_signal

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


# --------------------------------------------------------------------------- helpers


class Run(NamedTuple):
    returncode: int
    stdout: bytes
    stderr: str
    max_rss: int  #: peak resident set size of the CLI process, in bytes


# Runs the CLI as its own child and reports the child's peak RSS. The wrapper is small:
# Linux counts the RSS a child had at fork, before exec, in its ru_maxrss, so the CLI
# forked straight from this (large) pytest process would report pytest's size.
_WRAPPER = r"""
import json, resource, subprocess, sys
fsize, space, timeout, out, err, null = json.loads(sys.argv[1])
for which, value in ((resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_AS, space)):
    if value is not None:
        resource.setrlimit(which, (value, value))
with open(out, "wb") as o, open(err, "wb") as e:
    try:
        rc = subprocess.run([sys.executable, "-m", "ecdc", *sys.argv[2:]], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL if null else o, stderr=e, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
print(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))
"""


def run_cli(args: Sequence[object], tmp_path: Path, *, fsize: Optional[int] = None,
            address_space: Optional[int] = None, timeout: float = 300, stdout_to_null: bool = False) -> Run:
    """``python -m ecdc ARGS`` in the repository root, under resource limits and a timeout.

    ``max_rss`` is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper whose only child
    is the CLI: the CLI's own peak.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    out_path, err_path = tmp_path / "cli.stdout", tmp_path / "cli.stderr"
    limits = json.dumps([fsize, address_space, timeout, str(out_path), str(err_path), stdout_to_null])
    wrapper = subprocess.run([sys.executable, "-c", _WRAPPER, limits, *map(str, args)], cwd=ROOT, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 60)
    assert wrapper.returncode == 0, wrapper.stderr
    rc, max_rss = json.loads(wrapper.stdout.strip().splitlines()[-1])
    assert rc != "timeout", f"the CLI ran over {timeout} s"
    return Run(rc, out_path.read_bytes(), err_path.read_text(errors="replace"), max_rss)


def code_chunk(index: int, codes: np.ndarray, scale: Optional[float] = None, bits: int = 10) -> bytes:
    """A CRC-valid code chunk with any frame count and scale (EcdcWriter refuses some)."""
    head = struct.pack("<II", index, codes.shape[-1]) + (b"" if scale is None else struct.pack("<f", scale))
    return encode_chunk(CHUNK_CODES, head + pack_codes(np.ascontiguousarray(codes.transpose(2, 0, 1)), bits))


def end_chunk(total: int, count: int) -> bytes:
    return encode_chunk(CHUNK_END, struct.pack("<QIQ", total, count, 2**64 - 1))


def mono_header(**kw: object) -> EcdcHeader:
    fields: dict = dict(
        model_name="tiny_mono", weights_fingerprint=bytes(16), sample_rate=24000, channels=1,
        stereo_mode=StereoMode.MONO, bandwidth=1.5, num_codebooks=2, bits_per_code=10, hop_length=320,
        segment_length=0, segment_stride=0, has_scale=False, num_samples=None,
        original_sample_rate=24000, original_channels=1)
    fields.update(kw)
    return EcdcHeader(**fields)


def seg_header(**kw: object) -> EcdcHeader:
    fields: dict = dict(
        model_name="tiny_stereo", weights_fingerprint=bytes(16), sample_rate=48000, channels=2,
        stereo_mode=StereoMode.JOINT, bandwidth=6.0, num_codebooks=4, bits_per_code=10, hop_length=320,
        segment_length=48000, segment_stride=47520, has_scale=True, num_samples=None,
        original_sample_rate=48000, original_channels=2)
    fields.update(kw)
    return EcdcHeader(**fields)


def salvage(data: bytes, **kw: object) -> tuple[EcdcReader, list]:
    reader = EcdcReader(io.BytesIO(data), salvage=True, **kw)
    return reader, list(reader)


def zeros(header: EcdcHeader, frames: int) -> np.ndarray:
    return np.zeros((header.streams, header.num_codebooks, frames), dtype=np.int64)


@pytest.fixture(scope="module")
def mono_codec() -> Codec:
    return Codec(random_model(TINY_MONO), bytes(16))  # the weights of conftest's tiny_mono_ckpt


@pytest.fixture(scope="module")
def stereo_codec() -> Codec:
    return Codec(random_model(TINY_STEREO, seed=1), bytes(16))  # those of tiny_stereo_ckpt


# --------------------------------------------------------------------------- item 3: salvage


def week_claim(fingerprint: bytes = bytes(16), name: str = "tiny_mono") -> bytes:
    """A header that claims a week of audio, and nothing after it."""
    return encode_header(mono_header(model_name=name, weights_fingerprint=fingerprint,
                                     num_samples=max_samples(24000)))


def test_truncated_week_claim_is_reported_not_filled() -> None:
    data = week_claim(name="encodec_24khz")
    assert len(data) == 81
    reader, items = salvage(data)
    assert items == [] and reader.gaps == [] and reader.salvaged_samples is None
    assert any("604800.00 s long" in d and "not replaced by silence" in d for d in reader.damage)


def test_cli_salvage_of_a_week_claim_writes_a_header_only(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    # 81 bytes once wrote 29,030,400,044 bytes and exited 0. Under a 64 MiB file-size
    # limit old code fails at once (EFBIG) instead of filling the disk.
    _, fingerprint = load_weights(None, str(tiny_mono_ckpt))
    src, dst = tmp_path / "week.ecdc", tmp_path / "week.wav"
    src.write_bytes(week_claim(fingerprint, name="encodec_24khz"))
    assert src.stat().st_size == 81
    run = run_cli(["decompress", "-q", "--salvage", "--checkpoint", tiny_mono_ckpt, src, "-o", dst],
                  tmp_path, fsize=64 * MiB, timeout=120)
    assert run.returncode == 0, run.stderr
    assert dst.stat().st_size <= 100  # the WAV header (with the JUNK reserved for RF64)
    assert soundfile.info(str(dst)).frames == 0
    lines = run.stderr.strip().splitlines()
    assert any("not replaced by silence" in line for line in lines), lines
    assert "0.00 s written" in lines[-1]


def test_index_jump_needs_a_file_that_could_have_held_it() -> None:
    # Chunk 0 and a CRC-valid chunk 86399: a day of silence proven by an index, in 300
    # bytes. Salvage stops there instead of filling it.
    h = mono_header()
    data = encode_header(h) + code_chunk(0, zeros(h, 75)) + code_chunk(86399, zeros(h, 75))
    reader, items = salvage(data)
    assert [type(i).__name__ for i in items] == ["CodeChunk"] and reader.gaps == []
    assert any("recovery stops at byte" in d and "--max-silence" in d for d in reader.damage)
    # The caller can ask for more: then the index is believed, as it always was.
    reader, items = salvage(data, max_silence=math.inf)
    assert [type(i).__name__ for i in items] == ["CodeChunk", "Gap", "CodeChunk"]
    assert reader.gaps[0].num_samples == 86398 * 75 * 320


def test_end_marker_cannot_prove_more_than_the_file_holds() -> None:
    # One 1-second chunk, then an end marker claiming an hour in 1000 chunks.
    h = mono_header()
    data = encode_header(h) + code_chunk(0, zeros(h, 75)) + end_chunk(3600 * 24000, 1000)
    reader, items = salvage(data)
    assert len(items) == 1 and reader.gaps == []
    assert reader.total_samples == 3600 * 24000 and reader.salvaged_samples is None
    assert any("not replaced by silence" in d for d in reader.damage)
    # The same loss in a file that is big enough for it (the lost chunks' bytes are
    # there, damaged) is filled, as before.
    chunks = [code_chunk(i, zeros(h, 75)) for i in range(10)]
    bad = bytearray(b"".join(chunks[:9]))
    bad[len(chunks[0]) + 20] ^= 1  # chunk 1 damaged
    data = encode_header(h) + bytes(bad) + end_chunk(10 * 75 * 320, 10)  # chunk 9 lost
    reader, items = salvage(data)
    assert [(g.first_chunk, g.n_chunks) for g in reader.gaps] == [(1, 1), (9, 1)]
    assert reader.salvaged_samples == 10 * 75 * 320


def test_cli_max_silence_lets_the_user_ask_for_more(tmp_path: Path, tiny_mono_ckpt: Path) -> None:
    h = mono_header()
    src = tmp_path / "jump.ecdc"
    src.write_bytes(encode_header(h) + code_chunk(0, zeros(h, 75)) + code_chunk(30, zeros(h, 75))
                    + end_chunk(31 * 75 * 320, 31))
    dst = tmp_path / "jump.wav"
    args = ["decompress", "-q", "--salvage", "--checkpoint", tiny_mono_ckpt, src, "-f", "-o", dst]
    run = run_cli(args, tmp_path, fsize=64 * MiB, timeout=120)
    assert run.returncode == 0, run.stderr
    assert soundfile.info(str(dst)).frames == 75 * 320  # only the first chunk: 29 s is too much
    assert "recovery stops" in run.stderr
    run = run_cli(args + ["--max-silence", "60"], tmp_path, fsize=64 * MiB, timeout=120)
    assert run.returncode == 0, run.stderr
    assert soundfile.info(str(dst)).frames == 31 * 75 * 320
    assert "29.00 s of it silence" in run.stderr


def test_wav_over_the_riff_limit_is_written_as_rf64(tmp_path: Path, monkeypatch) -> None:
    # RF64 above 4 GiB, tested with the limit lowered instead of writing 4 GiB.
    monkeypatch.setattr(wavstream, "RF64_THRESHOLD", 10_000)
    signal = test_signal(0.5, 8000, channels=2)  # 4000 frames, 16000 bytes of samples
    path = tmp_path / "big.wav"
    with open(path, "wb") as f:
        writer = WavStreamWriter(f, 8000, 2)
        for start in range(0, 4000, 1500):
            writer.write(signal[:, start:start + 1500])
        writer.close()
    data = path.read_bytes()
    assert data[:4] == b"RF64" and data[12:16] == b"ds64"
    assert struct.unpack_from("<I", data, 4)[0] == 0xFFFFFFFF
    riff, size, frames = struct.unpack_from("<QQQ", data, 20)
    assert (riff, size, frames) == (len(data) - 8, 16000, 4000)
    info = soundfile.info(str(path))
    assert (info.format, info.frames, info.channels) == ("RF64", 4000, 2)
    got, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    assert rate == 8000 and np.array_equal(got.T, to_pcm16(signal))
    with open(path, "rb") as f:  # ecdc's own streaming reader takes it too
        assert WavStreamReader(f).frames == 4000
    # Below the limit: plain RIFF, the reserved JUNK left as it is, the sizes patched in.
    small = tmp_path / "small.wav"
    with open(small, "wb") as f:
        writer = WavStreamWriter(f, 8000, 2)
        writer.write(signal[:, :1000])
        writer.close()
    data = small.read_bytes()
    assert data[:4] == b"RIFF" and data[12:16] == b"JUNK" and len(data) == 80 + 4000
    assert soundfile.info(str(small)).frames == 1000
    # On a pipe nothing can be patched: no JUNK, the sizes stay "unknown".
    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

    pipe = Pipe()
    writer = WavStreamWriter(pipe, 8000, 2)
    writer.write(signal)
    writer.close()
    data = pipe.getvalue()
    assert data[12:16] == b"fmt " and struct.unpack_from("<I", data, 4)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<I", data, 40)[0] == 0xFFFFFFFF


# --------------------------------------------------------------------------- item 4: output format


def test_header_rates_and_channels_are_bounded_by_what_ecdc_writes() -> None:
    # ecdc encodes inputs of 1 kHz .. 1 MHz and up to 1024 channels (libsndfile's limit);
    # a header claiming an original rate it would refuse as input is corrupt.
    for rate in (1, 999):
        with pytest.raises(FormatError, match="original_sample_rate"):
            mono_header(original_sample_rate=rate).validate()
        data = bytearray(encode_header(mono_header()))
        struct.pack_into("<I", data, 28, rate)
        struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
        with pytest.raises(FormatError, match="original_sample_rate"):
            EcdcReader(io.BytesIO(bytes(data)))
    with pytest.raises(FormatError, match="original_channels"):
        mono_header(stereo_mode=StereoMode.DOWNMIX, original_channels=1025).validate()
    mono_header(stereo_mode=StereoMode.DOWNMIX, original_channels=1024,
                original_sample_rate=1_000_000).validate()


def wide_file(codec: Codec, seconds: float) -> bytes:
    """Audio coded by ``codec``, its header claiming 1024 original channels at 1 MHz."""
    data = codec.compress(test_signal(seconds, 24000), 24000, bandwidth=1.5)
    header, chunks, total = read_ecdc(data)
    header = dataclasses.replace(header, stereo_mode=StereoMode.DOWNMIX, original_channels=1024,
                                 original_sample_rate=1_000_000)
    return write_ecdc(header, chunks, total, original_samples=round(total * 1_000_000 / 24000))


def test_decoded_blocks_stay_small_whatever_the_output_format(mono_codec: Codec) -> None:
    data = wide_file(mono_codec, 0.02)  # 480 samples -> 20000 at 1 MHz, x 1024 channels
    reader = EcdcReader(io.BytesIO(data))
    blocks = list(mono_codec.decode_blocks(reader, channels=1024))  # the original count, asked for
    assert all(b.shape[0] == 1024 for b in blocks)
    assert sum(b.shape[1] for b in blocks) == 20000  # the original length, at 1 MHz
    assert max(b.size for b in blocks) <= MiB  # 4 MiB of float32: flat, not 80 MB at once
    # Silence (here: padding to the original length) comes in blocks of that size too.
    header, chunks, total = read_ecdc(data)
    longer = write_ecdc(header, chunks, total, original_samples=round(total * 1_000_000 / 24000) + 20_000)
    blocks = list(mono_codec.decode_blocks(EcdcReader(io.BytesIO(longer))))
    assert sum(b.shape[1] for b in blocks) == 40000 and max(b.size for b in blocks) <= MiB


def test_cli_decode_of_1024_channels_at_1_mhz_stays_flat(tmp_path: Path, mono_codec: Codec,
                                                         tiny_mono_ckpt: Path) -> None:
    # 0.1 s of audio: 100,000 samples x 1024 channels (205 MB of WAV, to /dev/null). The
    # old code held it all at once, several times over (2.6 GB peak); here ~300 MB, most
    # of it torch. RLIMIT_AS makes the old code fail fast ("out of memory").
    src = tmp_path / "wide.ecdc"
    src.write_bytes(wide_file(mono_codec, 0.1))
    run = run_cli(["decompress", "-q", "--checkpoint", tiny_mono_ckpt, src, "-o", "-"], tmp_path,
                  address_space=1536 * MiB, timeout=300, stdout_to_null=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert run.max_rss < 600 * MiB, f"peak RSS {run.max_rss / MiB:.0f} MiB"


# --------------------------------------------------------------------------- item 5: segments


@pytest.mark.parametrize("frames", [3000, 20000])
def test_segmented_chunk_holds_at_most_one_segment(frames: int) -> None:
    h = seg_header()  # one segment: 48000 samples, 150 frames of 320
    data = encode_header(h) + code_chunk(0, zeros(h, frames), 0.5) + end_chunk(frames * 320, 1)
    with pytest.raises(FormatError, match=rf"code chunk 0 \(audio from 0.00 s, byte \d+\) holds "
                                          rf"{frames} frames.*at most 150 frames"):
        read_ecdc(data)
    reader, items = salvage(data)  # intact but invalid: lost, like a damaged chunk
    assert not any(isinstance(i, CodeChunk) for i in items)
    assert any(f"{frames} frames, more than one segment holds (150)" in d for d in reader.damage)
    with pytest.raises(ValueError, match="one segment"):
        EcdcWriter(io.BytesIO(), h).write_chunk(CodeChunk(zeros(h, frames), 0.5))
    # A whole segment, and a short last one, are what writers produce.
    ok = encode_header(h) + code_chunk(0, zeros(h, 150), 0.5) + code_chunk(1, zeros(h, 3), 0.5)
    assert [c.num_frames for c in read_ecdc(ok + end_chunk(47520 + 960, 2))[1]] == [150, 3]


def test_long_unsegmented_chunk_is_decoded_in_bounded_pieces(mono_codec: Codec, monkeypatch) -> None:
    # A 24 kHz chunk may hold up to 2**24 codes; decoded in one push, its audio and the
    # decoder's activations grew with it (a 60,000-frame chunk: 846 MB peak, 299 MB now).
    from ecdc.models.streaming import StreamingDecoder

    pushed: list[int] = []
    push = StreamingDecoder.push

    def recording(self, segment):  # type: ignore[no-untyped-def]
        pushed.append(int(segment.codes.shape[-1]))
        return push(self, segment)

    data = mono_codec.compress(test_signal(30.0, 24000), 24000, bandwidth=1.5)
    header, chunks, total = read_ecdc(data)
    one = write_ecdc(header, [CodeChunk(np.concatenate([c.codes for c in chunks], axis=2))], total)
    expected, _ = mono_codec.decompress(data)
    monkeypatch.setattr(StreamingDecoder, "push", recording)
    got, _ = mono_codec.decompress(one)  # one chunk of 2250 frames
    assert max(pushed) <= 1024 and sum(pushed) == 2250
    assert np.array_equal(got, expected)  # the streaming decoder gives the same audio


def test_cli_refuses_a_long_segmented_chunk_in_one_line(tmp_path: Path, tiny_stereo_ckpt: Path) -> None:
    # 3000 frames in one 48 kHz chunk: decoded as one segment it made the decoder's
    # activations 20 times a segment's (1.76 GB with the real model).
    h = seg_header()
    rng = np.random.default_rng(0)
    src = tmp_path / "long.ecdc"
    src.write_bytes(encode_header(h) + code_chunk(0, rng.integers(0, 1024, (1, 4, 3000)), 0.5)
                    + end_chunk(3000 * 320, 1))
    run = run_cli(["decompress", "-q", "--checkpoint", tiny_stereo_ckpt, src, "-o", tmp_path / "long.wav"],
                  tmp_path, fsize=64 * MiB, address_space=3072 * MiB, timeout=300)
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()
    assert "code chunk 0" in line and "3000 frames" in line and "one segment" in line
    assert not (tmp_path / "long.wav").exists()


# --------------------------------------------------------------------------- item 11: scales


_STEREO_FILES: dict = {}


def scaled_file(codec: Codec, bad_scale: float) -> tuple[bytes, list[CodeChunk], EcdcHeader]:
    """A 2 s stereo file (3 segments) whose segment 1 carries ``bad_scale``."""
    if id(codec) not in _STEREO_FILES:
        _STEREO_FILES[id(codec)] = codec.compress(test_signal(2.0, 48000, 2), 48000, bandwidth=6.0)
    header, chunks, total = read_ecdc(_STEREO_FILES[id(codec)])
    parts = [code_chunk(i, c.codes, bad_scale if i == 1 else c.scale) for i, c in enumerate(chunks)]
    return encode_header(header) + b"".join(parts) + end_chunk(total, len(chunks)), chunks, header


def test_absurd_scales_are_format_errors(stereo_codec: Codec) -> None:
    for scale in (3e38, 2.0 ** 65):
        data, chunks, header = scaled_file(stereo_codec, scale)
        with pytest.raises(FormatError, match=r"code chunk 1 .*invalid scale"):
            read_ecdc(data)
        reader, items = salvage(data)
        got = [i for i in items if isinstance(i, CodeChunk)]
        [gap] = [i for i in items if isinstance(i, Gap)]
        assert got == [chunks[0], chunks[2]] and (gap.first_chunk, gap.n_chunks) == (1, 1)
        with pytest.raises(ValueError, match="scale"):
            EcdcWriter(io.BytesIO(), header).write_chunk(CodeChunk(chunks[1].codes, scale))
    read_ecdc(scaled_file(stereo_codec, 2.0 ** 64)[0])  # the largest a float32 RMS can be
    # Meta's version 0 too.
    meta = b'{"m": "encodec_48khz", "al": 100, "nc": 2, "lm": false}'
    v0 = struct.pack(">4sBI", b"ECDC", 0, len(meta)) + meta + struct.pack(">f", 3e38) + bytes(3)
    with pytest.raises(FormatError, match="invalid scale"):
        read_ecdc(v0)


def test_cli_scale_of_3e38_is_one_line_or_a_gap(tmp_path: Path, stereo_codec: Codec,
                                               tiny_stereo_ckpt: Path) -> None:
    data, _, _ = scaled_file(stereo_codec, 3e38)
    src, dst = tmp_path / "loud.ecdc", tmp_path / "loud.wav"
    src.write_bytes(data)
    run = run_cli(["decompress", "-q", "--checkpoint", tiny_stereo_ckpt, src, "-o", dst], tmp_path,
                  fsize=64 * MiB, timeout=300)
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()  # no numpy RuntimeWarning
    assert "code chunk 1" in line and "invalid scale" in line
    assert not dst.exists()
    run = run_cli(["decompress", "-q", "--salvage", "--checkpoint", tiny_stereo_ckpt, src, "-o", dst],
                  tmp_path, fsize=64 * MiB, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr and "code chunk 1 (0.99-1.98 s)" in run.stderr
    wav, rate = soundfile.read(str(dst), dtype="float32", always_2d=True)
    assert rate == 48000 and wav.shape == (96000, 2) and np.isfinite(wav).all()
    assert not wav[47520:2 * 47520].any()  # the segment's audio is silence
