"""What one parameter set needs to be averaged and measured: its flat buffer, samples and names.

A ``Layout`` is built once per parameter set and reused every round while the set is unchanged. Its
``average`` is where the averaging collectives run (the flat buffer's all-reduce, the two-rank
exchange, torch's own path), so making them device-aware is a change to this module alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging import utils as torch_utils

from avgctl.worker import divergence
from avgctl.worker.flat import FlatParams, MixedFlatParams, fallback_reason, flatten, layout_fingerprint
from avgctl.worker.options import AveragerOptions
from avgctl.worker.pair import PairAllReduce, pair_eligible

DRIFT_SAMPLE_SIZE = 2048
"""Coordinates read every step for the drift (about 1.6% standard error for Gaussian-like moves)."""


@dataclass(slots=True)
class Layout:
    """What the current parameter set needs: its flat buffer (or None), sample plans and names."""

    params: list[torch.nn.Parameter]
    flat: FlatParams | MixedFlatParams | None
    """The persistent buffer(s) the parameters are views of; None on torch's path (see ``fallback_reason``)."""
    fallback_reason: str | None
    """Why these parameters cannot share a flat buffer (None on the fast path)."""
    plan: divergence.SamplePlan
    """On the parameters' device, like every tensor a layout holds: nothing is copied per round."""
    drift_plan: divergence.DriftPlan
    """A smaller, uniform sample than ``plan``: drift is read every step."""
    device: torch.device
    names: list[str]
    fingerprint: int
    ids: tuple[int, ...] = field(default=())
    selection: object = None
    """Where ``plan``'s coordinates are in the flat buffer(s) (None: every one, in order)."""
    drift_selection: object = None
    pairs: dict[int, PairAllReduce | None] = field(default_factory=dict)
    """Per level: the one-exchange all-reduce for two-rank groups (None: use ``dist.all_reduce``)."""
    agreed: bool = False
    """Every rank confirmed the same layout at a waited-for exchange: rounds may skip the pre-check."""

    def fits(self, params: list[torch.nn.Parameter]) -> bool:
        """The same parameters, still views of the buffer: this layout can be reused for them."""
        if self.ids != tuple(id(p) for p in params):
            return False
        return self.flat is None or self.flat.still_views()

    @property
    def tail(self) -> torch.Tensor | None:
        """Room at the end of the buffer for a message that rides in the averaging all-reduce."""
        return None if self.flat is None else self.flat.tail

    def samples(self) -> torch.Tensor:
        """The divergence plan's coordinates, on the parameters' device (float32 or float64)."""
        if self.flat is not None:
            return divergence.widen(self.flat.gather(self.selection))
        return divergence.gather_params(self.params, self.plan)

    def drift_sample(self) -> torch.Tensor:
        """The drift plan's coordinates, on the parameters' device."""
        if self.flat is not None:
            return self.flat.gather(self.drift_selection)
        return divergence.drift_sample_params(self.params, self.drift_plan)

    def average(self, level: int, group: dist.ProcessGroup, size: int) -> int:
        """Replace the parameters by their mean over ``group`` (level ``level``); returns the bytes all-reduced.

        The same arithmetic as torch (divide, then all-reduce SUM), so values match its averagers bit
        for bit. On the flat buffer the tail goes along: its SUM is the exchange riding in it.
        """
        if self.flat is None:
            torch_utils.average_parameters(iter(self.params), group)
            return sum(p.numel() * p.element_size() for p in self.params)
        if isinstance(self.flat, MixedFlatParams):
            packed = self.flat.pack()  # torch.cat's layout and dtype, so torch's sums
            packed.div_(size)
            synchronize_accelerator()
            self._all_reduce(level, group, packed)
            self.flat.unpack(packed)
            return packed.numel() * packed.element_size()
        storage = self.flat.storage
        synchronize_accelerator()
        self.flat.buffer.div_(size)
        self._all_reduce(level, group, storage)
        return storage.numel() * storage.element_size()

    def _all_reduce(self, level: int, group: dist.ProcessGroup, storage: torch.Tensor) -> None:
        if level not in self.pairs:
            self.pairs[level] = PairAllReduce(group, storage) if pair_eligible(group, storage) else None
        pair = self.pairs[level]
        if pair is not None:
            pair(storage)
        else:
            dist.all_reduce(storage, group=group)


def make_plans(numels: list[int], options: AveragerOptions) -> tuple[divergence.SamplePlan, divergence.DriftPlan]:
    """The divergence and drift samples for parameters of these sizes, drawn on the CPU (the same
    coordinates on every rank); ``build_layout`` moves them to the parameters' device once."""
    plan = divergence.make_plan(numels, None if options.exact_divergence else options.sample_size)
    return plan, divergence.make_drift_plan(numels, min(options.sample_size, DRIFT_SAMPLE_SIZE))


def build_layout(
    params: list[torch.nn.Parameter],
    *,
    names_by_id: dict[int, str],
    options: AveragerOptions,
    tail: int,
    plans: tuple[divergence.SamplePlan, divergence.DriftPlan] | None = None,
) -> Layout:
    """Flatten ``params`` (with ``tail`` spare elements) when they allow it, and plan their samples.

    Args:
        params: the parameters to average, in torch's order (``get_params_to_average``).
        names_by_id: ``id(parameter) -> name`` for per-layer reports; others get a shape-based name.
        options: the averager's sample sizes.
        tail: spare elements after the parameters for the exchange (0: none).
        plans: ``make_plans``' result for these parameters (default: drawn here).
    """
    reason = fallback_reason(params)
    flat = flatten(params, tail=tail) if reason is None else None
    numels = [p.numel() for p in params]
    device = params[0].device if params else torch.device("cpu")
    plan, drift_plan = plans if plans is not None else make_plans(numels, options)
    selection = drift_selection = None
    if flat is not None:
        if not (plan.exact and plan.index.numel() == sum(numels)):  # the exact plan: a plain copy
            selection = flat.selection(plan.index)
        if drift_plan.index is not None:
            drift_selection = flat.selection(drift_plan.index)
    return Layout(
        params=list(params),
        flat=flat,
        fallback_reason=reason,
        plan=plan.to(device),
        drift_plan=drift_plan.to(device),
        device=device,
        names=[names_by_id.get(id(p), f"param{i}{list(p.shape)}") for i, p in enumerate(params)],
        fingerprint=flat.fingerprint if flat else layout_fingerprint(params),
        ids=tuple(id(p) for p in params),
        selection=selection,
        drift_selection=drift_selection,
    )


def average_in(params: list[torch.nn.Parameter], group: dist.ProcessGroup, size: int, dtype: torch.dtype) -> None:
    """Average ``params`` in place over ``group``, in ``dtype`` (the promoted dtype of the set they
    belong to, as torch's ``torch.cat`` of that whole set would use): divide, all-reduce, round back."""
    if not params:
        return
    packed = torch.cat([p.detach().reshape(-1).to(dtype) for p in params])
    packed.div_(size)
    synchronize_accelerator()
    dist.all_reduce(packed, group=group)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(packed[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def synchronize_accelerator() -> None:
    """torch synchronizes before its all-reduce so it cannot overlap other process groups' work."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        accelerator.synchronize()
    elif torch.cuda.is_available():
        torch.cuda.synchronize()
