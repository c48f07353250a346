"""The job's secret: what proves to the server that a process is one of the job's own ranks.

The worker token is shared by every worker of every job, so it says "a worker", not "a worker of
this job". The ranks of a job agree on a random secret through the job's own torch.distributed
store, which only the job's processes reach, and every hello carries it (``Hello.job_secret``).

Under torchrun the store is the agent's TCPStore, found below the PrefixStores that
``init_process_group`` and per-attempt namespacing put on top of it. The agent keeps it for the
whole run, across ``--max-restarts`` restarts, so the ranks of a restarted attempt agree on the
secret of the first one; a job resumed in a new torchrun brings it in its checkpoint
(``averager.state_dict()``).
"""

from __future__ import annotations

import secrets

_KEY = "avgctl/job_secret/{job_id}"


def new_secret() -> str:
    """A fresh random secret (32 hex digits)."""
    return secrets.token_hex(16)


def root_store(store):
    """The store below every ``PrefixStore`` wrapping ``store``."""
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    return store


def agree(job_id: str, candidate: str | None = None) -> str:
    """The secret every rank of the job holds; call on every rank (no collective: it never waits
    for the other ranks).

    ``candidate`` (the averager's secret from a checkpoint, else a fresh one) is proposed with
    ``compare_set(key, "", candidate)`` on the job's root store: the first rank to propose wins,
    and every rank gets the stored value back, also after a restart of the attempt. Without an
    initialised default process group (one process, a notebook), the candidate is the secret.
    """
    candidate = candidate or new_secret()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return candidate
    return agree_in(dist.distributed_c10d._get_default_store(), job_id, candidate)


def agree_in(store, job_id: str, candidate: str) -> str:
    """``agree`` on ``store`` (any ``torch.distributed.Store``): the first ``candidate`` proposed for
    ``job_id`` on its root store, whatever prefixes each caller's ``store`` has."""
    # compare_set on a missing key with an empty expected value sets it (TCPStore, FileStore and
    # HashStore alike, torch 2.13), and returns the value the key holds afterwards.
    agreed = root_store(store).compare_set(_KEY.format(job_id=job_id), "", candidate)
    return agreed.decode() if isinstance(agreed, bytes) else str(agreed)
