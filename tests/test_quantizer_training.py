"""Training side of the RVQ (k-means init, EMA, dead codes, straight-through, commitment
loss, distributed sync) and the model's differentiable forward pass."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ecdc.models.encodec import EncodecConfig, EncodecModel, ModelOutput
from ecdc.models.quantizer import EuclideanCodebook, QuantizedResult, ResidualVectorQuantizer

TINY = EncodecConfig(
    name="t", sample_rate=24000, channels=1, causal=True, norm="weight_norm",
    bandwidths=(1.5, 3.0, 6.0), normalize=False, segment=None,
    n_filters=4, dimension=16, lstm_layers=1, codebook_size=64,
)
TINY_STEREO_NORM = EncodecConfig(
    name="ts", sample_rate=48000, channels=2, causal=False, norm="time_group_norm",
    bandwidths=(3.0, 6.0), normalize=True, segment=1.0,
    n_filters=4, dimension=16, lstm_layers=1, codebook_size=64,
)


def clustered(n: int, dim: int, centres: int, seed: int) -> torch.Tensor:
    """``n`` vectors around ``centres`` well-separated points."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=g) * 5
    which = torch.randint(0, centres, (n,), generator=g)
    return means[which] + 0.1 * torch.randn(n, dim, generator=g)


def tiny_codebook(embed: list[list[float]], cluster_size: float = 5.0, **kw) -> EuclideanCodebook:
    e = torch.tensor(embed)
    cb = EuclideanCodebook(e.shape[1], e.shape[0], **kw)
    cb.embed.copy_(e)
    cb.cluster_size.fill_(cluster_size)
    cb.embed_avg.copy_(e * cluster_size)
    cb.inited.fill_(1)
    return cb.train()


def buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------- codebook


def test_defaults_are_the_papers() -> None:
    cb = EuclideanCodebook(8, 16)
    assert (cb.decay, cb.epsilon, cb.kmeans_iters, cb.threshold_ema_dead_code) == (0.99, 1e-5, 50, 2)


def test_kmeans_init_on_first_training_batch() -> None:
    torch.manual_seed(0)
    cb = EuclideanCodebook(8, 64).train()
    x = clustered(4096, 8, centres=200, seed=1)
    codes, q = cb(x)
    assert cb.inited.item() == 1
    assert len(torch.unique(cb.embed, dim=0)) == 64
    assert len(torch.unique(codes)) >= 60
    # Counts are those of the batch (k-means then one EMA step on the same batch).
    assert cb.cluster_size.sum().item() == pytest.approx(4096, rel=0.02)
    # The k-means codebook quantises far better than a random pick of 64 batch vectors.
    err = (x - cb.embed[cb.encode(x)]).pow(2).sum(1).mean()
    rand = x[torch.randperm(4096)[:64]]
    rand_err = (x[:, None] - rand[None]).pow(2).sum(-1).min(1).values.mean()
    assert err < 0.7 * rand_err
    # A second batch does not re-initialise: only the EMA moves the codebook.
    before = cb.embed.clone()
    cb(x)
    assert torch.allclose(cb.embed, before, atol=1e-3)


def test_kmeans_init_with_fewer_vectors_than_codes() -> None:
    torch.manual_seed(0)
    cb = EuclideanCodebook(4, 32).train()
    x = torch.randn(5, 4)
    cb(x)
    assert cb.inited.item() == 1
    # Every code was sampled (with replacement) from the 5 vectors.
    assert bool((torch.cdist(cb.embed, x).min(1).values < 1e-5).all())


def test_kmeans_init_replays_under_the_same_rng_state() -> None:
    x = clustered(512, 4, centres=20, seed=3)
    torch.manual_seed(5)
    a = EuclideanCodebook(4, 16).train()
    a(x)
    a(x[:8])  # few vectors: dead codes get replaced from them
    torch.manual_seed(5)
    b = EuclideanCodebook(4, 16).train()
    b(x)
    b(x[:8])
    assert torch.equal(a.embed, b.embed) and torch.equal(a.cluster_size, b.cluster_size)


def test_ema_update_matches_hand_computation() -> None:
    embed = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]
    cb = tiny_codebook(embed, cluster_size=5.0, decay=0.5)
    x = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [9.0, 1.0], [0.0, 11.0]])
    codes, q = cb(x)
    assert codes.tolist() == [0, 0, 1, 2]
    assert torch.equal(q, torch.tensor(embed)[codes])  # the codebook before the update

    # By hand: counts (2, 1, 1, 0); sums (0, 1), (9, 1), (0, 11), (0, 0).
    d, eps, k = 0.5, 1e-5, 4
    size = [d * 5 + (1 - d) * c for c in (2, 1, 1, 0)]  # 3.5, 3, 3, 2.5
    sums = [(0, 1), (9, 1), (0, 11), (0, 0)]
    avg = [[d * 5 * e + (1 - d) * s for e, s in zip(row, srow)] for row, srow in zip(embed, sums)]
    total = sum(size)
    smoothed = [(n + eps) / (total + k * eps) * total for n in size]
    expected = [[a / n for a in row] for row, n in zip(avg, smoothed)]
    assert torch.allclose(cb.cluster_size, torch.tensor(size))
    assert torch.allclose(cb.embed_avg, torch.tensor(avg))
    assert torch.allclose(cb.embed, torch.tensor(expected), atol=1e-5)
    # Assigned codes moved toward the mean of their vectors; unassigned code 3 shrank
    # toward its (empty) mean only through the EMA of embed_avg and cluster_size.
    means = torch.tensor([[0.0, 0.5], [9.0, 1.0], [0.0, 11.0]])
    old = torch.tensor(embed)[:3]
    assert bool(((cb.embed[:3] - means).norm(dim=1) < (old - means).norm(dim=1)).all())


def test_dead_code_replaced_by_a_batch_vector() -> None:
    torch.manual_seed(0)
    embed = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0]]
    cb = tiny_codebook(embed, cluster_size=5.0)
    cb.cluster_size[3] = 0.5
    cb.embed_avg[3] = cb.embed[3] * 0.5
    x = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [9.0, 1.0], [0.0, 11.0], [0.5, 9.5]])
    cb(x)
    assert bool((x == cb.embed[3]).all(dim=1).any()), "dead code 3 should be a batch vector"
    assert cb.cluster_size[3].item() == 2.0  # reset to the threshold: not dead right away
    assert torch.allclose(cb.embed_avg[3], cb.embed[3] * 2.0)
    assert bool((cb.cluster_size >= cb.threshold_ema_dead_code).all())
    # Live codes were only EMA-updated, not replaced.
    assert (cb.embed[:3] - torch.tensor(embed[:3])).abs().max() < 0.2


def test_no_dead_code_replacement_when_threshold_is_zero() -> None:
    cb = tiny_codebook([[0.0, 0.0], [50.0, 50.0]], cluster_size=0.5, threshold_ema_dead_code=0)
    cb(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert cb.cluster_size[1].item() == pytest.approx(0.495)


def test_eval_mode_changes_no_buffer() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=8, n_q=3, bins=16).eval()
    x = torch.randn(2, 8, 20)
    state = buffers(rvq)
    res = rvq(x, 3)  # not inited: eval must not run k-means
    assert all(torch.equal(state[k], v) for k, v in rvq.state_dict().items())

    for name, v in rvq.state_dict().items():
        if name.endswith("embed"):
            v.copy_(torch.randn_like(v))
        elif name.endswith("inited"):
            v.fill_(1)
    state = buffers(rvq)
    res = rvq(x, 3)
    assert all(torch.equal(state[k], v) for k, v in rvq.state_dict().items())
    # Same codes and (bit-identical) latent as the inference path.
    assert torch.equal(res.codes, rvq.encode(x, 3))
    assert torch.equal(res.quantized, rvq.decode(res.codes))
    assert res.codes.dtype == torch.int64 and res.commitment_loss.dim() == 0


# ---------------------------------------------------------------------- RVQ forward


def known_rvq() -> ResidualVectorQuantizer:
    rvq = ResidualVectorQuantizer(dimension=2, n_q=2, bins=4)
    books = [
        [[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]],
        [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]],
    ]
    for layer, book in zip(rvq.vq.layers, books):
        cb = layer._codebook
        cb.embed.copy_(torch.tensor(book))
        cb.cluster_size.fill_(100.0)
        cb.embed_avg.copy_(cb.embed * 100.0)
        cb.inited.fill_(1)
    return rvq.train()


def test_straight_through_and_commitment_loss() -> None:
    rvq = known_rvq()
    # One item, two frames: (4.5, 0.2) -> (4,0) then (0.5, 0.2) -> (1,0) [or (0,0)];
    # (0.3, 3.2) -> (0,4) then (0.3, -0.8) -> (0,0).
    latent = torch.tensor([[[4.5, 0.3], [0.2, 3.2]]])  # [B=1, D=2, T=2]
    x = latent.clone().requires_grad_(True)
    res = rvq(x, 2)
    assert isinstance(res, QuantizedResult)
    assert res.codes.tolist() == [[[1, 2], [1, 0]]]
    q0 = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])
    q1 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(res.quantized, q0 + q1)
    r1 = latent - q0
    hand = ((latent - q0).pow(2).mean() + (r1 - q1).pow(2).mean()) / 2
    assert res.commitment_loss.item() == pytest.approx(hand.item(), rel=1e-6)

    # Straight-through: d quantized / d x is the identity.
    (grad_q,) = torch.autograd.grad(res.quantized.sum(), x, retain_graph=True)
    assert torch.equal(grad_q, torch.ones_like(x))
    # Commitment loss: gradient toward the input only (codebooks are no-grad buffers).
    assert list(rvq.parameters()) == []
    (grad_c,) = torch.autograd.grad(res.commitment_loss, x)
    n = latent.numel()
    expected = (2 * (latent - q0) / n + 2 * (r1 - q1) / n) / 2
    assert torch.allclose(grad_c, expected)


def test_rvq_forward_rejects_bad_arguments() -> None:
    rvq = ResidualVectorQuantizer(dimension=4, n_q=2, bins=4)
    with pytest.raises(ValueError):
        rvq(torch.randn(1, 4, 3), 3)
    with pytest.raises(ValueError):
        rvq(torch.randn(1, 5, 3), 1)


# ---------------------------------------------------------------------- model forward


@pytest.mark.parametrize("config", [TINY, TINY_STEREO_NORM], ids=["mono", "stereo_normalized"])
def test_model_forward_gradients(config: EncodecConfig) -> None:
    torch.manual_seed(0)
    model = EncodecModel(config).train()
    length = int(0.2 * config.sample_rate) + 7  # not a multiple of the hop
    wav = 0.1 * torch.randn(2, config.channels, length)
    k = model.num_codebooks(config.bandwidths[-1])
    out = model(wav, k)
    assert isinstance(out, ModelOutput)
    assert out.audio.shape == wav.shape
    assert out.codes.shape == (2, k, -(-length // model.hop_length))
    assert out.commitment_loss.dim() == 0
    assert all(int(layer._codebook.inited) == 1 for layer in model.quantizer.vq.layers[:k])

    # Reconstruction gradient reaches encoder (straight-through) and decoder.
    out.audio.abs().mean().backward(retain_graph=True)
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
    # Commitment loss reaches the encoder only.
    model.zero_grad(set_to_none=True)
    # Second batch: codebooks are no longer the batch itself, so the loss is non-zero.
    out = model(0.1 * torch.randn(2, config.channels, length), k)
    assert out.commitment_loss.item() > 0
    out.commitment_loss.backward()
    assert sum(p.grad.abs().sum().item() for p in model.encoder.parameters()) > 0
    assert all(p.grad is None for p in model.decoder.parameters())


@pytest.mark.parametrize("config", [TINY, TINY_STEREO_NORM], ids=["mono", "stereo_normalized"])
def test_model_forward_in_eval_matches_inference_codes(config: EncodecConfig) -> None:
    torch.manual_seed(0)
    model = EncodecModel(config).train()
    wav = 0.1 * torch.randn(1, config.channels, int(0.1 * config.sample_rate))
    model(wav, model.max_codebooks)  # k-means init of every codebook
    model.eval()
    bw = config.bandwidths[0]
    with torch.no_grad():
        out = model(wav * 3, model.num_codebooks(bw))
        (seg,) = model.encode(wav * 3, bw)
        decoded = model.decode([seg])[..., : wav.shape[-1]]
    assert torch.equal(out.codes, seg.codes)
    assert torch.allclose(out.audio, decoded, atol=1e-6)


# ---------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)  # same initial module on every rank (all zeros anyway)
        rvq = ResidualVectorQuantizer(dimension=4, n_q=2, bins=16).train()
        torch.manual_seed(100 + rank)  # ranks draw different random numbers too
        for step in range(4):
            # Different data, and a different amount of it, on each rank; small batches
            # so that dead codes are replaced along the way.
            n = 12 if rank == 0 else 7
            x = clustered(n * 3, 4, centres=5, seed=1000 * rank + step).T.reshape(1, 4, -1)
            rvq(x, 2)
        torch.save({k: v for k, v in rvq.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_keep_identical_codebooks(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_dist_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # Initial counts and every EMA step counted both ranks' vectors: 3*12 + 3*7 frames per
    # step (dead-code resets can only add to that).
    for i in range(2):
        assert states[0][f"vq.layers.{i}._codebook.inited"].item() == 1
        size = states[0][f"vq.layers.{i}._codebook.cluster_size"]
        assert size.sum().item() >= 3 * 12 + 3 * 7 - 1e-3
