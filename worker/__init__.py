"""The training side of avgctl: drop-in averagers, divergence metrics, live control.

from avgctl.worker import PeriodicAverager, HierarchicalAverager, DiLoCoAverager, connect
"""

from avgctl.worker.averagers import HierarchicalAverager, PeriodicAverager
from avgctl.worker.base import LiveAverager
from avgctl.worker.control import ControlSource, InProcessControlSource
from avgctl.worker.control_state import CommandRejected, ControlState
from avgctl.worker.diloco import DiLoCoAverager
from avgctl.worker.options import AveragerOptions
from avgctl.worker.recorder import AveragerMetrics, MetricsListener


def connect(averager, server=None, job_id=None, token=None, **options):
    """Stream this rank's metrics to an avgctl server and (on rank 0) take its commands.

    See ``avgctl.worker.link.connect``; imported lazily so plain training never loads the client.
    """
    from avgctl.worker.link import connect as _connect

    return _connect(averager, server=server, job_id=job_id, token=token, **options)


__all__ = [
    "AveragerMetrics",
    "AveragerOptions",
    "CommandRejected",
    "ControlSource",
    "ControlState",
    "DiLoCoAverager",
    "HierarchicalAverager",
    "InProcessControlSource",
    "LiveAverager",
    "MetricsListener",
    "PeriodicAverager",
    "connect",
]
