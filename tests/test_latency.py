"""Low-latency streaming (``--latency``): through a pipe, compress and decompress give
output while their input is still open, and the codes are the whole-file pass's.

The subprocess tests wait for output with a bound, never assert a time: on a loaded
machine a run may be slow, but one that holds its output back until the input ends
(the long blocks: 10 s of frames past the encoder's LSTM, ~17 s for the tiny model's
decoder) fails whatever the load.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from test_pipes import UNKNOWN, Collector, codes_of, complete_code_chunks, wav_bytes

from ecdc.codec import Codec, EncodedAudio, load_model
from ecdc.container import EcdcReader
from ecdc.convert import STREAM_LATENCY, stream_latency
from ecdc.models import ENCODEC_24KHZ, EncodecModel, EncodedSegment
from ecdc.models.streaming import StreamingDecoder, StreamingEncoder, engine_seconds
from ecdc.pipeline import Chunker
from ecdc.wavstream import ArraySource, to_pcm16

from conftest import TINY_MONO, TINY_STEREO, random_model, test_signal
from refstub import make_reference_model, make_test_audio

REPO = Path(__file__).resolve().parents[1]
RATE = 24000
WAIT = 120  # seconds a subprocess may take to answer (a loaded machine), not a latency bound


def _process(*args: str) -> subprocess.Popen:
    """``python -m ecdc ARGS`` with pipes, on one thread (the window sizes depend on it)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "ecdc", *args], cwd=str(REPO), env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread, as :func:`_process` runs: the tiny model's first block grows with
    the thread count (4.3 s at one, 20 s at four), which would leave nothing to stream."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _first_block_seconds(model: EncodecModel, latency: float) -> float:
    """Audio the encoder needs before its first codes, at one thread (as in :func:`_process`)."""
    with _one_thread():
        return StreamingEncoder(model, 8, **engine_seconds(latency)).first_frames / model.frame_rate


@pytest.mark.parametrize("latency", [pytest.param(["--latency", "0"], id="latency0"),
                                     pytest.param([], id="default-to-a-pipe")])
def test_compress_flows_at_low_latency_with_whole_file_codes(tiny_mono_ckpt: Path, latency: list[str]) -> None:
    codec = load_model(str(tiny_mono_ckpt))
    signal = test_signal(12.0, RATE)
    pcm = to_pcm16(signal)
    stream = wav_bytes(pcm, RATE, riff_size=UNKNOWN, data_size=UNKNOWN)
    header_len = len(stream) - pcm.size * 2
    # A second past the first block, far short of the 10 s the long blocks hold back.
    fed = int((_first_block_seconds(codec.model, 0.5) + 1.0) * RATE)
    assert fed < 8 * RATE
    proc = _process("compress", "-", "-o", "-", "-q", "--checkpoint", str(tiny_mono_ckpt), *latency)
    assert proc.stdin is not None
    out = Collector(proc.stdout)
    try:
        proc.stdin.write(stream[:header_len + fed * 2])
        proc.stdin.flush()
        assert out.wait_for(lambda d: complete_code_chunks(d) >= 1, timeout=WAIT), \
            f"no code chunk before the input ended ({len(out.snapshot())} bytes out)"
        assert proc.poll() is None  # still waiting for the rest
        proc.stdin.write(stream[header_len + fed * 2:])
        proc.stdin.close()
        assert proc.wait(timeout=WAIT) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
    out.join(timeout=10)
    streamed = EncodedAudio.from_bytes(out.snapshot())
    whole = codec.encode(pcm.astype(np.float32) / 32768, RATE, 6.0)
    assert np.array_equal(codes_of(streamed), codes_of(whole))
    assert streamed.num_samples == whole.num_samples
    # Short chunks: the blocks' (the format allows any number of frames per chunk).
    assert len(streamed.chunks) > len(whole.chunks)


def test_decompress_flows_at_low_latency(tiny_mono_ckpt: Path, tmp_path: Path) -> None:
    codec = load_model(str(tiny_mono_ckpt))
    signal = test_signal(8.0, RATE)
    buf = io.BytesIO()
    codec.compress_stream(ArraySource(signal, RATE), buf, 6.0, latency=0)
    data = buf.getvalue()
    encoded = EncodedAudio.from_bytes(data)
    frames = [c.codes.shape[-1] for c in encoded.chunks]
    assert max(frames) <= 75
    # The header and the chunks of the first 3 s at most: a fraction of the long blocks' 17 s.
    reader = EcdcReader(io.BytesIO(data))
    for _ in zip(range(3), reader):
        pass
    cut = reader.bytes_read
    proc = _process("decompress", "-", "-o", "-", "-q", "--checkpoint", str(tiny_mono_ckpt), "--latency", "0")
    assert proc.stdin is not None
    out = Collector(proc.stdout)
    try:
        proc.stdin.write(data[:cut])
        proc.stdin.flush()
        # A WAV header (44 bytes on a pipe) and a tenth of a second of samples.
        assert out.wait_for(lambda d: len(d) >= 44 + RATE // 10 * 2, timeout=WAIT), len(out.snapshot())
        assert proc.poll() is None
        proc.stdin.write(data[cut:])
        proc.stdin.close()
        assert proc.wait(timeout=WAIT) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
    out.join(timeout=10)
    streamed = np.frombuffer(out.snapshot()[44:], dtype="<i2")
    whole, rate = codec.decode(encoded)
    assert rate == RATE
    expected = to_pcm16(whole).reshape(-1)
    assert streamed.shape == expected.shape
    assert np.abs(streamed.astype(np.int32) - expected).max() <= 1  # float rounding, at most 1 LSB


def test_latency_option_is_checked() -> None:
    proc = _process("compress", "-", "-o", "-", "--latency", "-1")
    _, err = proc.communicate(b"", timeout=WAIT)
    assert proc.returncode == 2
    assert b"--latency" in err and b"Traceback" not in err


# --------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def model24() -> EncodecModel:
    """Meta's 24 kHz architecture with seeded weights and realistic codebooks (near-ties)."""
    model = EncodecModel(ENCODEC_24KHZ)
    model.load_state_dict(make_reference_model("encodec_24khz", 1234).state_dict(), strict=True)
    return model.eval()


@pytest.mark.parametrize("latency", [0.0])  # the smallest blocks; test_streaming.py has 0.5 s ones
def test_codes_identical_at_low_latency_24khz(model24: EncodecModel, latency: float) -> None:
    wav = make_test_audio(RATE, 1, int(2.2 * RATE) + 5, seed=11)
    with torch.inference_mode():
        (whole,) = model24.encode(wav, 24.0)
    encoder = StreamingEncoder(model24, whole.codes.shape[1], **engine_seconds(latency))
    pieces = []
    with torch.inference_mode():
        for start in range(0, wav.shape[-1], 480):  # 20 ms pushes, as from a live source
            pieces += encoder.push(wav[..., start:start + 480])
        pieces += encoder.flush()
    codes = torch.cat([p.codes for p in pieces], dim=-1)
    assert len(pieces) > 5  # streamed in small blocks, not one flush
    assert torch.equal(codes, whole.codes), f"{int((codes != whole.codes).sum())} codes differ"
    # The decoder at the same setting gives the whole-file audio.
    decoder = StreamingDecoder(model24, **engine_seconds(latency))
    with torch.inference_mode():
        expected = model24.decode([whole])
        audio = torch.cat([decoder.push(EncodedSegment(p.codes, None)) for p in pieces] + [decoder.flush()], -1)
    assert audio.shape == expected.shape
    assert (audio - expected).abs().max().item() <= 1e-4


def test_codec_stream_codes_identical_at_every_latency() -> None:
    """The whole pipeline (resampling from 44.1 kHz, chunking) at several latencies."""
    codec = Codec(random_model(TINY_MONO, seed=4), bytes(16))
    signal = test_signal(7.0, 44100)
    with _one_thread():
        reference = codec.encode(signal, 44100, 6.0)
        for latency in (0.0, 0.3, 2.0):
            buf = io.BytesIO()
            codec.compress_stream(ArraySource(signal, 44100, block_frames=441), buf, 6.0, latency=latency)
            streamed = EncodedAudio.from_bytes(buf.getvalue())
            assert np.array_equal(codes_of(streamed), codes_of(reference)), latency
            if latency < 1:  # streamed in blocks: more, shorter chunks than the second-long ones
                assert len(streamed.chunks) > len(reference.chunks), latency


def test_segmented_model_streams_the_same_segments_at_low_latency() -> None:
    """The 48 kHz kind codes whole segments: latency changes nothing in its file or audio."""
    codec = Codec(random_model(TINY_STEREO, seed=2), bytes(16))
    signal = test_signal(3.3, 48000, channels=2)
    reference = codec.encode(signal, 48000, 6.0)
    buf = io.BytesIO()
    codec.compress_stream(ArraySource(signal, 48000, block_frames=960), buf, 6.0, latency=0)
    streamed = EncodedAudio.from_bytes(buf.getvalue())
    assert [c.scale for c in streamed.chunks] == [c.scale for c in reference.chunks]
    assert all(np.array_equal(a.codes, b.codes) for a, b in zip(streamed.chunks, reference.chunks))
    expected, _ = codec.decode(reference)
    audio = np.concatenate(list(codec.decode_blocks(streamed, latency=0)), axis=1)
    assert np.array_equal(audio, expected)


def test_eager_chunker_sends_everything_it_gets() -> None:
    segment = EncodedSegment(torch.arange(2 * 100, dtype=torch.int64).reshape(1, 2, 100) % 1024, None)
    eager = [c.codes.shape[-1] for c in Chunker(75, segmented=False, eager=True).add([segment])]
    held = Chunker(75, segmented=False)
    assert eager == [75, 25]
    assert [c.codes.shape[-1] for c in held.add([segment])] == [75]
    assert [c.codes.shape[-1] for c in held.flush()] == [25]


def test_default_latency_is_low_only_from_a_stream_to_a_stream(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    regular_path = tmp_path / "in.wav"
    regular_path.write_bytes(b"x")
    try:
        with os.fdopen(write_end, "wb", closefd=False) as pipe, \
                os.fdopen(read_end, "rb", closefd=False) as pipe_in, open(tmp_path / "out.ecdc", "wb") as regular:
            assert stream_latency(None, pipe_in, pipe) == STREAM_LATENCY  # live in, live out
            assert stream_latency(1.5, pipe_in, pipe) == 1.5
            assert stream_latency(None, regular_path, pipe) is None  # a whole file to a pipe: throughput
            assert stream_latency(None, str(regular_path), pipe) is None
            assert stream_latency(None, pipe_in, regular) is None  # nobody reads a file as it grows
            assert stream_latency(0.0, regular_path, regular) == 0.0
            assert stream_latency(None, pipe_in, None) is None
            assert stream_latency(None, pipe_in, io.BytesIO()) is None
    finally:
        os.close(read_end)
        os.close(write_end)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    write_end = os.open(os.devnull, os.O_WRONLY)
    try:
        with os.fdopen(write_end, "wb", closefd=False) as null:
            assert stream_latency(None, fifo, null) == STREAM_LATENCY  # a named pipe is a stream (not opened)
    finally:
        os.close(write_end)
