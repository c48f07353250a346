"""Process-wide settings of ``avgctl serve``, made once in the server's own process.

Never in the app factory: tests build many apps in one process, and a frozen heap is never
collected.
"""

from __future__ import annotations

import gc

# Young objects a collection waits for (CPython's default is 700). Ingest allocates tuples and
# strings by the thousand per second and frees them by reference counting; they make no cycles,
# so collecting every 700 of them only walked them for nothing.
GC_YOUNG_THRESHOLD = 20_000
GC_OLDER_THRESHOLD = 20


def tune_garbage_collector() -> None:
    """Freeze what start-up built and collect the young generation less often.

    Under an ingest flood the collector took 16% of the server's CPU, and each full collection
    walked every module, schema and route object (100-134 ms, the event loop stopped meanwhile).
    Frozen, those objects are never walked again: full collections see only what ingest keeps.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD)
