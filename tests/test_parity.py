"""ecdc's EnCodec networks against Meta's reference implementation (encodec 0.1.1).

Both official architectures are built with the same seeded random weights and seeded,
non-trivial codebooks (see tests/refstub.py); the reference's state dict must load into
ours strictly, and for every bandwidth the codes must be identical and the decoded audio
within 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch

from ecdc.errors import ModelError
from ecdc.models import (
    ENCODEC_24KHZ,
    ENCODEC_48KHZ,
    EncodecConfig,
    EncodecModel,
    EncodedSegment,
    SEANetDecoder,
    SEANetEncoder,
)
from ecdc.models.modules import extra_padding_for_conv1d, pad1d

from refstub import import_encodec, make_reference_model, make_test_audio

encodec = import_encodec()

AUDIO_TOL = 1e-4
SEED = 1234

# (config, seconds, batch): lengths are deliberately not multiples of the 320-sample hop,
# and the 48 kHz clip spans three 1 s segments so the overlap-add is exercised.
CASES = {
    "encodec_24khz": (ENCODEC_24KHZ, 2.3, 2),
    "encodec_48khz": (ENCODEC_48KHZ, 2.5, 1),
}


class Pair:
    """A reference model, ours loaded from its state dict, and the test clip."""

    def __init__(self, name: str) -> None:
        config, seconds, batch = CASES[name]
        self.config = config
        self.ref = make_reference_model(name, SEED)
        self.ours = EncodecModel(config)
        self.load_result = self.ours.load_state_dict(self.ref.state_dict(), strict=True)
        self.ours.eval()
        num_samples = int(seconds * config.sample_rate) + 17
        assert num_samples % 320 != 0
        self.wav = make_test_audio(config.sample_rate, config.channels, num_samples,
                                   batch=batch, seed=7)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request) -> Pair:
    return _pairs(request.param)


_CACHE: dict[str, Pair] = {}


def _pairs(name: str) -> Pair:
    # Built once per module: one reference model costs ~2 s on 2 cores.
    if name not in _CACHE:
        _CACHE[name] = Pair(name)
    return _CACHE[name]


# --------------------------------------------------------------------------- weights


def test_state_dict_matches_reference(pair: Pair) -> None:
    ours, ref = pair.ours.state_dict(), pair.ref.state_dict()
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        assert ours[key].dtype == ref[key].dtype, key
    assert not pair.load_result.missing_keys and not pair.load_result.unexpected_keys
    # a fresh model loads strictly too (not only the fixture's)
    EncodecModel(pair.config).load_state_dict(pair.ref.state_dict(), strict=True)


def test_model_geometry_matches_reference(pair: Pair) -> None:
    ours, ref = pair.ours, pair.ref
    assert ours.sample_rate == ref.sample_rate
    assert ours.channels == ref.channels
    assert ours.hop_length == 320
    assert ours.frame_rate == ref.frame_rate
    assert ours.bits_per_code == ref.bits_per_codebook == 10
    assert ours.max_codebooks == ref.quantizer.n_q
    assert ours.segment_length == ref.segment_length
    assert ours.segment_stride == ref.segment_stride
    assert ours.bandwidths == tuple(float(b) for b in ref.target_bandwidths)
    assert ours.name == pair.config.name


# --------------------------------------------------------------------------- encode / decode


def _bandwidth_cases() -> list:
    return [pytest.param(name, bw, id=f"{name}-{bw:g}kbps")
            for name, (cfg, _, _) in sorted(CASES.items()) for bw in cfg.bandwidths]


@pytest.mark.parametrize("name,bandwidth", _bandwidth_cases())
def test_encode_decode_parity(name: str, bandwidth: float) -> None:
    p = _pairs(name)
    with torch.inference_mode():
        p.ref.set_target_bandwidth(bandwidth)
        ref_frames = p.ref.encode(p.wav)
        ref_audio = p.ref.decode(ref_frames)
        segments = p.ours.encode(p.wav, bandwidth)
        audio = p.ours.decode(segments)

    k = p.ours.num_codebooks(bandwidth)
    assert len(segments) == len(ref_frames)
    for seg, (ref_codes, ref_scale) in zip(segments, ref_frames):
        assert isinstance(seg, EncodedSegment)
        assert seg.codes.dtype == torch.int64
        assert seg.codes.shape == ref_codes.shape
        assert seg.codes.shape[:2] == (p.wav.shape[0], k)
        assert torch.equal(seg.codes, ref_codes)
        if ref_scale is None:
            assert seg.scale is None
        else:
            assert seg.scale is not None and seg.scale.dtype == torch.float32
            assert seg.scale.shape == (p.wav.shape[0],)
            assert torch.equal(seg.scale, ref_scale.view(-1))

    assert audio.shape == ref_audio.shape
    assert audio.shape[-1] >= p.wav.shape[-1]
    diff = (audio - ref_audio).abs().max().item()
    print(f"{name} {bandwidth:g} kbps: max |audio - reference| = {diff:.3g}")
    assert diff <= AUDIO_TOL


def test_codes_are_diverse(pair: Pair) -> None:
    """Guards the test itself: with empty codebooks every code would be 0."""
    with torch.inference_mode():
        segments = pair.ours.encode(pair.wav, pair.config.bandwidths[-1])
    codes = torch.cat([s.codes for s in segments], dim=-1)
    frames = codes.shape[0] * codes.shape[-1]
    per_stage = [codes[:, k].unique().numel() for k in range(codes.shape[1])]
    assert per_stage[0] >= frames // 4, per_stage
    assert min(per_stage) >= 10, per_stage
    for layer in pair.ref.quantizer.vq.layers:
        assert layer._codebook.inited.item() == 1.0


def test_normalize_scale_and_segments() -> None:
    p = _pairs("encodec_48khz")
    with torch.inference_mode():
        segments = p.ours.encode(p.wav, 6.0)
    starts = list(range(0, p.wav.shape[-1], p.ours.segment_stride))
    assert len(segments) == len(starts) == 3
    for seg, start in zip(segments, starts):
        part = p.wav[:, :, start : start + p.ours.segment_length]
        rms = part.mean(dim=1).pow(2).mean(dim=-1).sqrt()
        torch.testing.assert_close(seg.scale, rms + 1e-8)
        assert seg.codes.shape[-1] == math.ceil(part.shape[-1] / 320)


# --------------------------------------------------------------------------- API details


def test_num_codebooks() -> None:
    m24 = _pairs("encodec_24khz").ours
    m48 = _pairs("encodec_48khz").ours
    assert [m24.num_codebooks(b) for b in (1.5, 3, 6, 12, 24)] == [2, 4, 8, 16, 32]
    assert [m48.num_codebooks(b) for b in (3, 6, 12, 24)] == [2, 4, 8, 16]
    for model, bw in ((m24, 5.0), (m48, 1.5)):
        with pytest.raises(ModelError, match="choose one of"):
            model.num_codebooks(bw)


def test_bad_inputs_raise_model_error() -> None:
    model = _pairs("encodec_24khz").ours
    with pytest.raises(ModelError):
        model.encode(torch.zeros(1, 2, 1000), 6.0)  # stereo into a mono model
    with pytest.raises(ModelError):
        model.encode(torch.zeros(1000), 6.0)
    with pytest.raises(ModelError):
        model.encode(torch.zeros(1, 1, 0), 6.0)
    with pytest.raises(ModelError):
        model.decode([])
    bad = EncodedSegment(codes=torch.full((1, 2, 3), 1024), scale=None)
    with pytest.raises(ModelError):
        model.decode([bad])
    with pytest.raises(ModelError):
        model.decode([bad, bad])  # unsegmented model


def test_short_input() -> None:
    """Inputs shorter than the reflect padding take the reference's small-input path."""
    p = _pairs("encodec_24khz")
    wav = p.wav[:1, :, :5]
    with torch.inference_mode():
        p.ref.set_target_bandwidth(6.0)
        ref_frames = p.ref.encode(wav)
        segments = p.ours.encode(wav, 6.0)
        assert torch.equal(segments[0].codes, ref_frames[0][0])
        diff = (p.ours.decode(segments) - p.ref.decode(ref_frames)).abs().max().item()
    assert diff <= AUDIO_TOL


def test_config_round_trip() -> None:
    for cfg in (ENCODEC_24KHZ, ENCODEC_48KHZ):
        d = cfg.to_dict()
        assert isinstance(d["bandwidths"], list) and isinstance(d["ratios"], list)
        assert EncodecConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown"):
        EncodecConfig.from_dict({**ENCODEC_24KHZ.to_dict(), "surprise": 1})
    with pytest.raises(ValueError):
        EncodecConfig.from_dict({"name": "x"})
    with pytest.raises(ValueError):
        EncodecConfig.from_dict({**ENCODEC_48KHZ.to_dict(), "causal": True})
    assert ENCODEC_24KHZ.channels == 1 and ENCODEC_24KHZ.causal and not ENCODEC_24KHZ.normalize
    assert ENCODEC_24KHZ.segment is None and ENCODEC_24KHZ.norm == "weight_norm"
    assert ENCODEC_48KHZ.channels == 2 and not ENCODEC_48KHZ.causal and ENCODEC_48KHZ.normalize
    assert ENCODEC_48KHZ.segment == 1.0 and ENCODEC_48KHZ.overlap == 0.01
    assert ENCODEC_48KHZ.norm == "time_group_norm"


# --------------------------------------------------------------------------- building blocks


def test_padding_helpers_match_reference() -> None:
    conv = encodec.modules.conv
    for kernel, stride in ((1, 1), (3, 1), (7, 1), (4, 2), (10, 5), (16, 8)):
        for dilation in (1, 2):
            total = (kernel - 1) * dilation - (stride - 1)
            for length in range(1, 40):
                x = torch.zeros(1, 1, length)
                assert extra_padding_for_conv1d(length, kernel, stride, total) == \
                    conv.get_extra_padding_for_conv1d(x, kernel, stride, total)
    # With autograd (training: torch's kernel) and without (inference: copies).
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for length in range(1, 9):
                x = torch.randn(2, 3, length)
                for left in range(0, 8):
                    for right in range(0, 8):
                        assert torch.equal(pad1d(x, left, right, "reflect"),
                                           conv.pad1d(x, (left, right), mode="reflect"))


def test_weight_norm_fallback_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torch._weight_norm the explicit formula is used; same values up to rounding."""
    from ecdc.models import modules

    v, g = torch.randn(6, 4, 5), torch.rand(6, 1, 1) + 0.5
    fused = modules._weight_norm(v, g)
    monkeypatch.delattr(torch, "_weight_norm")
    plain = modules._weight_norm(v, g)
    torch.testing.assert_close(plain, fused, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(plain.flatten(1).norm(dim=1), g.flatten())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the reference's weight_norm
@pytest.mark.parametrize("norm,causal", [("weight_norm", True), ("time_group_norm", False),
                                         ("weight_norm", False)])
def test_small_seanet_matches_reference(norm: str, causal: bool) -> None:
    """Non-default shapes, including lstm_layers=0 and two residual layers per stage."""
    kw = dict(channels=2, dimension=8, n_filters=4, n_residual_layers=2, ratios=[3, 2],
              norm=norm, causal=causal)
    torch.manual_seed(0)
    ref_enc = encodec.modules.SEANetEncoder(lstm=0, **kw)
    ref_dec = encodec.modules.SEANetDecoder(lstm=1, **kw)
    enc = SEANetEncoder(lstm_layers=0, **kw)
    dec = SEANetDecoder(lstm_layers=1, **kw)
    enc.load_state_dict(ref_enc.state_dict(), strict=True)
    dec.load_state_dict(ref_dec.state_dict(), strict=True)
    x = torch.randn(2, 2, 101)
    with torch.inference_mode():
        z = enc(x)
        assert torch.equal(z, ref_enc(x))
        assert z.shape[-1] == math.ceil(101 / 6)
        y = dec(z)
        assert torch.equal(y, ref_dec(z))
        assert y.shape[-1] == z.shape[-1] * 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parity() -> None:
    p = _pairs("encodec_48khz")
    ref = make_reference_model("encodec_48khz", SEED).cuda()
    ours = EncodecModel(ENCODEC_48KHZ)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = ours.cuda().eval()
    wav = p.wav.cuda()
    with torch.inference_mode():
        ref.set_target_bandwidth(24.0)
        ref_frames = ref.encode(wav)
        segments = ours.encode(wav, 24.0)
        for seg, (codes, _) in zip(segments, ref_frames):
            assert seg.codes.device.type == "cuda"
            assert torch.equal(seg.codes, codes)
        diff = (ours.decode(segments) - ref.decode(ref_frames)).abs().max().item()
    assert diff <= AUDIO_TOL


def test_48khz_batched_passes_match_the_reference() -> None:
    """A clip long enough for a full batched pass (16 segments: convolutions 4 at a time,
    the LSTM on all 16) and then shorter runs: codes and scales as the reference's, which
    codes one segment at a time."""
    p = _pairs("encodec_48khz")
    per_pass = p.ours.DEFAULT_BATCH_SEGMENTS
    assert per_pass > p.ours.CONV_BATCH_SEGMENTS
    wav = make_test_audio(48000, 2, int((per_pass + 1.3) * 48000) + 17, seed=5)
    with torch.inference_mode():
        p.ref.set_target_bandwidth(24.0)
        ref_frames = p.ref.encode(wav)
        segments = p.ours.encode(wav, 24.0)
        diff = (p.ours.decode(segments) - p.ref.decode(ref_frames)).abs().max().item()
    assert len(segments) == len(ref_frames) > per_pass + 1
    for seg, (ref_codes, ref_scale) in zip(segments, ref_frames):
        assert torch.equal(seg.codes, ref_codes)
        assert torch.equal(seg.scale, ref_scale.view(-1))
    assert diff <= AUDIO_TOL
