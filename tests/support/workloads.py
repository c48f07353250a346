"""Tiny deterministic training workloads shared by the distributed worker tests."""

from __future__ import annotations

import torch
from torch import nn


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same initial weights on every rank, as DDP would broadcast them."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batch(rank: int, step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data on every rank (non-IID), reproducible per (rank, step)."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 8, generator=gen, dtype=dtype) + rank
    y = torch.randn(16, 4, generator=gen, dtype=dtype)
    return x, y


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> float:
    dtype = next(model.parameters()).dtype
    x, y = batch(rank, step, dtype)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def flat_copy(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


class RoundLog:
    """A metrics listener that remembers round steps and control events."""

    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.controls: list[tuple[int, int]] = []
        self.steps: int = 0

    def on_step(self, record) -> None:
        self.steps += 1

    def on_round(self, record) -> None:
        self.rounds.append(record.step)

    def on_control(self, event) -> None:
        self.controls.append((event.step, event.control.version))
