"""The inference speed-ups change no result.

* The normalised-weight cache of weight-normed convs gives bit-identical outputs to
  recomputing ``torch._weight_norm`` per call, and is invalidated whenever the
  parameters change (``load_state_dict``, an optimiser step); training still trains.
* The decoder's faster arithmetic agrees with the exact one to float rounding, and is off
  for a bare decoder and for the encoder.
* A separate thread count for the LSTM changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ecdc.models import EncodecConfig, EncodecModel, SEANetDecoder, SEANetEncoder
from ecdc.models.modules import WeightNormConv1d, WeightNormConvTranspose1d, _WeightNormMixin

# 48 kHz-like geometry (segments, normalisation, group norm, LSTM), small enough to be quick.
SMALL_48K = EncodecConfig(
    name="small_48khz", sample_rate=48000, channels=2, causal=False, norm="time_group_norm",
    bandwidths=(3.0, 6.0, 12.0, 24.0), normalize=True, segment=1.0, overlap=0.01,
    n_filters=8, dimension=32, lstm_layers=2,
)
SMALL_24K = EncodecConfig(
    name="small_24khz", sample_rate=24000, channels=1, causal=True, norm="weight_norm",
    bandwidths=(1.5, 3.0, 6.0, 12.0, 24.0), normalize=False, segment=None,
    n_filters=8, dimension=32, lstm_layers=2,
)


def _uncached(conv: _WeightNormMixin) -> torch.Tensor:
    return torch._weight_norm(conv.weight_v, conv.weight_g, 0)


def _weight_norm_convs(module: torch.nn.Module) -> list[_WeightNormMixin]:
    return [m for m in module.modules() if isinstance(m, _WeightNormMixin)]


# --------------------------------------------------------------------------- weight cache


@pytest.mark.parametrize("cls", [WeightNormConv1d, WeightNormConvTranspose1d])
def test_cached_weight_is_bit_identical_and_reused(cls) -> None:
    torch.manual_seed(0)
    conv = cls(6, 5, 4, 2).eval()
    x = torch.randn(2, 6, 50)
    fn = F.conv1d if cls is WeightNormConv1d else F.conv_transpose1d
    with torch.inference_mode():
        expected = fn(x, _uncached(conv), conv.bias, 2)
        first = conv.normed_weight()
        assert conv.normed_weight() is first  # reused, not recomputed
        assert torch.equal(first, _uncached(conv))
        assert torch.equal(conv(x), expected)
    with torch.no_grad():  # no_grad alone uses (and can use) the cache too
        assert conv.normed_weight() is first
    # The cached tensor is an ordinary one: usable outside inference mode.
    assert not first.is_inference() and not first.requires_grad


def test_cached_model_output_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    from ecdc.models import modules

    torch.manual_seed(1)
    enc = SEANetEncoder(channels=1, dimension=16, n_filters=4, ratios=(4, 2), lstm_layers=1).eval()
    dec = SEANetDecoder(channels=1, dimension=16, n_filters=4, ratios=(4, 2), lstm_layers=1).eval()
    x = torch.randn(1, 1, 3000)
    with torch.inference_mode():
        cached = [dec(enc(x)) for _ in range(2)]
        assert all(m._weight_cache is not None for m in _weight_norm_convs(enc) + _weight_norm_convs(dec))
        monkeypatch.setattr(modules, "_use_cache", lambda module: False)  # recompute per call
        plain = dec(enc(x))
    assert torch.equal(cached[0], plain) and torch.equal(cached[1], plain)


def test_cache_invalidated_by_load_state_dict() -> None:
    torch.manual_seed(2)
    enc = SEANetEncoder(channels=1, dimension=16, n_filters=4, ratios=(4, 2), lstm_layers=0).eval()
    other = SEANetEncoder(channels=1, dimension=16, n_filters=4, ratios=(4, 2), lstm_layers=0).eval()
    x = torch.randn(1, 1, 2000)
    with torch.inference_mode():
        before = enc(x)
        enc.load_state_dict(other.state_dict())
        after = enc(x)
        expected = other(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, expected)
    for conv in _weight_norm_convs(enc):
        assert torch.equal(conv.normed_weight(), _uncached(conv))
    # also when the new values arrive in place while in inference mode
    with torch.inference_mode():
        enc.model[0].conv.conv.weight_g.mul_(2)
        conv = enc.model[0].conv.conv
        assert torch.equal(conv.normed_weight(), _uncached(conv))


def test_cache_invalidated_by_optimiser_step_and_training_still_trains() -> None:
    torch.manual_seed(3)
    enc = SEANetEncoder(channels=1, dimension=16, n_filters=4, ratios=(4, 2), lstm_layers=0)
    x = torch.randn(2, 1, 1600)
    enc.eval()
    with torch.inference_mode():
        before = enc(x)  # fills the cache
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    enc.train()
    for _ in range(2):
        opt.zero_grad()
        loss = enc(x).pow(2).mean()
        loss.backward()
        for conv in _weight_norm_convs(enc):  # gradients reach both factors
            assert conv.weight_v.grad is not None and conv.weight_v.grad.abs().sum() > 0
            assert conv.weight_g.grad is not None and conv.weight_g.grad.abs().sum() > 0
        opt.step()
    enc.eval()
    with torch.inference_mode():
        after = enc(x)
    with torch.enable_grad():
        expected = enc(x).detach()
    assert not torch.equal(before, after)
    assert torch.equal(after, expected)
    # A step taken in eval mode (no train() toggle) invalidates it too.
    with torch.inference_mode():
        enc(x)
    opt.zero_grad()
    enc(x).pow(2).mean().backward()
    opt.step()
    with torch.inference_mode():
        for conv in _weight_norm_convs(enc):
            assert torch.equal(conv.normed_weight(), _uncached(conv))


def test_cache_follows_dtype_and_copies() -> None:
    import copy

    torch.manual_seed(4)
    conv = WeightNormConv1d(3, 4, 3).eval()
    with torch.inference_mode():
        w32 = conv.normed_weight()
    clone = copy.deepcopy(conv)
    with torch.inference_mode():
        assert clone.normed_weight() is not w32
        assert torch.equal(clone.normed_weight(), w32)
    conv.double()
    with torch.inference_mode():
        assert conv.normed_weight().dtype == torch.float64
        assert torch.equal(conv.normed_weight(), _uncached(conv))


# --------------------------------------------------------------------------- decoder arithmetic


@pytest.mark.parametrize("config", [SMALL_24K, SMALL_48K], ids=lambda c: c.name)
def test_fast_decoder_matches_exact(config: EncodecConfig) -> None:
    torch.manual_seed(7)
    model = EncodecModel(config).eval()
    z = torch.randn(2, config.dimension, 90)
    with torch.inference_mode():
        fast = model.decoder(z)
        model.set_exact_decoder(True)
        exact = model.decoder(z)
        plain = model.decoder.model(z)  # nn.Sequential: the reference's layer-by-layer path
        model.set_exact_decoder(False)
    assert torch.equal(exact, plain)
    assert not torch.equal(fast, exact)  # the fast paths did run
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_exact_decoder_by_default_for_bare_decoder() -> None:
    dec = SEANetDecoder(channels=1, dimension=8, n_filters=4, ratios=(3, 2), lstm_layers=0)
    assert all(not getattr(m, "allow_reassociation", False) for m in dec.modules())
    model = EncodecModel(SMALL_24K)
    assert any(getattr(m, "allow_reassociation", False) for m in model.decoder.modules())
    assert not any(getattr(m, "allow_reassociation", False) for m in model.encoder.modules())


# --------------------------------------------------------------------------- threads


def test_lstm_thread_override_gives_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    from ecdc import perf
    from ecdc.models.modules import SLSTM

    torch.manual_seed(8)
    lstm = SLSTM(64, num_layers=2).eval()
    x = torch.randn(2, 64, 120)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        default = lstm(x)
        for n in (1, 2):
            monkeypatch.setattr(perf, "_lstm_threads", n)
            assert torch.equal(lstm(x), default)
            assert torch.get_num_threads() == threads  # restored


@pytest.mark.parametrize("config", [SMALL_24K, SMALL_48K], ids=["24k", "48k"])
def test_one_way_model_gives_the_same_results_and_refuses_the_other_way(config: EncodecConfig) -> None:
    """release_unused (used by the CLI to lower peak memory) changes no code and no sample."""
    from ecdc.errors import ModelError
    from ecdc.models.streaming import StreamingDecoder, StreamingEncoder

    torch.manual_seed(0)
    full = EncodecModel(config).eval()
    wav = torch.randn(1, config.channels, int(1.3 * config.sample_rate)) * 0.1
    segments = full.encode(wav, 6.0)
    audio = full.decode(segments)

    encoder_only = EncodecModel(config).eval()
    encoder_only.load_state_dict(full.state_dict())
    encoder_only.release_unused("encode")
    assert encoder_only.decoder is None
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(encoder_only.encode(wav, 6.0), segments))
    with pytest.raises(ModelError, match="loaded for encoding only"):
        encoder_only.decode(segments)
    with pytest.raises(ModelError, match="loaded for encoding only"):
        streaming = StreamingDecoder(encoder_only)
        streaming.push(segments[0])
        streaming.flush()

    decoder_only = EncodecModel(config).eval()
    decoder_only.load_state_dict(full.state_dict())
    decoder_only.release_unused("decode")
    assert decoder_only.encoder is None
    assert torch.equal(decoder_only.decode(segments), audio)
    with pytest.raises(ModelError, match="loaded for decoding only"):
        decoder_only.encode(wav, 6.0)
    if config.segment is None:
        with pytest.raises(ModelError, match="loaded for decoding only"):
            StreamingEncoder(decoder_only, 8)
    kept = sum(t.numel() for t in decoder_only.state_dict().values())
    assert kept < 0.75 * sum(t.numel() for t in full.state_dict().values())
