"""Spawned gloo ranks for the benchmarks: one intra-op thread each, meeting through a FileStore.

``spawned_ranks(target, world, args)`` runs ``target(rank, world, store_path, *args, out)`` in
``world`` spawned processes and yields ``next_result(timeout)``: the next thing rank 0 puts in
``out``, or an error as soon as a rank has died (rather than after the whole timeout). Each target
wraps its work in ``gloo_rank(rank, world, store_path)``. ``run_ranks`` is the one-result case.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, store_path: str) -> Iterator[None]:
    torch.set_num_threads(1)  # the ranks share the cores: no intra-op threads fighting over them
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def spawned_ranks(target: Callable[..., None], world: int, args: tuple) -> Iterator[Callable[[float], Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=target, args=(r, world, store, *args, out)) for r in range(world)]
        for p in procs:
            p.start()

        def next_result(timeout: float) -> Any:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    return out.get(timeout=1.0)
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:  # its traceback is on stderr already
                        raise RuntimeError(f"a rank exited with code {dead[0]}") from None
            raise RuntimeError(f"no result from the ranks within {timeout:.0f}s")

        try:
            yield next_result
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():  # a rank stuck in a collective after a failure elsewhere
                    p.kill()
                    p.join()


def run_ranks(target: Callable[..., None], world: int, args: tuple, timeout: float) -> Any:
    with spawned_ranks(target, world, args) as next_result:
        return next_result(timeout)
