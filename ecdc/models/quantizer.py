"""Residual vector quantiser (RVQ): inference and training.

Each stage picks the codebook vector nearest to what the previous stages left over; the
latent is rebuilt as the sum of the chosen vectors. Module and buffer names
(``vq.layers.<i>._codebook.embed`` ...) follow Meta's so their checkpoints load strictly.

Training follows the EnCodec paper: codebooks are buffers, not parameters. They start from
k-means on the first training batch, then follow an exponential moving average (EMA) of
the vectors assigned to each code (Laplace-smoothed counts), and codes that fall out of use
are re-seeded from the current batch. The encoder gets gradients through a straight-through
estimator and a commitment loss. Under ``torch.distributed`` every rank keeps identical
codebooks: assignment statistics are summed over ranks before the EMA step, and every
random choice (k-means seeding, dead-code replacement) is made on rank 0 and broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, cast, overload

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from .caching import DerivedTensorCache


def _distributed() -> bool:
    """True when codebook statistics must be kept in sync across processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _broadcast_from_rank_zero(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (no-op when not distributed)."""
    if _distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (no-op when not distributed)."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` rows of ``samples`` ``[N, D]`` chosen at random, with replacement only if N < num.

    Uses torch's global RNG (of ``samples``' device) so that restoring RNG states replays it.
    """
    n = samples.shape[0]
    if n == 0:
        raise ValueError("cannot sample codebook vectors from an empty batch")
    if n >= num:
        idx = torch.randperm(n, device=samples.device)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device)
    return samples[idx]


def _nearest(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``means`` ``[K, D]`` for each row of ``x`` ``[N, D]``."""
    # |x|^2 is the same for every candidate, so it is left out of the argmin.
    dist_ = means.pow(2).sum(1) - 2 * x @ means.t()
    return dist_.argmin(dim=-1)


def _counts_and_sums(x: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code assignment counts ``[K]`` and sums of assigned vectors ``[K, D]``."""
    counts = torch.bincount(codes, minlength=k).to(x.dtype)
    sums = x.new_zeros(k, x.shape[1]).index_add_(0, codes, x)
    return counts, sums


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``samples`` ``[N, D]`` -> (centroids ``[K, D]``, counts ``[K]``).

    Seeded from random samples; a centroid that loses all its points keeps its position.
    The counts are those of the last assignment step.
    """
    means = sample_vectors(samples, num_clusters)
    counts = samples.new_zeros(num_clusters)
    for _ in range(num_iters):
        codes = _nearest(samples, means)
        counts, sums = _counts_and_sums(samples, codes, num_clusters)
        empty = counts == 0
        means = torch.where(empty[:, None], means, sums / counts.clamp(min=1)[:, None])
    return means, counts


class EuclideanCodebook(DerivedTensorCache, nn.Module):
    """One codebook of ``codebook_size`` vectors of size ``dim``, searched by L2 distance.

    Starts empty (zeros, ``inited`` = 0), as Meta's does before k-means initialisation.
    """

    _embed_sq_cache: tuple | None = None
    _cache_attrs = ("_embed_sq_cache",)
    # Buffers (registered in __init__).
    inited: torch.Tensor
    cluster_size: torch.Tensor
    embed: torch.Tensor
    embed_avg: torch.Tensor

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, epsilon: float = 1e-5,
                 kmeans_iters: int = 50, threshold_ema_dead_code: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        # Training hyper-parameters (Meta's defaults); unused at inference.
        self.decay = decay
        self.epsilon = epsilon
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.register_buffer("inited", torch.zeros(1))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", torch.zeros(codebook_size, dim))
        self.register_buffer("embed_avg", torch.zeros(codebook_size, dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``x`` ``[N, dim]`` -> ``[N]`` int64.

        The distance is expanded as ``|x|^2 - 2 x.e + |e|^2`` and maximised negated, in the
        same order of operations as the reference, so that rounding and ties pick the same
        index and files stay bit-identical with Meta's encoder.
        """
        embed_t = self.embed.t()
        if self.training or torch.is_grad_enabled():
            dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed_t + embed_t.pow(2).sum(0, keepdim=True))
            return dist.max(dim=-1).indices
        # Inference: the same value without the temporaries. With p = (2x) @ e^T,
        # a = |x|^2 and c = |e|^2, -((a - p) + c) == (p - a) - c exactly (IEEE rounding is
        # symmetric under negation), so the argmax is the same; |e|^2 is cached.
        dist = (2 * x) @ embed_t
        dist.sub_(x.pow(2).sum(1, keepdim=True)).sub_(self._embed_sq())
        return dist.max(dim=-1).indices

    def _embed_sq(self) -> torch.Tensor:
        """``|e|^2`` per code ``[1, K]``, as in :meth:`encode`, cached while ``embed`` is
        unchanged (:mod:`ecdc.models.caching`; training updates bump its version counter)."""
        embed = self.embed
        return self.cached("_embed_sq_cache", (embed,), lambda: embed.t().pow(2).sum(0, keepdim=True))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for integer ``codes`` of any shape -> ``[*codes.shape, dim]``."""
        return F.embedding(codes, self.embed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise rows of ``x`` ``[N, dim]`` -> (codes ``[N]``, codebook vectors ``[N, dim]``).

        The vectors are those of the codebook as it was when ``x`` was encoded. In training
        mode the codebook then learns from ``x`` (k-means on the first batch, EMA update,
        dead-code replacement); in eval mode no buffer changes.
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors [N, {self.dim}], got {list(x.shape)}")
        with torch.no_grad():
            if self.training and not bool(self.inited.item()):
                self.init_from_kmeans(x.detach())
            codes = self.encode(x.detach())
            quantized = self.decode(codes)
            if self.training:
                self.ema_update(x.detach(), codes)
                self.replace_dead_codes(x.detach())
        return codes, quantized

    @torch.no_grad()
    def init_from_kmeans(self, x: torch.Tensor) -> None:
        """Start the codebook from k-means centroids of ``x`` (rank 0's data when distributed).

        ``cluster_size`` is then the number of vectors of the whole batch (all ranks) nearest
        to each centroid, and ``embed_avg`` centroid x count, so that the EMA invariant
        embed ~ embed_avg / cluster_size holds from the first update on.
        """
        x = x.to(self.embed.dtype)
        if _is_rank_zero():
            means, _ = kmeans(x, self.codebook_size, self.kmeans_iters)
            self.embed.copy_(means)
        _broadcast_from_rank_zero([self.embed])
        counts = torch.bincount(_nearest(x, self.embed), minlength=self.codebook_size)
        self.cluster_size.copy_(_all_reduce_sum(counts.to(self.cluster_size.dtype)))
        self.embed_avg.copy_(self.embed * self.cluster_size[:, None])
        self.inited.fill_(1)

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Move each code toward the mean of the vectors assigned to it (summed over ranks)."""
        x = x.to(self.embed.dtype)
        counts, sums = _counts_and_sums(x, codes, self.codebook_size)
        # One collective for both statistics.
        stats = _all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))
        counts, sums = stats[:, 0], stats[:, 1:]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps unused codes (count ~ 0) from dividing by zero while
        # preserving the total count.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.embed.copy_(self.embed_avg / smoothed[:, None])

    @torch.no_grad()
    def replace_dead_codes(self, x: torch.Tensor) -> None:
        """Re-seed codes whose EMA count fell below the threshold with random vectors of ``x``.

        The replaced codes get ``cluster_size`` = threshold and a matching ``embed_avg`` so
        the EMA carries on from the new vector instead of pulling it back to its old mean.
        ``cluster_size`` is identical on every rank, so all ranks agree on the mask; rank 0
        picks the vectors and broadcasts them.
        """
        if self.threshold_ema_dead_code <= 0:
            return
        dead = self.cluster_size < self.threshold_ema_dead_code
        if not bool(dead.any()):
            return
        if _is_rank_zero():
            fresh = sample_vectors(x.to(self.embed.dtype), self.codebook_size)
            self.embed.copy_(torch.where(dead[:, None], fresh, self.embed))
        _broadcast_from_rank_zero([self.embed])
        self.cluster_size.masked_fill_(dead, float(self.threshold_ema_dead_code))
        self.embed_avg.copy_(torch.where(dead[:, None], self.embed * self.cluster_size[:, None],
                                         self.embed_avg))


class VectorQuantization(nn.Module):
    """One RVQ stage on channel-first latents ``[B, dim, T]``."""

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self._codebook = EuclideanCodebook(dim, codebook_size)

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, dim, T]`` -> codes ``[B, T]``."""
        b, d, t = x.shape
        flat = x.transpose(1, 2).reshape(b * t, d)
        return self._codebook.encode(flat).view(b, t)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, T]`` -> ``[B, dim, T]``."""
        return self._codebook.decode(codes).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, dim, T]`` -> (codebook vectors ``[B, dim, T]``, codes ``[B, T]``), no gradient.

        Trains the codebook when in training mode (see :meth:`EuclideanCodebook.forward`).
        """
        b, d, t = x.shape
        codes, quantized = self._codebook(x.transpose(1, 2).reshape(b * t, d))
        return quantized.view(b, t, d).transpose(1, 2), codes.view(b, t)


class _Stages(Protocol):
    """How :attr:`ResidualVectorQuantization.layers` is used: an ``nn.ModuleList`` (not
    generic in torch's stubs) holding only :class:`VectorQuantization` stages."""

    @overload
    def __getitem__(self, idx: int) -> VectorQuantization: ...
    @overload
    def __getitem__(self, idx: slice) -> _Stages: ...
    def __iter__(self) -> Iterator[VectorQuantization]: ...
    def __len__(self) -> int: ...


class ResidualVectorQuantization(nn.Module):
    """The list of stages; exists as its own module only for the ``vq.layers`` key path."""

    layers: _Stages

    def __init__(self, dim: int, codebook_size: int, num_quantizers: int) -> None:
        super().__init__()
        self.layers = cast(_Stages, nn.ModuleList(
            [VectorQuantization(dim, codebook_size) for _ in range(num_quantizers)]
        ))


@dataclass
class QuantizedResult:
    """What the RVQ's forward pass gives the rest of the model and the trainer."""

    quantized: torch.Tensor  # [B, D, T]; straight-through (gradient = identity) in training
    codes: torch.Tensor  # [B, n_q, T] int64
    commitment_loss: torch.Tensor  # scalar: mean over stages of mse(stage input, its code vectors)


class ResidualVectorQuantizer(nn.Module):
    """``n_q`` residual stages of ``bins`` codes each over ``dimension``-sized latents."""

    def __init__(self, dimension: int = 128, n_q: int = 32, bins: int = 1024) -> None:
        super().__init__()
        if dimension < 1 or n_q < 1 or bins < 2:
            raise ValueError(f"invalid quantiser shape: dimension={dimension}, n_q={n_q}, bins={bins}")
        self.dimension = dimension
        self.n_q = n_q
        self.bins = bins
        self.vq = ResidualVectorQuantization(dimension, bins, n_q)

    def _check_n_q(self, n_q: int) -> None:
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"number of codebooks must be in 1..{self.n_q}, got {n_q}")

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        """Latent ``[B, dimension, T]`` -> codes ``[B, n_q, T]`` int64 using the first n_q stages."""
        self._check_n_q(n_q)
        if x.dim() != 3 or x.shape[1] != self.dimension:
            raise ValueError(f"expected a latent [B, {self.dimension}, T], got {list(x.shape)}")
        # Rows [B * T, D] throughout: the same per-element subtractions as stage-wise
        # [B, D, T] tensors, without a transpose copy per stage.
        b, d, t = x.shape
        residual = x.transpose(1, 2).reshape(b * t, d)
        codes = []
        for layer in self.vq.layers[:n_q]:
            book = layer._codebook
            stage_codes = book.encode(residual)
            residual = residual - book.decode(stage_codes)
            codes.append(stage_codes.view(b, t))
        return torch.stack(codes, dim=1)

    def forward(self, x: torch.Tensor, n_q: int) -> QuantizedResult:
        """Quantise a latent ``[B, dimension, T]`` with the first ``n_q`` stages.

        In training mode the codebooks learn from ``x`` and ``quantized`` is
        ``x + (q - x).detach()``: the decoder sees the quantised latent while the gradient
        passes straight to the encoder. Each stage quantises ``residual - q.detach()`` of
        the stage before, so every stage's commitment loss pulls the encoder (and only the
        encoder) toward the codebooks. In eval mode ``quantized`` equals ``decode(codes)``
        and nothing is updated.
        """
        self._check_n_q(n_q)
        if x.dim() != 3 or x.shape[1] != self.dimension:
            raise ValueError(f"expected a latent [B, {self.dimension}, T], got {list(x.shape)}")
        # Codebooks and their statistics keep their dtype (float32) under mixed-precision autocast:
        # nearest-neighbour search and EMA sums are too sensitive for bf16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(self.vq.layers[0].codebook.dtype)
            residual = x
            # 0 + q0 + q1 + ... rounds exactly like decode()'s q0 + q1 + ...
            quantized = torch.zeros_like(x)
            codes = []
            losses = []
            for layer in self.vq.layers[:n_q]:
                q, stage_codes = layer(residual)
                losses.append(F.mse_loss(residual, q))
                residual = residual - q
                quantized = quantized + q
                codes.append(stage_codes)
            if self.training:
                quantized = x + (quantized - x).detach()
            commitment = torch.stack(losses).mean()
        return QuantizedResult(quantized=quantized, codes=torch.stack(codes, dim=1),
                               commitment_loss=commitment)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, K, T]`` -> latent ``[B, dimension, T]``, the sum of the K stages' vectors."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes [B, K, T], got {list(codes.shape)}")
        self._check_n_q(codes.shape[1])
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.bins):
            raise ValueError(f"codes must be in 0..{self.bins - 1}")
        layers = self.vq.layers
        if torch.is_grad_enabled():
            out = layers[0].decode(codes[:, 0])
            for k in range(1, codes.shape[1]):
                out = out + layers[k].decode(codes[:, k])
            return out
        # Same left-to-right sum, accumulated in place in [B, T, D].
        out = layers[0]._codebook.decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            out.add_(layers[k]._codebook.decode(codes[:, k]))
        return out.transpose(1, 2)
