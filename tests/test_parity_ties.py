"""Codes identical to Meta's reference (encodec 0.1.1) where near-ties are everywhere.

Issue 13: with codebooks that have close codes, the choice between two codes is decided by
the last bits of the latent and of the distance computation, so any path that rounds
differently from the reference (which codes a 48 kHz clip one segment at a time and a
24 kHz clip in one pass) picks other codes. Here every codebook is made of the clip's own
encoder frames (stage residuals for deeper stages), drawn with repeats and moved by 1e-3
of their spread, so most frames have two or more codes almost equally near. Every path
the CLI takes must still give the reference's codes: the whole-clip encode (batched
segment passes for 48 kHz), one segment at a time, and the streaming engine with several
push and block sizes (what ``ecdc compress`` and its ``-j`` workers run), at 1, 2 and 4
threads. The reference's own codes depend on the thread count, so each count is compared
with the reference at that count.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import pytest
import torch

from ecdc.models import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecConfig, EncodecModel
from ecdc.models.streaming import StreamingEncoder

from refstub import import_encodec, make_test_audio

encodec = import_encodec()

SEED = 99
NOISE = 1e-3  # of each latent dimension's spread
THREADS = (1, 2, 4)


@dataclass
class TieCase:
    """A reference model with tie-heavy codebooks, ours loaded from it, and the clip."""

    config: EncodecConfig
    ref: torch.nn.Module
    ours: EncodecModel
    wav: torch.Tensor
    bandwidth: float


def _reference_latents(ref, wav: torch.Tensor) -> torch.Tensor:
    """The reference encoder's frames ``[N, D]`` of ``wav``, segment by segment as its
    ``encode`` cuts and normalises them."""
    length = wav.shape[-1]
    seg_len = ref.segment_length or length
    stride = ref.segment_stride or length
    frames = []
    for start in range(0, length, stride):
        piece = wav[..., start : start + seg_len]
        if ref.normalize:
            mono = piece.mean(dim=1, keepdim=True)
            piece = piece / (1e-8 + mono.pow(2).mean(dim=2, keepdim=True).sqrt())
        latent = ref.encoder(piece)
        frames.append(latent.transpose(1, 2).reshape(-1, latent.shape[1]))
    return torch.cat(frames)


@torch.no_grad()
def _fill_tie_heavy_codebooks(ref, wav: torch.Tensor, seed: int) -> None:
    """Stage i's codebook: stage-i residuals of ``wav``'s own frames, drawn with repeats,
    plus ``NOISE`` x spread; residuals for the next stage use the reference's own choice."""
    gen = torch.Generator().manual_seed(seed)
    samples = _reference_latents(ref, wav)
    for layer in ref.quantizer.vq.layers:
        book = layer._codebook
        idx = torch.randint(0, samples.shape[0], (book.codebook_size,), generator=gen)
        spread = samples.std(dim=0, keepdim=True)
        embed = samples[idx] + NOISE * spread * torch.randn(idx.numel(), samples.shape[1], generator=gen)
        book.embed.copy_(embed)
        book.embed_avg.copy_(embed)
        book.cluster_size.fill_(1.0)
        book.inited.fill_(1.0)
        samples = samples - embed[book.quantize(samples)]


_CASES: dict[str, TieCase] = {}


def _case(name: str) -> TieCase:
    """Built once per module (the 48 kHz reference takes a few seconds on 2 cores)."""
    if name not in _CASES:
        config, builder, channels = {
            "encodec_24khz": (ENCODEC_24KHZ, encodec.EncodecModel.encodec_model_24khz, 1),
            "encodec_48khz": (ENCODEC_48KHZ, encodec.EncodecModel.encodec_model_48khz, 2),
        }[name]
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the reference's weight_norm
            torch.manual_seed(SEED)
            ref = builder(pretrained=False).eval()
        # 2.5 s: three 48 kHz segments (two full ones, coded in one batched pass, and a
        # short last one); not a whole number of 320-sample frames.
        wav = make_test_audio(config.sample_rate, channels, int(2.5 * config.sample_rate) + 17, seed=3)
        _fill_tie_heavy_codebooks(ref, wav, SEED + 1)
        ours = EncodecModel(config)
        ours.load_state_dict(ref.state_dict(), strict=True)
        ours.eval()
        _CASES[name] = TieCase(config, ref, ours, wav, config.bandwidths[-1])
    return _CASES[name]


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}threads")
def threads(request) -> Iterator[int]:
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(previous)


def _reference(case: TieCase) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    with torch.inference_mode():
        case.ref.set_target_bandwidth(case.bandwidth)
        return [(codes, scale) for codes, scale in case.ref.encode(case.wav)]


def _streamed(case: TieCase, push: int, **seconds: float) -> list:
    encoder = StreamingEncoder(case.ours, case.ours.num_codebooks(case.bandwidth), **seconds)
    out = []
    with torch.inference_mode():
        for start in range(0, case.wav.shape[-1], push):
            out += encoder.push(case.wav[..., start : start + push])
        out += encoder.flush()
    return out


def _differing(codes: list[torch.Tensor], ref_codes: list[torch.Tensor]) -> int:
    """Codes that differ, or -1 when the shapes do not even agree."""
    ours, theirs = torch.cat(codes, dim=-1), torch.cat(ref_codes, dim=-1)
    return int((ours != theirs).sum()) if ours.shape == theirs.shape else -1


# --------------------------------------------------------------------------- the test itself


@pytest.mark.parametrize("name", ["encodec_24khz", "encodec_48khz"])
def test_codebooks_are_tie_heavy(name: str) -> None:
    """Guards the test: for most frames the nearest two first-stage codes are closer to
    each other, relative to the distance, than float32 computes the distance (~1e-5)."""
    case = _case(name)
    with torch.inference_mode():
        frames = _reference_latents(case.ref, case.wav).double()
        embed = case.ref.quantizer.vq.layers[0]._codebook.embed.double()
        dist = torch.cdist(frames, embed).pow(2)
        nearest = dist.topk(2, largest=False).values
        relative_gap = (nearest[:, 1] - nearest[:, 0]) / frames.pow(2).sum(1)
    assert float((relative_gap < 1e-5).double().mean()) > 0.5
    codes = torch.cat([c for c, _ in _reference(case)], dim=-1)
    assert codes[:, 0].unique().numel() >= 100  # and the codes are still diverse


# --------------------------------------------------------------------------- every path


def test_48khz_codes_match_the_reference_on_every_path(threads: int) -> None:
    case = _case("encodec_48khz")
    model = case.ours
    reference = _reference(case)
    ref_codes = [codes for codes, _ in reference]
    num_codebooks = model.num_codebooks(case.bandwidth)
    seg_len, stride = model.segment_length, model.segment_stride
    assert seg_len is not None and stride is not None
    pieces = [case.wav[..., s : s + seg_len] for s in range(0, case.wav.shape[-1], stride)]
    assert len(pieces) == len(reference) == 3

    with torch.inference_mode():
        whole = model.encode(case.wav, case.bandwidth)
        alone = [model.encode_segment(p, num_codebooks) for p in pieces]
        batched = model.encode_segments(pieces[:2], num_codebooks) + [alone[2]]
    assert _differing([s.codes for s in whole], ref_codes) == 0
    assert _differing([s.codes for s in alone], ref_codes) == 0
    assert _differing([s.codes for s in batched], ref_codes) == 0
    for seg, (_, ref_scale) in zip(whole, reference):
        assert ref_scale is not None and seg.scale is not None
        assert torch.equal(seg.scale, ref_scale.view(-1))
    for push in (4_800, 48_000):  # a tenth of a segment, and one
        streamed = _streamed(case, push)
        assert _differing([s.codes for s in streamed], ref_codes) == 0, f"pushes of {push}"


def test_24khz_codes_match_the_reference_on_every_path(threads: int) -> None:
    case = _case("encodec_24khz")
    model = case.ours
    ref_codes = [codes for codes, _ in _reference(case)]
    with torch.inference_mode():
        whole = model.encode(case.wav, case.bandwidth)
        alone = model.encode_segment(case.wav, model.num_codebooks(case.bandwidth))
    assert _differing([s.codes for s in whole], ref_codes) == 0
    assert _differing([alone.codes], ref_codes) == 0
    # The defaults (one block for this clip), and the engine's smallest blocks and chunks
    # (low latency: every call widened with history over frames already coded).
    for push, seconds in ((4_000, {}), (1_000, {"block_seconds": 1e-3, "chunk_seconds": 1e-3})):
        streamed = _streamed(case, push, **seconds)
        frames = sum(s.codes.shape[-1] for s in streamed)
        assert frames == math.ceil(case.wav.shape[-1] / model.hop_length)
        assert _differing([s.codes for s in streamed], ref_codes) == 0, f"pushes of {push}, {seconds}"
