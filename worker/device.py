"""Where the control plane's tensors live, and the only places they are read back on the host.

On a GPU a host read (``float(t)``, ``t.item()``, ``t.tolist()``, a blocking copy to the CPU) waits
for every kernel queued before it, so the CPU stops queueing the next step's work. torch's own
averager synchronizes only at rounds; so do we. Per-step figures are copied without blocking into
host memory and read once the copy is known to be done (``Staged``); a round's figures are read in
one copy (``read_at_sync_point``), at a step that synchronizes anyway.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class ExchangePlacement:
    """Where the control exchange's small all-reduces run."""

    device: str
    """``"cpu"``, or the parameters' device type when no CPU backend can be had."""
    side_group: bool
    """Build a gloo group over the averager's ranks for it (the averager's group has no CPU backend)."""
    why: str


def backend_devices(backend: str) -> dict[str, str]:
    """``device type -> backend`` for a process group's backend string.

    ``"cpu:gloo,cuda:nccl"`` names each device's backend; a plain name (``"nccl"``) serves the devices
    torch says it can (``Backend.backend_capability``); an unknown plugin is assumed to serve none
    but its own name, so nothing is taken for granted about the CPU.
    """
    backend = backend.lower()
    if ":" in backend:
        pairs = (item.split(":", 1) for item in backend.split(",") if item)
        return {device.strip(): name.strip() for device, name in pairs}
    capability = getattr(dist.Backend, "backend_capability", {})
    return {device: backend for device in capability.get(backend, [])}


def exchange_placement(backend: str, *, gloo_available: bool) -> ExchangePlacement:
    """Choose where the control exchange runs for a group with this backend.

    The exchange is a few dozen float64s: on the CPU it costs no device work and, above all, no
    device synchronisation when its result is read. A group that already serves the CPU (``gloo``,
    ``"cpu:gloo,cuda:nccl"``, ``mpi``) runs it there; a CUDA-only group (``nccl``) gets a gloo side
    group, built once at construction (every rank of the group builds the averager, in the same
    order); without gloo it falls back to the group's own device, and reading its result then
    synchronizes that device at each exchange.
    """
    devices = backend_devices(backend)
    if "cpu" in devices:
        return ExchangePlacement("cpu", side_group=False, why=f"the group's {devices['cpu']} backend serves the CPU")
    if gloo_available:
        return ExchangePlacement("cpu", side_group=True, why=f"{backend} has no CPU backend: a gloo side group")
    device = next(iter(devices), "cuda")
    return ExchangePlacement(device, side_group=False, why=f"{backend} serves only {device} and gloo is missing")


def control_group(process_group: dist.ProcessGroup) -> tuple[dist.ProcessGroup, torch.device]:
    """The group and device the control exchange of an averager over ``process_group`` uses."""
    placement = exchange_placement(str(dist.get_backend(process_group)), gloo_available=dist.is_gloo_available())
    if not placement.side_group:
        device = torch.device(placement.device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return process_group, device
    ranks = dist.get_process_group_ranks(process_group)
    # Only the group's members build its averager, so only they may be asked to take part.
    side = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)
    return side, torch.device("cpu")


def read_at_sync_point(values: torch.Tensor) -> list[float]:
    """``values`` (one 1-d tensor) on the host, in one copy: only at a step that synchronizes anyway."""
    return values.to("cpu", torch.float64, copy=True).tolist()


def _pinned(count: int, device: torch.device) -> torch.Tensor:
    return torch.empty(count, dtype=torch.float64, pin_memory=device.type == "cuda" and torch.cuda.is_available())


class Staged:
    """Figures on their way to the host without a synchronisation: ``ready()`` says when to read them.

    Floats are kept as they are; tensors (0-dim, on any device) are gathered into one float64 tensor
    per device and copied with ``non_blocking`` into (pinned) host memory, an event marking the copy.
    """

    __slots__ = ("_values", "_copies")

    def __init__(self, values: Sequence[float | torch.Tensor | None]):
        self._values: list = list(values)
        self._copies: list[tuple[list[int], torch.Tensor, torch.cuda.Event | None]] = []
        by_device: dict[torch.device, list[int]] = {}
        for i, value in enumerate(self._values):
            if isinstance(value, torch.Tensor):
                by_device.setdefault(value.device, []).append(i)
        for device, slots in by_device.items():
            packed = torch.stack([self._values[i].detach().reshape(()).to(torch.float64) for i in slots])
            host = _pinned(len(slots), device)
            host.copy_(packed, non_blocking=True)
            event = None
            if device.type == "cuda" and torch.cuda.is_available():
                event = torch.cuda.Event()
                event.record()
            self._copies.append((slots, host, event))

    def ready(self) -> bool:
        """Every copy has landed (never waits)."""
        return all(event is None or event.query() for _, _, event in self._copies)

    def values(self, wait: bool = False) -> list[float | None]:
        """The figures as floats; ``wait`` for copies still in flight (only at a sync point)."""
        for slots, host, event in self._copies:
            if event is not None and wait:
                event.synchronize()
            for slot, value in zip(slots, host.tolist()):
                self._values[slot] = value
        self._copies = []
        return self._values


class RoundClock:
    """A round's duration: CUDA events on a GPU (the work is asynchronous), the host clock elsewhere."""

    __slots__ = ("_start", "_end", "_host")

    def __init__(self, device: torch.device):
        self._host = time.perf_counter()
        self._start = self._end = None
        if device.type == "cuda" and torch.cuda.is_available():
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()

    def stop(self) -> None:
        """Mark the end of the round's device work (before its figures are read)."""
        if self._end is not None:
            self._end.record()

    def seconds(self) -> float:
        """The round's length; on a GPU, once its figures were read (the end event has completed)."""
        if self._start is None:
            return time.perf_counter() - self._host
        return self._start.elapsed_time(self._end) / 1000.0
