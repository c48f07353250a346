"""The keyword options both public averagers take beyond torch's arguments, with their defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class AveragerOptions:
    """How an averager measures and how often it exchanges control, beyond torch's arguments.

    ``PeriodicAverager(period, sample_size=4096)`` and the like build one from their keyword arguments.
    """

    exact_divergence: bool = False
    """Measure divergence on every coordinate (a float64 copy of the parameters per round) instead
    of a stratified sample."""
    sample_size: int = 16384
    """Coordinates sampled for divergence (about 0.55% standard error for Gaussian-like differences);
    the per-step drift reads at most 2,048 of them."""
    control_interval: int = 16
    """At most this many steps pass without a control exchange when no averaging round happens
    (warm-up, paused averaging, long periods): the longest a command waits to apply."""
    poll_interval: float = 0.2
    """Seconds rank 0 waits for a command between exchanges while training is held: the other ranks
    wait about that long inside one collective, far below any process-group timeout."""
    drift_every: int = 4
    """Compute the drift since the last round every this many steps: a dashboard curve needs no
    more, and it keeps the per-step cost near zero."""

    def __post_init__(self) -> None:
        if self.control_interval < 1:
            raise ValueError("Arg ``control_interval`` must be a positive number of steps.")
        if self.sample_size < 1:
            raise ValueError("Arg ``sample_size`` must be positive.")
        if self.poll_interval < 0:
            raise ValueError("Arg ``poll_interval`` must be a non-negative number of seconds.")
        if self.drift_every < 1:
            raise ValueError("Arg ``drift_every`` must be a positive number of steps.")
