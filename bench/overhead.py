"""Training-overhead benchmark: demo-task steps/s with our averager vs torch's, on real gloo ranks.

Run: ``.venv/bin/python bench/overhead.py [--task gauss|lm]`` (well under two minutes on 2 cores).
Two spawned gloo ranks, one intra-op thread each, train a demo task (``avgctl.worker.demo``; gauss:
the small MLP on the non-IID Gaussian mixture, SGD with momentum; lm: the byte-level GPT on the
stdlib's source, AdamW, at the demo's shape) twice side by side, each with its own model:

- torch: ``PeriodicModelAverager(period)``;
- ours: ``PeriodicAverager(period)`` with default metrics (sampled divergence and its per-layer
  breakdown every round, drift every 4th step, the loss recorded every step, kept in
  ``averager.metrics``; no listener is attached) and its control exchange live: an
  ``InProcessControlSource`` is attached on rank 0 (no commands arrive, but it is polled at every
  exchange). With two ranks the exchange rides in the averaging buffer's tail and the all-reduce is
  one point-to-point exchange (``avgctl.worker.pair``).

Blocks of ``--steps`` steps alternate between the two (the first one alternates too), so machine
noise hits both alike; a block lasts as long as its slower rank; the figures are medians over blocks.

Goal (from the issue): ours/torch steps/s >= 1.0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from gloo_ranks import gloo_rank, run_ranks  # bench/ is first on sys.path when this runs as a script
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from avgctl.worker.averagers import PeriodicAverager
from avgctl.worker.control import InProcessControlSource
from avgctl.worker.demo import DemoConfig, make_task

VARIANTS = ("torch", "ours")
GOAL = 1.0
SEED = 0
SKEW = 0.9
# Steps per block and blocks per averager when not given: a GPT step takes ~150x an MLP step.
BLOCKS = {"gauss": (300, 25), "lm": (10, 10)}


class Trainer:
    """One model, optimizer, data stream and averager: the demo's training loop, minus printing."""

    def __init__(self, averager, task, rank: int, ours: bool):
        self.task = task
        self.model = task.model()
        self.opt = task.optimizer(self.model, DemoConfig(task=task.name).lr)
        self.averager = averager
        self.ours = ours
        self.gen = torch.Generator().manual_seed(SEED * 1000 + rank)
        if ours:
            averager.name_parameters(self.model)

    def run(self, steps: int) -> None:
        model, opt, averager = self.model, self.opt, self.averager
        for _ in range(steps):
            x, y = self.task.batch(self.gen)
            opt.zero_grad()
            loss = self.task.loss(model, x, y)
            loss.backward()
            opt.step()
            loss_value = loss.item()
            if self.ours:
                averager.record(loss=loss_value)
            averager.average_parameters(model.parameters())


def run_rank(
    rank: int, world: int, store_path: str, task_name: str, period: int, steps: int, blocks: int, warmup: int, out
) -> None:
    with gloo_rank(rank, world, store_path):
        task = make_task(DemoConfig(task=task_name, seed=SEED, skew=SKEW), rank, world)
        ours = PeriodicAverager(period)
        if rank == 0:
            ours.set_control_source(InProcessControlSource())
        trainers = {
            "torch": Trainer(PeriodicModelAverager(period=period), task, rank, ours=False),
            "ours": Trainer(ours, task, rank, ours=True),
        }
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for block in range(warmup + blocks):
            for i in range(len(VARIANTS)):
                name = VARIANTS[(block + i) % len(VARIANTS)]
                dist.barrier()
                started = time.perf_counter()
                trainers[name].run(steps)
                elapsed = time.perf_counter() - started
                if block >= warmup:
                    times[name].append(elapsed)
        flat = torch.tensor([t for v in VARIANTS for t in times[v]], dtype=torch.float64)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)  # a block lasts as long as its slower rank
        slowest = flat.view(len(VARIANTS), blocks).tolist()
        if rank == 0:
            out.put(
                {
                    "steps_per_s": {v: steps / statistics.median(slowest[i]) for i, v in enumerate(VARIANTS)},
                    "rounds": ours.metrics.rounds,
                    "avg_ms": 1e3 * ours.metrics.averaging_seconds / max(ours.metrics.rounds, 1),
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period", type=int, default=8, help="averaging period for both averagers (default 8)")
    parser.add_argument("--task", choices=("gauss", "lm"), default="gauss", help="the demo task (default gauss)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per block (default 300; lm 10)")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks per averager (default 25; lm 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks per averager first (default 2)")
    parser.add_argument("--world", type=int, default=2, help="gloo ranks (default 2)")
    args = parser.parse_args()
    args.steps = args.steps or BLOCKS[args.task][0]
    args.blocks = args.blocks or BLOCKS[args.task][1]

    print(
        f"machine: {os.cpu_count()} cores; torch {torch.__version__}; {args.world} gloo ranks, 1 thread each",
        flush=True,
    )
    started = time.perf_counter()
    result = run_ranks(
        run_rank, args.world, (args.task, args.period, args.steps, args.blocks, args.warmup), timeout=600
    )
    wall = time.perf_counter() - started

    rate = result["steps_per_s"]
    ratio = rate["ours"] / rate["torch"]
    print(
        f"demo task {args.task}, period {args.period}, {args.blocks} blocks x {args.steps} steps per averager (median block, slower rank)"
    )
    print(f"{'averager':<42} {'steps/s':>9}")
    digits = 0 if rate["torch"] >= 100 else 2
    print(f"{'torch PeriodicModelAverager':<42} {rate['torch']:>9.{digits}f}")
    print(f"{'ours PeriodicAverager (+control, metrics)':<42} {rate['ours']:>9.{digits}f}")
    print(f"ours/torch {ratio:.3f} >= {GOAL}: {'met' if ratio >= GOAL else 'MISSED'}")
    print(f"(ours: {result['rounds']} rounds, {result['avg_ms']:.2f} ms per round incl. metrics; {wall:.0f} s in all)")


if __name__ == "__main__":
    main()
