"""Run a function on N real gloo ranks (spawned processes) and collect what each returns."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any


def _entry(fn, rank, world_size, store_path, timeout_s, args, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 cores, up to 4 ranks
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 60.0,
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; returns results by rank, raises on any failure.

    A rank that neither returns nor fails within ``timeout`` seconds fails the call (no hang).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, store_path, pg_timeout, args, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(got) < world_size:
                try:
                    rank, ok, value = results.get(timeout=0.5)
                    got[rank] = (ok, value)
                    continue
                except queue.Empty:
                    pass
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                if dead and results.empty():
                    raise RuntimeError(
                        f"ranks {dead} exited without a result (exit codes {[procs[r].exitcode for r in dead]})"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(got))} hung for {timeout}s")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    failures = {r: v for r, (ok, v) in got.items() if not ok}
    if failures:
        raise RuntimeError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failures.items())))
    return [got[r][1] for r in range(world_size)]
