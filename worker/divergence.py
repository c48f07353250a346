"""Parameter divergence: pure math on tensors, no communication and no host reads.

Everything here stays on the parameters' device: plans are moved there once per layout
(``SamplePlan.to``), and figures come back as device tensors the caller reads at a sync point.

Divergence of rank i is ``||theta_i - theta_bar||``. It is computed from the difference itself in
float64, never as ``sum ||theta_i||^2 - n ||theta_bar||^2`` (catastrophic cancellation in fp32).

The cheap default estimates it from a fixed stratified sample of coordinates: each parameter tensor
("layer") keeps ``k_l`` coordinates drawn uniformly (with replacement) and each layer's sum of squares
is scaled by ``numel_l / k_l``. The estimate of the squared norm is unbiased; its relative standard
error on the norm is about ``sqrt((kurtosis - 1) / k) / 2``, where kurtosis is that of the coordinate
differences: ``sqrt(1 / (2k))`` for Gaussian-like differences (0.55% at the default k = 16,384), more
when a few coordinates carry most of the divergence (early training, sparse updates), which is what
the exact mode is for. Layers with at most ``min_per_layer`` coordinates, and whole models under the
budget, are measured exactly.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from dataclasses import dataclass

import torch

from avgctl.protocol.bounds import MAX_TOP_LAYERS, TOP_LAYERS


@dataclass(frozen=True, slots=True)
class SamplePlan:
    """Which coordinates to read, and how to scale them back to full norms."""

    index: torch.Tensor  # int64 positions in the flattened parameters, sorted within each layer
    lengths: torch.Tensor  # int64 samples per layer (layers are contiguous in ``index``)
    weight: torch.Tensor  # float64 per layer: numel_l / k_l
    coord_weight: torch.Tensor  # float64 per sampled coordinate: its layer's weight
    layer_starts: list[int]  # offset of each layer in the flattened parameters
    sample_starts: list[int]  # where each layer's samples begin in ``index`` (plus the end)
    exact: bool

    @property
    def layers(self) -> int:
        return len(self.layer_starts)

    def to(self, device: torch.device) -> SamplePlan:
        """The plan with its tensors on ``device`` (built on the CPU, moved once per layout)."""
        return dataclasses.replace(
            self,
            index=self.index.to(device),
            lengths=self.lengths.to(device),
            weight=self.weight.to(device),
            coord_weight=self.coord_weight.to(device),
        )


def make_plan(numels: list[int], budget: int | None, *, seed: int = 0, min_per_layer: int = 32) -> SamplePlan:
    """A fixed sample for parameters of these sizes; ``budget=None`` means every coordinate."""
    total = sum(numels)
    exact = budget is None or total <= budget
    gen = torch.Generator().manual_seed(seed)
    starts, pieces, weights = [], [], []
    offset = 0
    for n in numels:
        starts.append(offset)
        if exact or n <= min_per_layer:
            k, local = n, torch.arange(n)
        else:
            k = min(n, max(min_per_layer, round(budget * n / total)))
            local = torch.randint(n, (k,), generator=gen).sort().values
        pieces.append(local + offset)
        weights.append(n / k if k else 0.0)
        offset += n
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    weight = torch.tensor(weights, dtype=torch.float64)
    return SamplePlan(
        index=torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64),
        lengths=lengths,
        weight=weight,
        coord_weight=weight.repeat_interleave(lengths),
        layer_starts=starts,
        sample_starts=[0] + list(itertools.accumulate(len(p) for p in pieces)),
        exact=exact,
    )


def widen(values: torch.Tensor) -> torch.Tensor:
    """float32 or float64: half types are widened so differences of nearby values stay exact."""
    return values if values.dtype in (torch.float32, torch.float64) else values.float()


def gather_params(params: list[torch.Tensor], plan: SamplePlan | DriftPlan) -> torch.Tensor:
    """The sampled coordinates of separate tensors (the fallback path without a flat buffer), in float64
    on the first parameter's device (the plan's index must be there too)."""
    pieces = []
    device = params[0].device if params else torch.device("cpu")
    for layer, p in enumerate(params):
        lo, hi = plan.sample_starts[layer], plan.sample_starts[layer + 1]
        local = (plan.index.narrow(0, lo, hi - lo) - plan.layer_starts[layer]).to(p.device, non_blocking=True)
        pieces.append(p.detach().reshape(-1).index_select(0, local).to(device, torch.float64, non_blocking=True))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float64, device=device)


def layer_squares(values: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
    """Estimated ``||values_l||^2`` per layer from sampled coordinates, summed in float64."""
    values = values.double()
    return torch.segment_reduce(values * values, "sum", lengths=plan.lengths) * plan.weight


def round_figures(before: torch.Tensor, after: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
    """One round's figures of this rank, from samples taken before and after averaging, on their device:
    ``[squared contribution of each layer...] + [||theta_bar||^2]`` in float64 (see ``RankDivergence``).

    The difference is taken first, in the samples' float32/float64 (exact for nearby values, and
    within one rounding otherwise), and only then squared and summed in float64, per layer in one
    segmented reduction: a round costs a handful of tensor operations and no host read.
    """
    per_layer = layer_squares(before - after, plan)
    mean = after.double()
    return torch.cat([per_layer, torch.dot(mean * plan.coord_weight, mean).reshape(1)])


@dataclass(frozen=True, slots=True)
class RankDivergence:
    """One rank's view of one averaging round."""

    squared: float  # ||theta_i - theta_bar||^2
    mean_norm_squared: float  # ||theta_bar||^2
    per_layer: list[float]  # squared contribution of each layer

    @classmethod
    def from_figures(cls, figures: list[float]) -> RankDivergence:
        """From ``round_figures``' values, read on the host."""
        per_layer = figures[:-1]
        return cls(squared=sum(per_layer), mean_norm_squared=figures[-1], per_layer=per_layer)


@dataclass(frozen=True, slots=True)
class DriftPlan:
    """A uniform sample of the flattened parameters for the per-step drift: every coordinate weighs
    the same, so the estimate is one scaled distance (the cheapest thing to do every step)."""

    index: torch.Tensor | None  # sorted positions, drawn with replacement; None: every coordinate
    scale: float  # sqrt(total / k): turns the sample's norm into an estimate of the full norm
    layer_starts: list[int]  # offset of each layer in the flattened parameters
    sample_starts: list[int]  # where each layer's samples begin in ``index`` (plus the end)

    def to(self, device: torch.device) -> DriftPlan:
        """The plan with its index on ``device``."""
        return self if self.index is None else dataclasses.replace(self, index=self.index.to(device))


def make_drift_plan(numels: list[int], budget: int, *, seed: int = 1) -> DriftPlan:
    total = sum(numels)
    layer_starts = list(itertools.accumulate(numels, initial=0))
    if total <= budget:
        return DriftPlan(index=None, scale=1.0, layer_starts=layer_starts[:-1], sample_starts=[])
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(total, (budget,), generator=gen).sort().values
    return DriftPlan(
        index=index,
        scale=math.sqrt(total / budget),
        layer_starts=layer_starts[:-1],
        sample_starts=torch.searchsorted(index, torch.tensor(layer_starts)).tolist(),
    )


def drift_sample_params(params: list[torch.Tensor], plan: DriftPlan) -> torch.Tensor:
    """The drift plan's coordinates of separate tensors (the fallback path): only the sampled
    coordinates are read, never a copy of the whole model; in float64 on the parameters' device."""
    if plan.index is None:
        device = params[0].device
        return torch.cat([p.detach().reshape(-1).to(device, torch.float64, non_blocking=True) for p in params])
    return gather_params(params, plan)


def drift(current: torch.Tensor, last_average: torch.Tensor, plan: DriftPlan) -> torch.Tensor:
    """``||theta_i - theta_bar(last sync)||``: how far this rank moved since the last round (0-dim, on
    the samples' device: read it without blocking, see ``device.Staged``).

    The difference of two nearby floats is exact (Sterbenz), so working in the parameters' dtype
    loses nothing that matters here; ``torch.dist`` sums the squares with pairwise accuracy.
    """
    return torch.dist(current, last_average) * plan.scale


def top_layers(per_layer: list[float], names: list[str]) -> list[tuple[str, float]]:
    """The layers' shares of the squared divergence, the largest first: every layer's for a model
    of at most ``MAX_TOP_LAYERS`` layers (the dashboard's heatmap shows them all), else the top
    ``TOP_LAYERS`` (a round record stays a few KB)."""
    k = len(per_layer) if len(per_layer) <= MAX_TOP_LAYERS else TOP_LAYERS
    total = sum(per_layer)
    if total <= 0.0:
        return []
    top = heapq.nlargest(k, range(len(per_layer)), key=per_layer.__getitem__)
    return [(names[i], per_layer[i] / total) for i in top]


@dataclass(frozen=True, slots=True)
class GroupDivergence:
    """Every rank's divergence and the group's mean and max, absolute and relative."""

    per_rank: list[float]
    relative_per_rank: list[float]

    @property
    def mean(self) -> float:
        return sum(self.per_rank) / len(self.per_rank)

    @property
    def max(self) -> float:
        return max(self.per_rank)

    @property
    def relative_mean(self) -> float:
        return sum(self.relative_per_rank) / len(self.relative_per_rank)

    @property
    def relative_max(self) -> float:
        return max(self.relative_per_rank)


def group_divergence(squared: list[float], mean_norm_squared: list[float]) -> GroupDivergence:
    """From every rank's ``||theta_i - theta_bar||^2`` and ``||theta_bar||^2`` (its own group's mean)."""
    norms = [math.sqrt(max(s, 0.0)) for s in squared]
    relative = [d / math.sqrt(m) if m > 0 else 0.0 for d, m in zip(norms, mean_norm_squared)]
    return GroupDivergence(per_rank=norms, relative_per_rank=relative)
