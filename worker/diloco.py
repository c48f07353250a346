"""``DiLoCoAverager``: an outer optimizer on the ranks' pseudo-gradient (Douillard et al. 2023).

Rounds fall where ``PeriodicModelAverager``'s do. The first is a plain average, whose result becomes
the global parameters ``θ_g``. Every later round: the ranks' mean ``θ̄`` is taken in place on the
flat buffer (one all-reduce, as for the other averagers), ``Δ = θ_g − θ̄``, every averaged parameter
is set back to ``θ_g`` with ``Δ`` as its ``.grad``, the outer optimizer steps, and the result is the
new ``θ_g``. Memory: ``θ_g`` is one extra copy of the averaged parameters (in pinned host memory with
``global_on_cpu=True``); ``Δ`` is written into the gradients the inner step left, so it takes none.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from avgctl.worker import control_state
from avgctl.worker.base import LiveAverager
from avgctl.worker.flat import FlatParams, MixedFlatParams
from avgctl.worker.layout import Layout
from avgctl.worker.options import AveragerOptions

__all__ = ["DiLoCoAverager"]


def _segments(layout: Layout) -> list[tuple[torch.Tensor, list[tuple[torch.nn.Parameter, int]]]]:
    """The tensors that hold the averaged parameters, each with its parameters and their offsets."""
    flat = layout.flat
    parts = [flat] if isinstance(flat, FlatParams) else flat.parts if isinstance(flat, MixedFlatParams) else None
    if parts is None:  # torch's path: every parameter on its own (its .data is re-pointed each round)
        return [(p.data.view(-1), [(p, 0)]) for p in layout.params]
    out = []
    for part in parts:
        offsets, at = [], 0
        for p, n in zip(part.params, part.numels):
            offsets.append((p, at))
            at += n
        out.append((part.buffer, offsets))
    return out


def _norm_squared(tensor: torch.Tensor) -> torch.Tensor:
    """``||tensor||^2`` as a float64 0-dim tensor; summed in the tensor's float32/float64 (fast), half types in float32."""
    widen = None if tensor.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(tensor, dtype=widen).double().square()


class DiLoCoAverager(LiveAverager):
    """DiLoCo's outer step every ``period`` steps after ``warmup_steps``, with live control and metrics.

    Args:
        outer_optimizer: built on the model's parameters (DiLoCo: SGD, lr 0.7, momentum 0.9,
            Nesterov). Its state is yours to checkpoint (``outer_optimizer.state_dict()``).
        period: inner steps per round (``H``).
        warmup_steps: steps before the first round; rounds fall on ``warmup_steps + k * period``.
        process_group: the group to average over (default: the world).
        global_on_cpu: keep ``θ_g`` in pinned host memory (for tight GPUs); each round copies it in
            and out without blocking.

    ``set_outer_lr`` commands set every param group's lr from their applied step on, on every rank.
    A parameter-set change restarts ``θ_g`` from the next round's plain average.
    """

    def __init__(
        self,
        outer_optimizer: torch.optim.Optimizer,
        period: int,
        warmup_steps: int = 0,
        process_group: dist.ProcessGroup | None = None,
        *,
        global_on_cpu: bool = False,
        **options: Any,
    ):
        settings = AveragerOptions(**options)
        if period < 1:
            raise ValueError("Arg ``period`` must be a positive value.")
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        if not outer_optimizer.param_groups:
            raise ValueError("the outer optimizer has no parameters")
        group = process_group if process_group is not None else dist.group.WORLD
        state = control_state.diloco_state(period, warmup_steps)
        super().__init__(state, process_group, [group], settings)
        self.outer_optimizer = outer_optimizer
        self.global_on_cpu = global_on_cpu
        self._global: list[torch.Tensor] | None = None
        self._global_layout: Layout | None = None
        self._restored: list[torch.Tensor] | None = None  # θ_g from a checkpoint, for the next layout

    @property
    def outer_lr(self) -> float:
        """The lr of the outer optimizer's first param group."""
        return float(self.outer_optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ the round

    def _after_mean(self, layout: Layout, level: int, step: int) -> torch.Tensor | None:
        segments = _segments(layout)
        if self._global is None or self._global_layout is not layout:
            self._global_layout = layout
            restored, self._restored = self._restored, None
            if restored is None or [t.numel() for t in restored] != [b.numel() for b, _ in segments]:
                self._global = [self._keep(buffer) for buffer, _ in segments]  # the first round: θ_g = θ̄
                return None
            self._global = [self._keep(t) for t in restored]
        delta_squares, theta_squares = [], []
        for (buffer, params), kept in zip(segments, self._global):
            here = kept.to(buffer.device, non_blocking=True)  # θ_g (a copy when kept on the host)
            theta_squares.append(_norm_squared(here))
            grads = []
            for p, offset in params:  # Δ = θ_g − θ̄, written into the gradients the inner step left
                global_p = here[offset : offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                torch.sub(global_p, p.detach(), out=p.grad)
                grads.append(p.grad)
            delta_squares.extend(n.double().square() for n in torch._foreach_norm(grads))
            buffer.copy_(here, non_blocking=True)  # every rank back at θ_g
        self._apply_outer_lr()
        self.outer_optimizer.step()
        for (buffer, _), kept in zip(segments, self._global):
            kept.copy_(buffer, non_blocking=True)  # the new θ_g
        return torch.stack([torch.stack(delta_squares).sum(), torch.stack(theta_squares).sum()])

    def _round_fields(self, figures: list[float]) -> dict[str, float | None]:
        delta, theta = (math.sqrt(max(v, 0.0)) for v in figures)
        return {
            "pseudo_gradient_norm": delta,
            "pseudo_gradient_relative": delta / theta if theta > 0 else 0.0,
            "outer_lr": self.outer_lr,
        }

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.global_on_cpu:
            return tensor.detach().clone()
        pinned = torch.cuda.is_available() and tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        host.copy_(tensor.detach(), non_blocking=pinned)
        return host

    # ------------------------------------------------------------------ the outer lr

    def _control_changed(self, step: int) -> None:
        self._apply_outer_lr()
        super()._control_changed(step)

    def _apply_outer_lr(self) -> None:
        lr = self._state.outer_lr
        if lr is not None:
            for group in self.outer_optimizer.param_groups:
                group["lr"] = lr

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The base state plus ``θ_g`` (on the CPU); the outer optimizer's state is its own ``state_dict()``."""
        state = super().state_dict()
        if self._global is not None and torch.cuda.is_available():
            torch.cuda.synchronize()  # a checkpoint is a sync point: θ_g's last copies have landed
        state["global_params"] = (
            None if self._global is None else [t.detach().to("cpu", copy=True) for t in self._global]
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("global_params")
        self._global, self._global_layout = None, None
        self._restored = None if saved is None else [t.clone() for t in saved]
        self._apply_outer_lr()
