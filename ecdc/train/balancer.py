"""EnCodec's loss balancer (Défossez et al. 2022, section 3.4).

The generator's losses live on wildly different scales (a time-domain L1 around 1e-2, a
mel loss around 1, adversarial terms that move with the discriminator). Rather than tune
raw weights, the balancer rescales the gradient each loss sends into the model output
``x_hat`` so that loss ``i`` contributes a gradient of norm ``w_i / sum(w) * total_norm``
whatever its natural scale, using an exponential moving average of the norm of
``d loss_i / d x_hat`` (the paper's ``<||g_i||_2>_beta``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch import distributed as dist


def average_across_ranks(tensor: Tensor) -> Tensor:
    """Average ``tensor`` in place over all DDP ranks and return it.

    Keeps every rank's balancer scales identical (so the replicas do not drift apart);
    a no-op when torch.distributed is unavailable, uninitialised or has a single rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    world = dist.get_world_size()
    if world == 1:
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor.div_(world)
    return tensor


class Balancer:
    """EnCodec's loss balancer: each loss gets a share of the gradient on the model output
    proportional to its weight, independent of the loss's natural scale.

    ``backward(losses, output)`` (or ``gradient``, which returns the gradient instead of
    back-propagating it) computes ``g_i = d loss_i / d output`` for every loss
    with a non-zero weight, updates the EMA of ``||g_i||`` and back-propagates
    ``sum_i (w_i / W) * total_norm * g_i / (ema_i + epsilon)`` from ``output``, where
    ``W`` sums the weights of the losses passed in that call (so the shares always add up
    to 1, e.g. before the adversarial losses are switched on). Losses with weight 0 are
    skipped entirely (not even differentiated). Losses that do not go through ``output``
    (e.g. the quantizer's commitment loss) must be back-propagated by the caller.

    Norms: with ``per_batch_item`` the norm of ``g_i`` is taken per batch item (over all
    non-batch dimensions) and averaged over the batch, so it does not grow with the batch
    size; otherwise it is the norm of the whole tensor. Under DDP the norms are averaged
    across ranks before the EMA update.

    EMA and its start: the EMA is bias-corrected, i.e. the normalised weighted average
    ``ema_t = (sum_k beta^(t-k) n_k) / (sum_k beta^(t-k))``, kept as a running ``sum``
    and ``count`` (``sum <- beta * sum + n``, ``count <- beta * count + 1``). This equals
    Adam-style correction ``m_t / (1 - beta^t)`` and means the very first step uses the
    current norm exactly rather than a value shrunk towards 0 (which would blow the first
    gradients up by ~1000x at beta = 0.999). ``ema_decay=0`` uses the current norm only.
    """

    def __init__(
        self,
        weights: dict[str, float],
        ema_decay: float = 0.999,
        total_norm: float = 1.0,
        per_batch_item: bool = True,
        epsilon: float = 1e-12,
    ) -> None:
        for name, weight in weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"loss weight {name!r} must be finite and non-negative, got {weight}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not total_norm > 0:
            raise ValueError(f"total_norm must be positive, got {total_norm}")
        if epsilon < 0:
            raise ValueError(f"epsilon must be non-negative, got {epsilon}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.ema_decay = float(ema_decay)
        self.total_norm = float(total_norm)
        self.per_batch_item = per_batch_item
        self.epsilon = float(epsilon)
        self._ema_sum: dict[str, Tensor] = {}
        self._ema_count: dict[str, Tensor] = {}
        self._last: tuple[list[str], Tensor] | None = None

    def _norm(self, grad: Tensor) -> Tensor:
        if self.per_batch_item and grad.dim() > 1:
            return grad.reshape(grad.shape[0], -1).norm(dim=1).mean()
        return grad.norm()

    def _update_ema(self, names: list[str], norms: Tensor) -> Tensor:
        averaged = []
        for name, norm in zip(names, norms):
            if name in self._ema_sum:
                ema_sum = self._ema_sum[name].to(norm) * self.ema_decay + norm
                ema_count = self._ema_count[name].to(norm) * self.ema_decay + 1.0
            else:
                ema_sum, ema_count = norm.clone(), torch.ones_like(norm)
            self._ema_sum[name], self._ema_count[name] = ema_sum, ema_count
            averaged.append(ema_sum / ema_count)
        return torch.stack(averaged)

    def gradient(self, losses: dict[str, Tensor], output: Tensor) -> Tensor:
        """The balanced gradient for ``output`` (updating the EMA), without back-propagating it.

        For callers that must fold it into one backward pass with other terms, e.g.
        ``torch.autograd.backward([output, commitment], [grad, None])`` under DDP, where a
        second backward would fire the gradient all-reduce twice. Zeros if no loss has a
        weight. ``last_stats()`` reports on the call.
        """
        unknown = sorted(set(losses) - set(self.weights))
        if unknown:
            raise ValueError(f"no balancer weight for loss(es) {unknown}")
        names = [name for name in losses if self.weights[name] > 0]
        self._last = None
        if not names:
            return torch.zeros_like(output)
        grads: list[Tensor] = []
        for name in names:
            loss = losses[name]
            if loss.numel() != 1:
                raise ValueError(f"loss {name!r} is not a scalar (shape {tuple(loss.shape)})")
            if not loss.requires_grad:
                raise ValueError(f"loss {name!r} does not require grad")
            (grad,) = torch.autograd.grad(loss.reshape(()), [output], retain_graph=True, allow_unused=True)
            grads.append(torch.zeros_like(output) if grad is None else grad)
        norms = torch.stack([self._norm(grad).detach() for grad in grads]).float()
        average_across_ranks(norms)
        emas = self._update_ema(names, norms)

        total_weight = sum(self.weights[name] for name in names)
        shares = torch.tensor([self.weights[name] / total_weight for name in names], device=emas.device)
        scales = shares * self.total_norm / (emas + self.epsilon)
        applied = torch.zeros_like(output)
        for grad, scale in zip(grads, scales):
            applied.add_(grad * scale.to(grad.dtype))
        applied_norm = self._norm(applied).detach().float().reshape(1).to(norms.device)
        self._last = (names, torch.cat([norms, emas, shares, applied_norm]))
        return applied

    def last_stats(self) -> dict[str, float]:
        """Statistics of the last ``gradient``/``backward`` call (empty if nothing was balanced).

        For each active loss ``name``: ``grad_norm_{name}`` (that step's norm of
        ``d loss / d output``, rank-averaged under DDP), ``ema_norm_{name}`` (the EMA it was
        divided by) and ``ratio_{name}`` (its weight share ``w / W``); plus
        ``grad_norm_total``, the norm of the balanced gradient. Costs one device sync.
        """
        if self._last is None:
            return {}
        names, packed = self._last
        values = packed.tolist()
        count = len(names)
        stats: dict[str, float] = {}
        for i, name in enumerate(names):
            stats[f"grad_norm_{name}"] = values[i]
            stats[f"ema_norm_{name}"] = values[count + i]
            stats[f"ratio_{name}"] = values[2 * count + i]
        stats["grad_norm_total"] = values[3 * count]
        return stats

    def backward(self, losses: dict[str, Tensor], output: Tensor) -> dict[str, float]:
        """Back-propagate the balanced gradient of ``losses`` from ``output``; returns ``last_stats()``."""
        if not output.requires_grad:
            raise ValueError("the model output does not require grad")
        grad = self.gradient(losses, output)
        if self._last is not None:
            output.backward(grad)
        return self.last_stats()

    def state_dict(self) -> dict:
        """The EMA state (per-loss running sum and count), so a resumed run scales exactly as before."""
        return {
            "ema_sum": {name: value.detach().cpu().clone() for name, value in self._ema_sum.items()},
            "ema_count": {name: value.detach().cpu().clone() for name, value in self._ema_count.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned; the tensors move to the output's device on first use."""
        try:
            sums, counts = state["ema_sum"], state["ema_count"]
        except (KeyError, TypeError) as exc:
            raise ValueError("not a Balancer state dict (needs 'ema_sum' and 'ema_count')") from exc
        if set(sums) != set(counts):
            raise ValueError("Balancer state dict: 'ema_sum' and 'ema_count' name different losses")
        self._ema_sum = {name: torch.as_tensor(value).clone() for name, value in sums.items()}
        self._ema_count = {name: torch.as_tensor(value).clone() for name, value in counts.items()}
