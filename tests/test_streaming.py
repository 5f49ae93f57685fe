"""Block-by-block encoding and decoding against the whole-file pass.

The streamed codes must be *identical* to :meth:`EncodecModel.encode` on the whole input
(a near-tie in a deep RVQ stage flips on a 1e-7 difference, hence the realistic
codebooks of :func:`refstub.make_reference_model`), the streamed audio within 1e-4 of
:meth:`EncodecModel.decode`, and the state held between calls must not grow with the
input length.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import pytest
import torch

from ecdc.errors import ModelError
from ecdc.models import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecConfig, EncodecModel, EncodedSegment
from ecdc.models.streaming import StreamingDecoder, StreamingEncoder

from conftest import TINY_MONO, TINY_STEREO, random_model
from refstub import make_reference_model, make_test_audio

AUDIO_TOL = 1e-4
SEED = 1234
SR24 = 24_000
# 3.3 s + 17 samples: not a multiple of the hop, of 1 s blocks (75 frames) nor of 1.37 s.
MAIN_LENGTH = int(3.3 * SR24) + 17


def _model(name: str, config: EncodecConfig) -> EncodecModel:
    model = EncodecModel(config)
    model.load_state_dict(make_reference_model(name, SEED).state_dict(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def model24() -> EncodecModel:
    return _model("encodec_24khz", ENCODEC_24KHZ)


@pytest.fixture(scope="module")
def clip24(model24: EncodecModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio, whole-file codes at 24 kbps) of the main 24 kHz test clip."""
    wav = make_test_audio(SR24, 1, MAIN_LENGTH, seed=7)
    with torch.inference_mode():
        (seg,) = model24.encode(wav, 24.0)
    return wav, seg.codes


def _pieces(wav: torch.Tensor, sizes: Iterable[int]) -> Iterable[torch.Tensor]:
    """``wav`` cut into consecutive pieces of the given sizes, cycled."""
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= wav.shape[-1]:
            return
        yield wav[..., pos : pos + size]
        pos += size


def _stream_encode(model: EncodecModel, wav: torch.Tensor, num_codebooks: int, sizes: Iterable[int],
                   block_seconds: float = 1.0, chunk_seconds: float | None = None) -> list[EncodedSegment]:
    """Streamed codes; the frame-rate chunks default to the block size (their smallest)."""
    encoder = StreamingEncoder(model, num_codebooks, block_seconds=block_seconds,
                               chunk_seconds=chunk_seconds or block_seconds)
    out: list[EncodedSegment] = []
    with torch.inference_mode():
        for piece in _pieces(wav, sizes):
            out += encoder.push(piece)
        assert encoder.num_samples == wav.shape[-1]
        out += encoder.flush()
    return out


def _stream_decode(model: EncodecModel, segments: list[EncodedSegment],
                   block_seconds: float = 1.0, chunk_seconds: float | None = None) -> torch.Tensor:
    decoder = StreamingDecoder(model, block_seconds=block_seconds, chunk_seconds=chunk_seconds or block_seconds)
    with torch.inference_mode():
        parts = [decoder.push(seg) for seg in segments]
        parts.append(decoder.flush())
    return torch.cat(parts, dim=-1)


def _joined(segments: list[EncodedSegment]) -> torch.Tensor:
    assert all(seg.scale is None for seg in segments)
    return torch.cat([seg.codes for seg in segments], dim=-1)


# --------------------------------------------------------------------------- 24 kHz, causal


# Push sizes: runs of single samples, odd sizes, a hop's worth, over a second.
TINY_AND_ODD = (1, 1, 1, 333, 4800, 1, 24007, 7)


@pytest.mark.parametrize("bandwidth,block_seconds,chunk_seconds,sizes", [
    pytest.param(24.0, 1.0, None, TINY_AND_ODD, id="24kbps-block1s-tiny"),
    pytest.param(6.0, 1.37, None, (24007, 4800, 333), id="6kbps-block1.37s-odd"),
    # Frame-rate chunks that are not a multiple of the block: chunks end inside blocks.
    pytest.param(24.0, 0.5, 1.3, (24007, 4800, 333), id="24kbps-block0.5s-chunk1.3s"),
])
def test_codes_identical_24khz(model24: EncodecModel, clip24, bandwidth: float, block_seconds: float,
                               chunk_seconds: float | None, sizes: tuple[int, ...]) -> None:
    wav, whole = clip24
    k = model24.num_codebooks(bandwidth)
    # RVQ stage i never looks at later stages, so the 6 kbps codes are the first 8 rows of
    # the 24 kbps ones (the same ops in the same order): one whole-file pass serves both.
    expected = whole[:, :k]
    segments = _stream_encode(model24, wav, k, sizes, block_seconds, chunk_seconds)
    assert len(segments) > 2  # really streamed, not one flush
    codes = _joined(segments)
    assert codes.shape == expected.shape
    assert torch.equal(codes, expected), f"{int((codes != expected).sum())} codes differ"


def test_decode_matches_whole_file_24khz(model24: EncodecModel, clip24) -> None:
    _, whole = clip24
    with torch.inference_mode():
        expected = model24.decode([EncodedSegment(whole, None)])
    # The decoder takes runs of any length: cut the codes into runs of 1 to 150 frames.
    cuts = itertools.accumulate(itertools.cycle((1, 37, 150, 2)))
    bounds = [0, *itertools.takewhile(lambda c: c < whole.shape[-1], cuts), whole.shape[-1]]
    runs = [EncodedSegment(whole[..., a:b], None) for a, b in zip(bounds, bounds[1:])]
    # 1 s blocks (75 frames; the minimum is 65), blocks leaving a 1-frame remainder,
    # and frame-rate chunks that end inside a block.
    one_short = (whole.shape[-1] - 1) / model24.frame_rate
    for block_seconds, chunk_seconds in ((1.0, None), (one_short, None), (1.0, 2.5), (1.0, one_short)):
        audio = _stream_decode(model24, runs, block_seconds, chunk_seconds)
        assert audio.shape == expected.shape
        diff = (audio - expected).abs().max().item()
        print(f"24 kHz streamed decode, blocks of {block_seconds:.2f} s, chunks of {chunk_seconds} s: "
              f"max |diff| = {diff:.3g}")
        assert diff <= AUDIO_TOL


@pytest.mark.parametrize("num_samples,batch", [
    pytest.param(75 * 320 + 100, 2, id="a-block-plus-one-frame-batch2"),
    pytest.param(int(0.9 * SR24) + 3, 1, id="shorter-than-a-block"),
    pytest.param(217, 1, id="shorter-than-a-frame"),
])
def test_codes_identical_24khz_edges(model24: EncodecModel, num_samples: int, batch: int) -> None:
    wav = make_test_audio(SR24, 1, num_samples, batch=batch, seed=num_samples)
    with torch.inference_mode():
        (whole,) = model24.encode(wav, 6.0)
    codes = _joined(_stream_encode(model24, wav, 8, (4801, 1, 19999), block_seconds=1.0))
    assert torch.equal(codes, whole.codes)


# --------------------------------------------------------------------------- 48 kHz, segmented


def test_segmented_48khz_matches_whole_file() -> None:
    # Each segment goes through the same encode_segment call as in the whole-file pass, so
    # near-tie-prone realistic codebooks add nothing here; random ones build much faster.
    model = random_model(ENCODEC_48KHZ, seed=4)
    wav = make_test_audio(48_000, 2, int(3.7 * 48_000), seed=11)
    with torch.inference_mode():
        whole = model.encode(wav, 12.0)
        expected = model.decode(whole)
    segments = _stream_encode(model, wav, model.num_codebooks(12.0), (4801, 333, 17, 77777))
    assert len(segments) == len(whole) == 4
    for got, want in zip(segments, whole):
        assert torch.equal(got.codes, want.codes)
        assert got.scale is not None and want.scale is not None
        assert torch.equal(got.scale, want.scale)
    audio = _stream_decode(model, segments)
    assert audio.shape == expected.shape
    diff = (audio - expected).abs().max().item()
    print(f"48 kHz streamed decode: max |diff| = {diff:.3g}")
    assert diff <= AUDIO_TOL


@pytest.mark.parametrize("seconds", [0.002, 0.99, 1.0, 0.99 + 0.001, 2.5])
def test_segmented_edges(seconds: float) -> None:
    """Inputs shorter than a segment, ending inside an overlap, or on a segment boundary."""
    model = random_model(TINY_STEREO, seed=2)
    wav = make_test_audio(48_000, 2, int(seconds * 48_000), seed=3)
    with torch.inference_mode():
        whole = model.encode(wav, 6.0)
        expected = model.decode(whole)
    segments = _stream_encode(model, wav, model.num_codebooks(6.0), (12345, 1))
    assert len(segments) == len(whole)
    for got, want in zip(segments, whole):
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    audio = _stream_decode(model, segments)
    assert audio.shape == expected.shape
    assert (audio - expected).abs().max().item() <= AUDIO_TOL


# --------------------------------------------------------------------------- tiny models, memory


def _push_all(encoder: StreamingEncoder, decoder: StreamingDecoder, wav: torch.Tensor, piece: int
              ) -> tuple[list[EncodedSegment], torch.Tensor, list[int], list[int]]:
    """Stream ``wav`` through both in pieces: (segments, audio, held after each encoder push,
    held after each decoder push)."""
    segments, audio, enc_held, dec_held = [], [], [], []
    with torch.inference_mode():
        for chunk in _pieces(wav, (piece,)):
            for seg in encoder.push(chunk):
                segments.append(seg)
                audio.append(decoder.push(seg))
                dec_held.append(decoder.buffered_elements())
            enc_held.append(encoder.buffered_elements())
        for seg in encoder.flush():
            segments.append(seg)
            audio.append(decoder.push(seg))
        audio.append(decoder.flush())
    return segments, torch.cat(audio, dim=-1), enc_held, dec_held


def _assert_not_growing(held: list[int], slack: int) -> None:
    """No more held in the second half of the stream than in the first, give or take."""
    half = len(held) // 2
    assert half >= 2
    assert max(held[half:]) <= max(held[:half]) + slack, (max(held[:half]), max(held[half:]))


def test_tiny_causal_exact_and_bounded() -> None:
    """60 s in small pieces through a tiny causal model: codes and audio as whole-file, and
    what is held between calls stops growing once the first blocks are through.

    Also another architecture (one LSTM layer, narrow convs, hence other window sizes).
    """
    config = TINY_MONO
    model = random_model(config, seed=3)
    rate, piece = config.sample_rate, config.sample_rate // 7
    wav = make_test_audio(rate, config.channels, 60 * rate + 211, seed=1)
    encoder = StreamingEncoder(model, 4, block_seconds=2.0)
    decoder = StreamingDecoder(model, block_seconds=2.0)
    segments, audio, enc_held, dec_held = _push_all(encoder, decoder, wav, piece)
    with torch.inference_mode():
        (whole,) = model.encode(wav, 3.0)
        expected = model.decode([whole])
    assert torch.equal(_joined(segments), whole.codes)
    assert audio.shape == expected.shape
    assert (audio - expected).abs().max().item() <= AUDIO_TOL
    # Besides input, the encoder holds up to a chunk of LSTM inputs (64 channels).
    feats = encoder.chunk_frames * encoder._lstm.lstm.input_size
    _assert_not_growing(enc_held, slack=piece + feats)
    # The decoder: a run of codes, and LSTM outputs waiting for the next block.
    waiting = decoder.block_frames * decoder._lstm.lstm.hidden_size
    _assert_not_growing(dec_held, slack=max(seg.codes.numel() for seg in segments) + waiting)
    # A few blocks of input at most (the tiny model's minimum blocks are ~4 s and ~17 s).
    assert max(enc_held) <= 12 * rate + feats
    assert max(dec_held) <= 2 * 4 * 1300 + 2 * 64 * 1300


def test_causal_model_without_lstm() -> None:
    """The LSTM is optional in the config: then the whole network is one windowed part."""
    config = EncodecConfig(**{**TINY_MONO.to_dict(), "name": "no_lstm", "lstm_layers": 0})
    model = random_model(config, seed=5)
    wav = make_test_audio(SR24, 1, 20 * SR24 + 101, seed=2)  # > 2 encoder and 1 decoder blocks
    with torch.inference_mode():
        (whole,) = model.encode(wav, 6.0)
        expected = model.decode([whole])
    segments = _stream_encode(model, wav, 8, (5003, 1), block_seconds=2.0)
    assert len(segments) > 2
    assert torch.equal(_joined(segments), whole.codes)
    audio = _stream_decode(model, segments, block_seconds=2.0)
    assert audio.shape == expected.shape
    assert (audio - expected).abs().max().item() <= AUDIO_TOL


def test_segmented_memory_is_bounded() -> None:
    config = TINY_STEREO
    model = random_model(config, seed=3)
    rate, piece = config.sample_rate, config.sample_rate // 3
    per_pass = model.DEFAULT_BATCH_SEGMENTS
    # Four batched passes of segments: the first half of the stream holds a whole cycle
    # of the held state, so the second half can be checked against it.
    wav = make_test_audio(rate, config.channels, 4 * per_pass * rate + 211, seed=1)
    segments, audio, enc_held, dec_held = _push_all(
        StreamingEncoder(model, 2), StreamingDecoder(model), wav, piece)
    seg_len, stride = model.segment_length, model.segment_stride
    assert len(segments) == -(-wav.shape[-1] // stride)
    assert audio.shape[-1] == stride * (len(segments) - 1) + segments[-1].codes.shape[-1] * 320
    _assert_not_growing(enc_held, slack=config.channels * piece)
    _assert_not_growing(dec_held, slack=segments[0].codes.numel())
    # The segments of one batched pass plus a push, and the overlap being cross-faded.
    assert max(enc_held) <= config.channels * ((per_pass + 1) * seg_len + piece)
    assert max(dec_held) <= config.channels * 2 * seg_len + (per_pass + 1) * segments[0].codes.numel()


# --------------------------------------------------------------------------- API errors


def test_errors() -> None:
    model = random_model(TINY_MONO)
    encoder = StreamingEncoder(model, 2)
    with pytest.raises(ModelError):
        encoder.push(torch.zeros(1, 2, 100))  # stereo into a mono model
    with pytest.raises(ModelError):
        encoder.push(torch.zeros(1, 1, 100, dtype=torch.int16))
    with torch.inference_mode():
        assert encoder.push(torch.zeros(1, 1, 0)) == []
        assert encoder.flush() == []  # nothing pushed: nothing to encode
    with pytest.raises(ModelError):
        encoder.push(torch.zeros(1, 1, 10))
    with pytest.raises(ModelError):
        StreamingEncoder(model, model.max_codebooks + 1)
    decoder = StreamingDecoder(model)
    with torch.inference_mode():
        assert decoder.flush().shape[-1] == 0
    non_causal = EncodecModel(EncodecConfig(**{**TINY_MONO.to_dict(), "name": "nc", "causal": False}))
    with pytest.raises(ModelError, match="causal"):
        StreamingEncoder(non_causal, 2)
    with pytest.raises(ModelError, match="causal"):
        StreamingDecoder(non_causal)
