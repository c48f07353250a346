"""Averaging-round benchmark: raw all-reduce vs torch's averaging vs ours, on real gloo ranks.

Run: ``.venv/bin/python bench/averaging.py`` (under three minutes on 2 cores). Two spawned gloo ranks,
one intra-op thread each; for every model size (default ~1M, 10M and 40M fp32 parameters, split
into 32 tensors like 16 linear layers with biases) and every repetition, in turn:

- raw: ``dist.all_reduce`` of one flat fp32 tensor of the same size (the floor: just the wire);
- torch: ``average_parameters_or_parameter_groups`` (what ``PeriodicModelAverager(period=1)`` runs
  every step: concatenate, divide, all-reduce, re-point ``p.data``);
- ours: ``PeriodicAverager(period=1)`` with its default metrics (sampled divergence, drift, the
  control exchange), averaging in place through its persistent flat buffer;
- diloco: ``DiLoCoAverager(SGD(lr=0.7, momentum=0.9, nesterov=True), period=1)``: the same mean in
  place, then the pseudo-gradient, the outer SGD step and the new global parameters;
- ours exact: the same as ours with ``exact_divergence=True`` (a float64 copy of every coordinate per round).

The variants take turns within each repetition (the starting one rotates), so machine noise hits
all alike. A round's time is the slower rank's; the table shows the median over repetitions.

Goals (from the issues), at the largest size: ours <= 1.25x raw and ours <= 0.6x torch; a DiLoCo
round <= 1.3x raw.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from gloo_ranks import gloo_rank, run_ranks  # bench/ is first on sys.path when this runs as a script
from torch.distributed.algorithms.model_averaging.utils import average_parameters_or_parameter_groups

from avgctl.worker.averagers import PeriodicAverager
from avgctl.worker.diloco import DiLoCoAverager

LAYERS = 16
VARIANTS = ("raw", "torch", "ours", "diloco", "ours exact")
GOAL_RAW = 1.25
GOAL_DILOCO_RAW = 1.3
GOAL_TORCH = 0.6


def layer_width(total: int) -> int:
    """The width ``h`` of LAYERS ``h x h`` linear layers (with biases) holding about ``total`` parameters."""
    h = int((total / LAYERS) ** 0.5)
    while LAYERS * (h * h + h) < total:
        h += 1
    return h


def make_params(total: int, rank: int) -> list[torch.nn.Parameter]:
    """A model-like parameter list (weights and biases, each with a gradient), different per rank."""
    h = layer_width(total)
    gen = torch.Generator().manual_seed(1234 + rank)
    params = []
    for _ in range(LAYERS):
        for shape in ((h, h), (h,)):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
            p.grad = torch.zeros_like(p)
            params.append(p)
    return params


def run_rank(
    rank: int, world: int, store_path: str, sizes: list[int], reps: list[int], warmup: int, exact: bool, out
) -> None:
    with gloo_rank(rank, world, store_path):
        rows = []
        variants = VARIANTS if exact else VARIANTS[:-1]
        for total, n_reps in zip(sizes, reps):
            rows.append(_time_size(rank, total, n_reps, warmup, variants))  # one size's tensors freed before the next
        if rank == 0:
            out.put(rows)


def _time_size(rank: int, total: int, n_reps: int, warmup: int, variants: tuple[str, ...]) -> tuple:
    """Median round time of each variant at one model size (slower rank), taking turns."""
    torch_params = make_params(total, rank)
    ours_params = make_params(total, rank)
    numel = sum(p.numel() for p in ours_params)
    raw = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    exact = "ours exact" in variants
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "When period is 1, no need to use model averaging..."
        ours = PeriodicAverager(period=1)
        ours_exact = PeriodicAverager(period=1, exact_divergence=True) if exact else None
        diloco_params = make_params(total, rank)
        outer = torch.optim.SGD(diloco_params, lr=0.7, momentum=0.9, nesterov=True)
        diloco = DiLoCoAverager(outer, period=1)
    exact_params = make_params(total, rank) if exact else None
    calls = {
        "raw": lambda: dist.all_reduce(raw),
        "torch": lambda: average_parameters_or_parameter_groups(torch_params, dist.group.WORLD),
        "ours": lambda: ours.average_parameters(ours_params),
        "diloco": lambda: diloco.average_parameters(diloco_params),
        "ours exact": lambda: ours_exact.average_parameters(exact_params),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(warmup + n_reps):
        for i in range(len(variants)):
            name = variants[(rep + i) % len(variants)]
            dist.barrier()
            started = time.perf_counter()
            calls[name]()
            elapsed = time.perf_counter() - started
            if rep >= warmup:
                times[name].append(elapsed)
    assert ours.metrics.fallback_reason is None, ours.metrics.fallback_reason
    # A round lasts as long as its slower rank.
    flat = torch.tensor([t for v in variants for t in times[v]], dtype=torch.float64)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    slowest = flat.view(len(variants), n_reps).tolist()
    return numel, n_reps, {v: statistics.median(slowest[i]) * 1e3 for i, v in enumerate(variants)}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M,40M", help="parameter counts, comma-separated (default 1M,10M,40M)")
    parser.add_argument(
        "--reps", default="30,10,5", help="timed repetitions per size (default 30,10,5); one value applies to all"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per size first (default 1)")
    parser.add_argument("--world", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact-divergence row")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    reps = [int(r) for r in args.reps.split(",") if r]
    if len(reps) == 1:
        reps *= len(sizes)
    if len(reps) != len(sizes):
        parser.error("--reps needs one value, or one per size")

    print(
        f"machine: {os.cpu_count()} cores; torch {torch.__version__}; {args.world} gloo ranks, 1 thread each",
        flush=True,
    )
    started = time.perf_counter()
    rows = run_ranks(run_rank, args.world, (sizes, reps, args.warmup, not args.no_exact), timeout=900)
    wall = time.perf_counter() - started

    variants = VARIANTS if not args.no_exact else VARIANTS[:-1]
    header = (
        f"{'params':>11} {'reps':>4} "
        + " ".join(f"{v + ' ms':>13}" for v in variants)
        + f" {'ours/raw':>9} {'ours/torch':>10} {'diloco/raw':>10}"
    )
    if not args.no_exact:
        header += f" {'exact/raw':>9}"
    print(header)
    for numel, n_reps, ms in rows:
        line = f"{numel:>11,} {n_reps:>4} " + " ".join(f"{ms[v]:>13.2f}" for v in variants)
        line += f" {ms['ours'] / ms['raw']:>8.2f}x {ms['ours'] / ms['torch']:>9.2f}x {ms['diloco'] / ms['raw']:>9.2f}x"
        if not args.no_exact:
            line += f" {ms['ours exact'] / ms['raw']:>8.2f}x"
        print(line)
    numel, _, ms = rows[-1]
    vs_raw, vs_torch = ms["ours"] / ms["raw"], ms["ours"] / ms["torch"]
    print(
        f"goal at {numel:,} params: ours/raw {vs_raw:.2f}x <= {GOAL_RAW}x: {'met' if vs_raw <= GOAL_RAW else 'MISSED'}; "
        f"ours/torch {vs_torch:.2f}x <= {GOAL_TORCH}x: {'met' if vs_torch <= GOAL_TORCH else 'MISSED'}; "
        f"diloco/raw {ms['diloco'] / ms['raw']:.2f}x <= {GOAL_DILOCO_RAW}x: "
        f"{'met' if ms['diloco'] / ms['raw'] <= GOAL_DILOCO_RAW else 'MISSED'}"
    )
    print(f"(median ms per round, slower rank; {wall:.0f} s in all)")


if __name__ == "__main__":
    main()
