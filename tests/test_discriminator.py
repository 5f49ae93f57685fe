"""Tests for ecdc.train.discriminator: shapes, feature maps, gradients, parameter count."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from ecdc.train.discriminator import MultiScaleSTFTDiscriminator, STFTDiscriminator
from ecdc.train.losses import feature_matching_loss, hinge_discriminator_loss, hinge_generator_loss


def _halve(n: int, times: int) -> int:
    for _ in range(times):
        n = (n + 1) // 2  # kernel 9, padding 4, stride 2
    return n


def _expected_logit_shape(batch: int, length: int, n_fft: int) -> tuple[int, int, int, int]:
    frames = 1 + (length - n_fft) // (n_fft // 4)
    return (batch, 1, frames, _halve(n_fft // 2 + 1, 3))


@pytest.mark.parametrize(("channels", "length"), [(1, 24000), (2, 48000)])
def test_output_shapes_per_scale(channels: int, length: int) -> None:
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(channels=channels)
    x = 0.1 * torch.randn(2, channels, length)
    with torch.no_grad():
        logits, fmaps = disc(x)
    n_ffts = (2048, 1024, 512, 256, 128)
    assert len(logits) == len(fmaps) == len(n_ffts)
    for n_fft, logit, fmap in zip(n_ffts, logits, fmaps):
        assert logit.shape == _expected_logit_shape(2, length, n_fft)
        assert len(fmap) == 5  # first conv, three dilated convs, the (3, 3) conv
        frames = logit.shape[2]
        freqs = [n_fft // 2 + 1] + [_halve(n_fft // 2 + 1, k) for k in (1, 2, 3, 3)]
        for feature, freq in zip(fmap, freqs):
            assert feature.shape == (2, 32, frames, freq)
        assert all(torch.isfinite(f).all() for f in fmap) and torch.isfinite(logit).all()


def test_layer_structure() -> None:
    scale = STFTDiscriminator(channels=2, filters=32, n_fft=256)
    convs = list(scale.convs) + [scale.conv_post]
    assert [c.kernel_size for c in convs] == [(3, 9)] * 4 + [(3, 3)] * 2
    assert [c.stride for c in convs] == [(1, 1)] + [(1, 2)] * 3 + [(1, 1)] * 2
    assert [c.dilation for c in convs] == [(1, 1), (1, 1), (2, 1), (4, 1), (1, 1), (1, 1)]  # dilations in time
    assert convs[0].in_channels == 4  # real and imaginary parts of two channels
    assert convs[-1].out_channels == 1
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)  # weight norm everywhere
    assert scale.activation.negative_slope == 0.2


def test_parameter_count() -> None:
    # See the module docstring: 94,498 per scale for mono, every conv weight-normed.
    assert sum(p.numel() for p in MultiScaleSTFTDiscriminator(channels=1).parameters()) == 472_490
    assert sum(p.numel() for p in MultiScaleSTFTDiscriminator(channels=2).parameters()) == 481_130
    grown = STFTDiscriminator(filters=8, n_fft=128, filters_scale=2, max_filters=32)
    assert [c.out_channels for c in grown.convs] == [8, 16, 32, 32, 32]


def test_gradients_reach_the_input_and_the_weights() -> None:
    torch.manual_seed(1)
    disc = MultiScaleSTFTDiscriminator(channels=1, filters=8)
    real = 0.1 * torch.randn(2, 1, 8000)
    fake = (0.1 * torch.randn(2, 1, 8000)).requires_grad_(True)
    real_logits, real_fmaps = disc(real)
    fake_logits, fake_fmaps = disc(fake)
    loss = hinge_generator_loss(fake_logits) + feature_matching_loss(real_fmaps, fake_fmaps)
    loss.backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
    disc.zero_grad()
    d_loss = hinge_discriminator_loss(real_logits, [f.detach() for f in fake_logits])
    d_loss.backward()
    grads = [p.grad for p in disc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_rejects_bad_input() -> None:
    disc = MultiScaleSTFTDiscriminator(channels=1, filters=4, n_ffts=(256,))
    with pytest.raises(ValueError):
        disc(torch.randn(1, 2, 4000))  # wrong channel count
    with pytest.raises(ValueError):
        disc(torch.randn(1, 1, 100))  # shorter than the window
