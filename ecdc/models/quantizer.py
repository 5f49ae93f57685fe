"""Residual vector quantiser (RVQ), inference part.

Each stage picks the codebook vector nearest to what the previous stages left over; the
latent is rebuilt as the sum of the chosen vectors. Module and buffer names
(``vq.layers.<i>._codebook.embed`` ...) follow Meta's so their checkpoints load strictly.

Training (EMA codebook updates, k-means initialisation on the first batch, dead-code
re-initialisation, quantiser dropout and the commitment loss) is deliberately not here
yet: the buffers ``inited``, ``cluster_size`` and ``embed_avg`` and the hyper-parameters
stored on :class:`EuclideanCodebook` exist so that it can be added without changing the
state-dict layout.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class EuclideanCodebook(nn.Module):
    """One codebook of ``codebook_size`` vectors of size ``dim``, searched by L2 distance.

    Starts empty (zeros, ``inited`` = 0), as Meta's does before k-means initialisation.
    """

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
        dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed_t + embed_t.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for integer ``codes`` of any shape -> ``[*codes.shape, dim]``."""
        return F.embedding(codes, self.embed)


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


class ResidualVectorQuantization(nn.Module):
    """The list of stages; exists as its own module only for the ``vq.layers`` key path."""

    def __init__(self, dim: int, codebook_size: int, num_quantizers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [VectorQuantization(dim, codebook_size) for _ in range(num_quantizers)]
        )


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
        residual = x
        codes = []
        for layer in self.vq.layers[:n_q]:
            stage_codes = layer.encode(residual)
            residual = residual - layer.decode(stage_codes)
            codes.append(stage_codes)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, K, T]`` -> latent ``[B, dimension, T]``, the sum of the K stages' vectors."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes [B, K, T], got {list(codes.shape)}")
        self._check_n_q(codes.shape[1])
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.bins):
            raise ValueError(f"codes must be in 0..{self.bins - 1}")
        out = self.vq.layers[0].decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            out = out + self.vq.layers[k].decode(codes[:, k])
        return out
