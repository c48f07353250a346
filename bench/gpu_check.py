"""The device check: avgctl's averagers on a CUDA GPU, as one command.

Run on a machine with a GPU: ``.venv/bin/python bench/gpu_check.py`` (a few minutes on one GPU).
Four parts, each in its own spawned processes, each printing one line and a verdict:

1. **commands, NCCL**: a world-1 ``nccl`` group, parameters on the GPU, ``set_period``, ``pause`` and
   ``resume`` submitted live (``InProcessControlSource``) and applied; ``torch.cuda.set_sync_debug_mode
   ("warn")`` around every ``record`` + ``average_parameters`` call counts the host syncs on steps that
   are not rounds. Goal: 0.
2. **commands, cpu:gloo,cuda:nccl**: the same with both backends in one group.
3. **parity, gloo on CUDA**: two gloo ranks with CUDA parameters (one fp32 model, one with bf16
   layers), bit for bit against torch's ``PeriodicModelAverager``. Goal: identical after every step.
4. **step time**: a world-1 NCCL job, a ~50M-parameter MLP, period 8; ours and torch's averager in
   interleaved blocks timed with CUDA events. Goal: ours/torch <= 1.02.

``--cpu`` runs the same parts with gloo on the CPU (no sync counting, a small model): a smoke run of
the script itself on a machine without a GPU. Exit code 0 when every goal holds, 1 otherwise, 2 when
no GPU is present without ``--cpu``.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from avgctl.protocol import PauseAveraging, ResumeAveraging, SetPeriod
from avgctl.worker import InProcessControlSource, PeriodicAverager
from avgctl.worker.device import RoundClock

STEP_GOAL = 1.02


def _init(backend: str, rank: int, world: int, store: str) -> None:
    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )


def _mlp(width: int, depth: int, device: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).to(device, dtype)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    opt.zero_grad(set_to_none=False)
    loss = model(x).float().square().mean()
    loss.backward()
    opt.step()
    return loss.detach()


def _commands(rank: int, world: int, store: str, backend: str, cpu: bool, out) -> None:
    """Part 1/2: live commands on a world-1 group; host syncs on non-round steps."""
    _init(backend, rank, world, store)
    device = "cpu" if cpu else "cuda"
    model = _mlp(256, 3, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    averager = PeriodicAverager(period=4)
    source = InProcessControlSource()
    averager.set_control_source(source)
    plan = {10: SetPeriod(period=6), 30: PauseAveraging(), 50: ResumeAveraging()}
    submitted, syncs, rounds_at = {}, {}, []
    x = torch.randn(64, 256, device=device)
    for step in range(80):
        if step in plan:
            submitted[source.submit(plan[step])] = step
        loss = _train_step(model, opt, x)
        rounds = averager.metrics.rounds
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not cpu:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                averager.record(loss=loss)
                averager.average_parameters(model.parameters())
            finally:
                if not cpu:
                    torch.cuda.set_sync_debug_mode(0)
        if averager.metrics.rounds > rounds:
            rounds_at.append(step)
        else:
            found = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
            if found:
                syncs[step] = found
    averager.flush()
    acks = [source.result(cid, timeout=10) for cid in submitted]
    out.put(
        {
            "applied": [a.status == "applied" for a in acks],
            "syncs": syncs,
            "rounds": len(rounds_at),
            "period": averager.control.period,
            "paused_rounds": [s for s in rounds_at if 30 < s < 50],
        }
    )
    dist.destroy_process_group()


def _parity(rank: int, world: int, store: str, backend: str, cpu: bool, out) -> None:
    """Part 3: two gloo ranks with CUDA tensors, bit for bit against torch."""
    _init("gloo", rank, world, store)
    device = "cpu" if cpu else "cuda"
    result = {}
    for name, low in (("fp32", torch.float32), ("bf16 layers", torch.bfloat16)):
        ref, mine = _mlp(128, 3, device), _mlp(128, 3, device)
        for model in (ref, mine):
            model[2].to(low)
        ref_opt, my_opt = torch.optim.SGD(ref.parameters(), lr=0.01), torch.optim.SGD(mine.parameters(), lr=0.01)
        ref_avg, my_avg = PeriodicModelAverager(period=3), PeriodicAverager(period=3)
        equal = True
        for step in range(24):
            gen = torch.Generator(device=device).manual_seed(100 * rank + step)
            x = torch.randn(32, 128, device=device, generator=gen)
            for model, opt, avg in ((ref, ref_opt, ref_avg), (mine, my_opt, my_avg)):
                opt.zero_grad()
                h = model[1](model[0](x)).to(low)
                model[4](model[3](model[2](h).float())).square().mean().backward()
                opt.step()
                avg.average_parameters(model.parameters())
            equal = equal and all(torch.equal(a, b) for a, b in zip(ref.parameters(), mine.parameters()))
        result[name] = (equal, my_avg.metrics.fallback_reason)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def _step_time(rank: int, world: int, store: str, backend: str, cpu: bool, out) -> None:
    """Part 4: ours/torch step time, ~50M parameters, period 8, interleaved blocks."""
    _init(backend, rank, world, store)
    device = "cpu" if cpu else "cuda"
    width, depth, blocks, steps = (256, 2, 4, 16) if cpu else (4096, 3, 9, 48)
    runs = {}
    for name, make in (
        ("torch", lambda: PeriodicModelAverager(period=8)),
        ("ours", lambda: PeriodicAverager(period=8)),
    ):
        model = _mlp(width, depth, device)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-4), make())
    x = torch.randn(256, width, device=device)
    times = {name: [] for name in runs}
    for block in range(blocks):
        order = list(runs) if block % 2 == 0 else list(reversed(runs))
        for name in order:
            model, opt, averager = runs[name]
            if not cpu:
                torch.cuda.synchronize()  # the block starts with nothing queued
            clock = RoundClock(torch.device(device))  # CUDA events on a GPU, the host clock here
            for _ in range(steps):
                loss = _train_step(model, opt, x)
                if isinstance(averager, PeriodicAverager):
                    averager.record(loss=loss)
                averager.average_parameters(model.parameters())
            clock.stop()
            if not cpu:
                torch.cuda.synchronize()
            times[name].append(clock.seconds() * 1e3 / steps)
    params = sum(p.numel() for p in runs["ours"][0].parameters())
    out.put({"params": params, "ms": {name: statistics.median(v[1:]) for name, v in times.items()}})
    dist.destroy_process_group()


def _spawn(target, world: int, backend: str, cpu: bool, timeout: float = 300):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=target, args=(r, world, store, backend, cpu, out)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            return out.get(timeout=timeout)
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU with gloo (no GPU needed)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --cpu for a smoke run)", file=sys.stderr)
        return 2
    device = "cpu (smoke run)" if args.cpu else torch.cuda.get_device_name()
    print(f"avgctl gpu_check on {device}; torch {torch.__version__}")
    ok = True
    backends = ["gloo"] if args.cpu else ["nccl", "cpu:gloo,cuda:nccl"]
    for part, backend in enumerate(backends, start=1):
        got = _spawn(_commands, 1, backend, args.cpu)
        good = all(got["applied"]) and not got["syncs"] and got["period"] == 6 and not got["paused_rounds"]
        ok &= good
        syncs = "n/a on the CPU" if args.cpu else sum(len(v) for v in got["syncs"].values())
        print(
            f"{part}. commands on {backend}: applied {sum(got['applied'])}/{len(got['applied'])}, "
            f"{got['rounds']} rounds, none while paused: {not got['paused_rounds']}; "
            f"host syncs on non-round steps: {syncs} (goal 0) -> {'ok' if good else 'FAIL'}"
        )
        if got["syncs"]:
            print(f"   first: step {min(got['syncs'])}: {got['syncs'][min(got['syncs'])][0]}")
    parity = _spawn(_parity, 2, "gloo", args.cpu)
    good = all(equal and reason is None for equal, reason in parity.values())
    ok &= good
    detail = ", ".join(
        f"{name}: {'identical' if eq else 'DIFFERENT'} (fast path: {r is None})" for name, (eq, r) in parity.items()
    )
    print(
        f"3. parity, 2 gloo ranks on {'CPU' if args.cpu else 'CUDA'} tensors vs torch: {detail} -> {'ok' if good else 'FAIL'}"
    )
    timing = _spawn(_step_time, 1, "gloo" if args.cpu else "nccl", args.cpu, timeout=600)
    ratio = timing["ms"]["ours"] / timing["ms"]["torch"]
    good = ratio <= STEP_GOAL or args.cpu
    ok &= good
    print(
        f"4. step time, {timing['params'] / 1e6:.1f}M parameters, period 8: torch {timing['ms']['torch']:.2f} ms, "
        f"ours {timing['ms']['ours']:.2f} ms, ours/torch {ratio:.3f} (goal <= {STEP_GOAL}) -> {'ok' if good else 'FAIL'}"
    )
    print("all goals met" if ok else "some goals missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
