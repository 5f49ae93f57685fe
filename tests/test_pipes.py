"""Streaming through pipes: output flows before the input ends, memory stays flat, and the
WAV stream reader/writer behave like libsndfile. Tiny random-weight models only."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from ecdc.cli import main
from ecdc.codec import EncodedAudio, load_model
from ecdc.convert import STREAM_LATENCY
from ecdc.errors import AudioError
from ecdc.wavstream import ArraySource, SoundFileSource, WavStreamReader, WavStreamWriter, open_audio_stream, to_pcm16

from conftest import test_signal

REPO = Path(__file__).resolve().parents[1]
UNKNOWN = 0xFFFFFFFF


# --------------------------------------------------------------------------- helpers


def wav_bytes(pcm: np.ndarray, rate: int, riff_size: Optional[int] = None, data_size: Optional[int] = None,
              before_data: bytes = b"", before_fmt: bytes = b"") -> bytes:
    """A 16-bit PCM wav of ``pcm`` [C, T] int16, with sizes and extra chunks as given."""
    channels = pcm.shape[0]
    data = np.ascontiguousarray(pcm.T).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = (b"WAVE" + before_fmt + b"fmt " + struct.pack("<I", len(fmt)) + fmt + before_data
            + b"data" + struct.pack("<I", len(data) if data_size is None else data_size))
    riff = len(body) + len(data) if riff_size is None else riff_size
    return b"RIFF" + struct.pack("<I", riff) + body + data


def chunk(cid: bytes, payload: bytes) -> bytes:
    return cid + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) % 2 else b"")


class Dribble(io.RawIOBase):
    """A non-seekable stream that hands out at most a few bytes per read, like a slow pipe."""

    def __init__(self, data: bytes, sizes=(1, 3, 7, 2, 5)):
        self.data, self.pos, self.sizes, self.calls = data, 0, sizes, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.sizes[self.calls % len(self.sizes)], len(self.data) - self.pos)
        self.calls += 1
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def read_all(source) -> np.ndarray:
    blocks = list(source.blocks())
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((source.channels, 0), np.float32)


def soundfile_reference(data: bytes) -> np.ndarray:
    ref, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return ref.T


class Collector(threading.Thread):
    """Reads a subprocess's stdout as it arrives, so a test can wait for partial output."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.fd = stream.fileno()
        self.data = bytearray()
        self.cond = threading.Condition()
        self.start()

    def run(self) -> None:
        while True:
            piece = os.read(self.fd, 65536)
            with self.cond:
                if not piece:
                    self.closed = True
                    self.cond.notify_all()
                    return
                self.data += piece
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[bytes], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(bytes(self.data)):
                left = deadline - time.monotonic()
                if left <= 0 or getattr(self, "closed", False):
                    return predicate(bytes(self.data))
                self.cond.wait(left)
        return True

    def snapshot(self) -> bytes:
        with self.cond:
            return bytes(self.data)


def complete_code_chunks(data: bytes) -> int:
    """Code chunks fully present in a partial .ecdc stream (-1 while the header is incomplete)."""
    if len(data) < 8:
        return -1
    (body_len,) = struct.unpack_from("<H", data, 6)
    pos = 8 + body_len + 4
    if len(data) < pos:
        return -1
    n = 0
    while len(data) >= pos + 5:
        ctype, length = struct.unpack_from("<BI", data, pos)
        if len(data) < pos + 9 + length:
            break
        n += ctype == 0x43
        pos += 9 + length
    return n


def ecdc_process(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "ecdc", *args], cwd=str(REPO), env=env,
                            stdin=subprocess.PIPE, **kwargs)


def codes_of(encoded: EncodedAudio) -> np.ndarray:
    return np.concatenate([c.codes for c in encoded.chunks], axis=-1)


# --------------------------------------------------------------------------- pipes end to end


def test_compress_output_flows_before_stdin_closes(tiny_mono_ckpt):
    rate = 24000  # the model's rate: no resampling, so the codes must equal Codec.encode's
    signal = test_signal(24.0, rate)
    pcm = to_pcm16(signal)
    stream = wav_bytes(pcm, rate, riff_size=UNKNOWN, data_size=UNKNOWN)  # as ffmpeg writes to a pipe
    header_len = len(stream) - pcm.size * 2
    proc = ecdc_process("compress", "-", "-o", "-", "-q", "--checkpoint", str(tiny_mono_ckpt),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Collector(proc.stdout)
    try:
        proc.stdin.write(stream[:header_len])
        pos = header_len
        # 16 s, a quarter second at a time: the tiny model's encoder works in blocks of
        # ~7 s, and its LSTM and quantiser in chunks of 10 s (real models: 2 s and 10 s).
        for _ in range(64):
            proc.stdin.write(stream[pos:pos + rate // 4 * 2])
            proc.stdin.flush()
            pos += rate // 4 * 2
        assert out.wait_for(lambda d: complete_code_chunks(d) >= 1, timeout=60), \
            f"no code chunk before the input ended ({len(out.snapshot())} bytes out)"
        assert proc.poll() is None  # still waiting for the rest of its input
        assert out.snapshot()[:5] == b"ECDC\x01"
        proc.stdin.write(stream[pos:])
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
    out.join(timeout=10)
    streamed = EncodedAudio.from_bytes(out.snapshot())
    assert streamed.header.num_samples is None  # streamed: the end marker carries the length
    assert streamed.num_samples == streamed.original_samples == signal.shape[1]
    whole = load_model(str(tiny_mono_ckpt)).encode(pcm.astype(np.float32) / 32768, rate, 6.0)
    assert np.array_equal(codes_of(streamed), codes_of(whole))
    # To a pipe the chunks are as short as the blocks (--latency; tests/test_latency.py), never over a second.
    assert max(c.codes.shape[-1] for c in streamed.chunks) <= max(c.codes.shape[-1] for c in whole.chunks)


def test_decompress_output_flows_before_input_ends(tiny_mono_ckpt):
    codec = load_model(str(tiny_mono_ckpt))
    # The tiny model's streaming decoder works in chunks of ~17 s (its narrow convolutions
    # need wide windows to stay on the same CPU kernels); real models use 10 s.
    encoded = codec.encode(test_signal(21.0, 24000), 24000, 6.0)
    data = encoded.to_bytes()
    assert len(encoded.chunks) == 21
    # Everything but the last two chunks and the end marker.
    cut = len(data) - sum(9 + 8 + c.codes.size * 10 // 8 for c in encoded.chunks[-2:]) - 29
    proc = ecdc_process("decompress", "-", "-o", "-", "-q", "--checkpoint", str(tiny_mono_ckpt),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Collector(proc.stdout)
    try:
        proc.stdin.write(data[:cut])
        proc.stdin.flush()
        assert out.wait_for(lambda d: len(d) >= 44 + 24000 * 2, timeout=60), len(out.snapshot())
        early = out.snapshot()
        assert proc.poll() is None
        assert early[:4] == b"RIFF" and early[8:12] == b"WAVE"
        assert struct.unpack_from("<I", early, 40)[0] == UNKNOWN  # a pipe: sizes unknown
        proc.stdin.write(data[cut:])
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
    out.join(timeout=10)
    wav = out.snapshot()
    rate = codec.output_format(encoded.header)[0]
    # To a pipe the decoder runs in short blocks (STREAM_LATENCY), which round the audio
    # differently from the long ones (within 1e-7; tests/test_latency.py): the same blocks here.
    expected = np.concatenate(list(codec.decode_blocks(encoded, latency=STREAM_LATENCY)), axis=1)
    assert wav[44:] == to_pcm16(expected).T.tobytes()
    got, got_rate = soundfile.read(io.BytesIO(wav), dtype="int16", always_2d=True)  # readers accept it
    assert got_rate == rate and got.shape == (expected.shape[1], 1)


def test_raw_output(tmp_path, tiny_mono_ckpt, wav_file):
    ecdc_file = tmp_path / "in.ecdc"
    assert CliRunner().invoke(main, ["compress", str(wav_file), "-o", str(ecdc_file),
                                     "--checkpoint", str(tiny_mono_ckpt)]).exit_code == 0
    as_wav = CliRunner().invoke(main, ["decompress", str(ecdc_file), "-o", "-", "--checkpoint", str(tiny_mono_ckpt)])
    as_raw = CliRunner().invoke(main, ["decompress", str(ecdc_file), "-o", "-", "--raw",
                                       "--checkpoint", str(tiny_mono_ckpt)])
    assert as_wav.exit_code == 0 and as_raw.exit_code == 0, (as_wav.stderr, as_raw.stderr)
    assert as_wav.stdout_bytes[:4] == b"RIFF" and as_raw.stdout_bytes[:4] != b"RIFF"
    # s16le, interleaved, no header. CliRunner's stdout can seek, so the WAV header also
    # reserves a 36-byte JUNK chunk (room for RF64's ds64).
    assert as_wav.stdout_bytes[12:16] == b"JUNK" and as_wav.stdout_bytes[80:] == as_raw.stdout_bytes
    frames = len(as_raw.stdout_bytes) // 2  # the one coded channel (of the stereo input), 16 bits
    assert frames == soundfile.info(str(wav_file)).frames
    # The default output name says what it is.
    result = CliRunner().invoke(main, ["decompress", str(ecdc_file), "--raw", "--checkpoint", str(tiny_mono_ckpt)])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "in.raw").read_bytes() == as_raw.stdout_bytes


def test_file_to_file_gives_whole_file_codes(tmp_path, tiny_mono_ckpt, tiny_stereo_ckpt):
    """The CLI's streamed path and the in-memory Codec.encode give the same codes and audio."""
    for ckpt, rate, channels in ((tiny_mono_ckpt, 24000, 1), (tiny_stereo_ckpt, 48000, 2)):
        src = tmp_path / f"{rate}.wav"
        signal = test_signal(2.7, rate, channels=channels)
        soundfile.write(str(src), signal.T, rate, subtype="FLOAT")
        dst = tmp_path / f"{rate}.ecdc"
        result = CliRunner().invoke(main, ["compress", str(src), "-o", str(dst), "--checkpoint", str(ckpt)])
        assert result.exit_code == 0, result.stderr
        codec = load_model(str(ckpt))
        streamed = EncodedAudio.from_bytes(dst.read_bytes())
        whole = codec.encode(signal, rate, 6.0)
        assert len(streamed.chunks) == len(whole.chunks)
        for a, b in zip(streamed.chunks, whole.chunks):
            assert np.array_equal(a.codes, b.codes) and a.scale == b.scale
        out = tmp_path / f"{rate}.out.wav"
        result = CliRunner().invoke(main, ["decompress", str(dst), "-o", str(out), "--checkpoint", str(ckpt)])
        assert result.exit_code == 0, result.stderr
        expected, _ = codec.decode(whole)
        got, _ = soundfile.read(str(out), dtype="int16", always_2d=True)
        assert np.array_equal(got.T, to_pcm16(expected))


# Reports the process's own peak RSS at exit. (ru_maxrss of a child is no good here: Linux
# carries the parent's resident size at fork into it, and the parent is a pytest with torch.)
_REPORT_PEAK = """
import atexit, sys
def report():
    with open("/proc/self/status") as f:
        peak = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
    sys.stderr.write("\\nVmHWM " + peak + "\\n")
atexit.register(report)
sys.argv[0] = "ecdc"
from ecdc.cli import main
main()
"""


def _peak_rss_kib(args: List[str], stream: bytes, piece: int = 1 << 16) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _REPORT_PEAK, *args], cwd=str(REPO), env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for start in range(0, len(stream), piece):
        proc.stdin.write(stream[start:start + piece])
    proc.stdin.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    return int(err.rsplit("VmHWM ", 1)[1].split()[0])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_memory_does_not_grow_with_the_input(tiny_mono_ckpt):
    rate = 48000  # resampled to the model's 24 kHz on the way in
    args = ["compress", "-", "-o", "-", "-q", "-b", "1.5", "--checkpoint", str(tiny_mono_ckpt)]
    ten = to_pcm16(test_signal(10.0, rate))
    short = wav_bytes(ten, rate, riff_size=UNKNOWN, data_size=UNKNOWN)
    long = wav_bytes(np.tile(ten, 12), rate, riff_size=UNKNOWN, data_size=UNKNOWN)  # 2 minutes
    peak_short = _peak_rss_kib(args, short)
    peak_long = _peak_rss_kib(args, long)
    # Streaming holds a few blocks of seconds: the steady state (reached after ~15 s; the
    # 10 s run never gets there) is ~20 MB above the 10 s peak, whatever the length.
    # Whole-file processing held the PCM, float copies of it and the model's activations
    # for all of it: about 300 MB more for these 2 minutes than for 10 s.
    assert peak_long - peak_short < 48 * 1024, (peak_short, peak_long)


# --------------------------------------------------------------------------- the WAV stream reader


@pytest.mark.parametrize("fmt,subtype", [
    ("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"),
    ("WAV", "FLOAT"), ("WAV", "DOUBLE"), ("WAVEX", "PCM_16"), ("WAVEX", "PCM_24"), ("WAVEX", "FLOAT"),
    ("RF64", "PCM_16"),
])
def test_reader_decodes_like_libsndfile(fmt, subtype):
    signal = np.clip(test_signal(0.2, 22050, channels=3) * 3, -1, 1)
    buf = io.BytesIO()
    soundfile.write(buf, signal.T, 22050, format=fmt, subtype=subtype)
    data = buf.getvalue()
    reader = WavStreamReader(Dribble(data), block_frames=333)
    assert (reader.sample_rate, reader.channels, reader.frames) == (22050, 3, signal.shape[1])
    got = read_all(reader)
    assert got.dtype == np.float32
    assert np.array_equal(got, soundfile_reference(data))


def test_reader_with_unknown_sizes_reads_to_the_end():
    pcm = to_pcm16(test_signal(0.3, 8000, channels=2))
    for riff, size in ((UNKNOWN, UNKNOWN), (0, 0), (12345, UNKNOWN)):
        reader = WavStreamReader(Dribble(wav_bytes(pcm, 8000, riff_size=riff, data_size=size)))
        assert reader.frames is None
        assert np.array_equal(to_pcm16(read_all(reader)), pcm)


def test_reader_skips_chunks_before_data_and_stops_at_the_data_size():
    pcm = to_pcm16(test_signal(0.1, 16000))
    junk = chunk(b"JUNK", b"x" * 27)  # odd size: padded
    info = chunk(b"LIST", b"INFOISFT" + struct.pack("<I", 13) + b"Lavf60.3.100\0\0")
    data = wav_bytes(pcm, 16000, before_fmt=junk, before_data=info + chunk(b"fact", b"\0" * 4))
    trailing = data + chunk(b"id3 ", b"not audio" * 5)
    for stream in (io.BytesIO(trailing), Dribble(trailing)):
        assert np.array_equal(to_pcm16(read_all(WavStreamReader(stream))), pcm)


def test_reader_big_endian_rifx():
    pcm = to_pcm16(test_signal(0.05, 8000, channels=2))
    fmt = struct.pack(">HHIIHH", 1, 2, 8000, 32000, 4, 16)
    body = np.ascontiguousarray(pcm.T).astype(">i2").tobytes()
    data = (b"RIFX" + struct.pack(">I", 36 + len(body)) + b"WAVE" + b"fmt " + struct.pack(">I", 16) + fmt
            + b"data" + struct.pack(">I", len(body)) + body)
    assert np.array_equal(to_pcm16(read_all(WavStreamReader(io.BytesIO(data)))), pcm)


def test_reader_truncation():
    pcm = to_pcm16(test_signal(0.1, 8000, channels=2))
    data = wav_bytes(pcm, 8000)
    for cut in (0, 5, 20, 40):  # inside the header: an error
        with pytest.raises(AudioError):
            read_all(WavStreamReader(io.BytesIO(data[:cut])))
    for cut in (len(data) - 400, len(data) - 401):  # inside the samples: what is there, as libsndfile
        got = read_all(WavStreamReader(Dribble(data[:cut])))
        assert np.array_equal(got, soundfile_reference(data[:cut]))
        assert got.shape[1] == (cut - 44) // 4


def test_reader_refuses_what_is_not_a_wav():
    with pytest.raises(AudioError, match="not a WAV"):
        WavStreamReader(io.BytesIO(b"fLaC" + b"\0" * 60))
    with pytest.raises(AudioError, match="fmt"):
        WavStreamReader(io.BytesIO(b"RIFF\xff\xff\xff\xffWAVEdata\xff\xff\xff\xff" + b"\0" * 64))


def test_stream_source_falls_back_to_whole_file_decoding():
    signal = test_signal(0.2, 16000, channels=2)
    for fmt, subtype in (("FLAC", "PCM_16"), ("WAV", "ULAW"), ("OGG", "VORBIS")):
        buf = io.BytesIO()
        soundfile.write(buf, signal.T, 16000, format=fmt, subtype=subtype)
        data = buf.getvalue()
        source = open_audio_stream(Dribble(data, sizes=(4096,)))
        assert isinstance(source, SoundFileSource)
        assert np.array_equal(read_all(source), soundfile_reference(data))
    assert isinstance(open_audio_stream(io.BytesIO(wav_bytes(to_pcm16(signal), 16000))), WavStreamReader)
    with pytest.raises(AudioError, match="empty"):
        open_audio_stream(io.BytesIO(b""))


def test_writer_matches_libsndfile_and_patches_sizes_when_it_can():
    signal = test_signal(0.3, 24000, channels=2) * 4  # loud: clipped, never wrapped
    reference = io.BytesIO()
    soundfile.write(reference, np.clip(signal, -1, 32767 / 32768).T, 24000, subtype="PCM_16", format="WAV")
    seekable = io.BytesIO()
    writer = WavStreamWriter(seekable, 24000, 2)
    for start in range(0, signal.shape[1], 1000):
        writer.write(signal[:, start:start + 1000])
    writer.close()
    # libsndfile's file plus the JUNK chunk a seekable output reserves for RF64's ds64.
    ref = reference.getvalue()
    junk = b"JUNK" + struct.pack("<I", 28) + bytes(28)
    assert seekable.getvalue() == b"RIFF" + struct.pack("<I", len(ref) + 36 - 8) + ref[8:12] + junk + ref[12:]

    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

    pipe = Pipe()
    writer = WavStreamWriter(pipe, 24000, 2)
    writer.write(signal)
    writer.close()
    assert pipe.getvalue()[44:] == reference.getvalue()[44:]
    assert struct.unpack_from("<I", pipe.getvalue(), 4)[0] == UNKNOWN
    assert struct.unpack_from("<I", pipe.getvalue(), 40)[0] == UNKNOWN
    got, _ = soundfile.read(io.BytesIO(pipe.getvalue()), dtype="int16", always_2d=True)
    assert np.array_equal(got.T, to_pcm16(signal))
    multi = io.BytesIO()
    writer = WavStreamWriter(multi, 8000, 6)
    writer.write(np.zeros((6, 10), np.float32))
    writer.close()
    info = soundfile.info(io.BytesIO(multi.getvalue()))
    assert (info.channels, info.frames, info.subtype) == (6, 10, "PCM_16")


def test_array_source_blocks():
    wav = test_signal(1.0, 8000, channels=2)
    source = ArraySource(wav, 8000, block_frames=3000)
    assert [b.shape[1] for b in source.blocks()] == [3000, 3000, 2000]
    assert np.array_equal(read_all(source), wav)
