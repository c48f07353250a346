"""Spawned gloo ranks for the benchmarks: one intra-op thread each, meeting through a FileStore.

``run_ranks(target, world, args, timeout)`` runs ``target(rank, world, store_path, *args, out)`` in
``world`` spawned processes and returns what rank 0 puts in ``out``; each target wraps its work in
``gloo_rank(rank, world, store_path)``.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, store_path: str) -> Iterator[None]:
    torch.set_num_threads(1)  # two ranks on two cores: no intra-op threads fighting over them
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(target: Callable[..., None], world: int, args: tuple, timeout: float) -> Any:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=target, args=(r, world, store, *args, out)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            return out.get(timeout=timeout)
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():  # a rank stuck after a failure elsewhere
                    p.kill()
                    p.join()
