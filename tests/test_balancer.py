"""Tests for ecdc.train.balancer: gradient shares, zero weights, EMA state, DDP averaging."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import distributed as dist

from ecdc.train.balancer import Balancer, average_across_ranks


def _item_norm(t: torch.Tensor) -> float:
    """The balancer's per-batch-item norm: norm of each item, averaged over the batch."""
    return t.reshape(t.shape[0], -1).norm(dim=1).mean().item()


def _toy_losses(output: torch.Tensor) -> dict[str, torch.Tensor]:
    # Natural scales ~1000x apart: the balancer must make that irrelevant.
    return {"big": 1000.0 * output.square().mean(), "small": output.abs().mean()}


def _separate_grads(output: torch.Tensor) -> dict[str, torch.Tensor]:
    losses = _toy_losses(output)
    return {name: torch.autograd.grad(loss, output, retain_graph=True)[0] for name, loss in losses.items()}


def _decompose(applied: torch.Tensor, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write `applied` as sum_i c_i g_i (least squares) and return the parts c_i g_i."""
    basis = torch.stack([g.reshape(-1) for g in grads.values()], dim=1).double()
    coeffs = torch.linalg.lstsq(basis, applied.reshape(-1, 1).double()).solution[:, 0]
    residual = applied.reshape(-1).double() - basis @ coeffs
    assert residual.norm() <= 1e-6 * applied.double().norm()
    return {name: float(c) * g for c, (name, g) in zip(coeffs, grads.items())}


@pytest.mark.parametrize("per_batch_item", [True, False])
def test_applied_gradient_splits_in_the_ratio_of_the_weights(per_batch_item: bool) -> None:
    torch.manual_seed(0)
    output = torch.randn(4, 1, 200, requires_grad=True)
    weights = {"big": 1.0, "small": 3.0}
    balancer = Balancer(weights, ema_decay=0.0, total_norm=2.0, per_batch_item=per_batch_item)
    stats = balancer.backward(_toy_losses(output), output)
    assert output.grad is not None
    parts = _decompose(output.grad, _separate_grads(output))
    norm = _item_norm if per_batch_item else (lambda t: t.norm().item())
    assert norm(parts["big"]) == pytest.approx(2.0 * 1 / 4, rel=1e-4)
    assert norm(parts["small"]) == pytest.approx(2.0 * 3 / 4, rel=1e-4)
    assert stats["ratio_big"] == pytest.approx(0.25) and stats["ratio_small"] == pytest.approx(0.75)
    # The raw gradients really are on very different scales.
    assert stats["grad_norm_big"] > 100 * stats["grad_norm_small"]


def test_shares_hold_after_the_ema_settles() -> None:
    torch.manual_seed(1)
    start = torch.randn(4, 1, 200)
    balancer = Balancer({"big": 1.0, "small": 3.0}, ema_decay=0.9)
    for step in range(200):
        # The output drifts slowly, so the gradient norms keep changing a little. (A leaf:
        # with retain_grad() on a non-leaf, autograd.grad would also accumulate into .grad.)
        output = (start * (1.0 + 0.001 * step)).requires_grad_(True)
        balancer.backward(_toy_losses(output), output)
    parts = _decompose(output.grad, _separate_grads(output))
    ratio = _item_norm(parts["small"]) / _item_norm(parts["big"])
    assert ratio == pytest.approx(3.0, rel=0.03)
    assert _item_norm(parts["small"]) + _item_norm(parts["big"]) == pytest.approx(1.0, rel=0.03)


def test_first_step_is_bias_corrected() -> None:
    # With beta = 0.999 and no correction the first EMA would be 0.001 * norm.
    output = torch.randn(2, 1, 50, requires_grad=True)
    stats = Balancer({"big": 1.0, "small": 1.0}).backward(_toy_losses(output), output)
    for name in ("big", "small"):
        assert stats[f"ema_norm_{name}"] == pytest.approx(stats[f"grad_norm_{name}"], rel=1e-6)
    assert stats["grad_norm_total"] <= 1.0 + 1e-5


def test_zero_weight_loss_contributes_nothing() -> None:
    torch.manual_seed(2)
    output = torch.randn(3, 1, 100, requires_grad=True)
    losses = _toy_losses(output)
    # A weight-0 loss is skipped without being differentiated (this one has no graph at all).
    losses["ignored"] = torch.tensor(123.0)
    balancer = Balancer({"big": 1.0, "small": 0.0, "ignored": 0.0}, ema_decay=0.0)
    stats = balancer.backward(losses, output)
    grad_big = _separate_grads(output)["big"]
    expected = grad_big / _item_norm(grad_big)
    torch.testing.assert_close(output.grad, expected)
    assert not any("small" in key or "ignored" in key for key in stats)
    assert "small" not in balancer.state_dict()["ema_sum"]


def test_state_dict_round_trip_reproduces_the_next_step_exactly() -> None:
    torch.manual_seed(3)
    outputs = [torch.randn(2, 1, 80) * (1 + i) for i in range(5)]

    def step(balancer: Balancer, value: torch.Tensor) -> torch.Tensor:
        output = value.clone().requires_grad_(True)
        balancer.backward(_toy_losses(output), output)
        assert output.grad is not None
        return output.grad

    original = Balancer({"big": 1.0, "small": 2.0}, ema_decay=0.99)
    for value in outputs[:4]:
        step(original, value)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = Balancer({"big": 1.0, "small": 2.0}, ema_decay=0.99)
    resumed.load_state_dict(torch.load(buffer))
    assert torch.equal(step(resumed, outputs[4]), step(original, outputs[4]))
    # A fresh balancer (no state) scales differently, so the state really matters.
    assert not torch.equal(step(Balancer({"big": 1.0, "small": 2.0}, ema_decay=0.99), outputs[4]),
                           step(original, outputs[4]))
    with pytest.raises(ValueError):
        resumed.load_state_dict({"ema_sum": {}})


def test_gradient_returns_what_backward_applies() -> None:
    torch.manual_seed(5)
    value = torch.randn(3, 2, 60)
    via_backward = value.clone().requires_grad_(True)
    first = Balancer({"big": 1.0, "small": 2.0})
    stats = first.backward(_toy_losses(via_backward), via_backward)
    output = value.clone().requires_grad_(True)
    second = Balancer({"big": 1.0, "small": 2.0})
    grad = second.gradient(_toy_losses(output), output)
    assert output.grad is None  # nothing back-propagated yet
    assert torch.equal(grad, via_backward.grad)
    assert second.last_stats() == stats
    assert stats["grad_norm_total"] == pytest.approx(_item_norm(grad), rel=1e-6)
    # Zero weights everywhere: a zero gradient and no stats.
    idle = Balancer({"big": 0.0})
    assert torch.equal(idle.gradient({"big": output.sum()}, output), torch.zeros_like(output))
    assert idle.last_stats() == {}


def test_gradient_reaches_parameters_behind_the_output() -> None:
    torch.manual_seed(4)
    layer = torch.nn.Linear(10, 10)
    x = torch.randn(3, 1, 10)
    output = layer(x)
    Balancer({"big": 1.0, "small": 1.0}).backward(_toy_losses(output), output)
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Balancer({"a": -1.0})
    with pytest.raises(ValueError):
        Balancer({"a": 1.0}, ema_decay=1.0)
    output = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError):
        Balancer({"a": 1.0}).backward({"b": output.sum()}, output)  # no weight for "b"
    with pytest.raises(ValueError):
        Balancer({"a": 1.0}).backward({"a": output}, output)  # not a scalar
    assert Balancer({"a": 0.0}).backward({"a": output.sum()}, output) == {}


def test_rank_averaging_is_a_no_op_without_distributed() -> None:
    assert not dist.is_initialized()
    norms = torch.tensor([1.0, 2.5])
    result = average_across_ranks(norms)
    assert result is norms and torch.equal(norms, torch.tensor([1.0, 2.5]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different data on each rank
        output = (torch.randn(2, 1, 50) * (1 + 3 * rank)).requires_grad_(True)
        stats = Balancer({"big": 1.0, "small": 1.0}).backward(_toy_losses(output), output)
        torch.save(stats, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank_averaging_makes_all_ranks_scale_identically(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    stats = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key in ("ema_norm_big", "ema_norm_small", "grad_norm_big"):
        assert stats[0][key] == stats[1][key]
    # Each rank's own norms differ a lot; the shared value is their mean.
    torch.manual_seed(0)
    out0 = torch.randn(2, 1, 50).requires_grad_(True)
    torch.manual_seed(1)
    out1 = (torch.randn(2, 1, 50) * 4).requires_grad_(True)
    local = [_item_norm(_separate_grads(o)["big"]) for o in (out0, out1)]
    assert stats[0]["grad_norm_big"] == pytest.approx(sum(local) / 2, rel=1e-5)
