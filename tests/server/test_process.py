"""The serve process's garbage-collector settings, checked in a fresh interpreter (freezing this
one's heap would keep the rest of the suite's garbage alive)."""

from __future__ import annotations

import json
import subprocess
import sys

from avgctl.server.process import GC_OLDER_THRESHOLD, GC_YOUNG_THRESHOLD

_PROBE = """
import gc, json
import avgctl.server.app  # what serve has built by then: FastAPI, pydantic, the schemas
from avgctl.server.process import tune_garbage_collector
before = gc.get_freeze_count()
tune_garbage_collector()
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}))
"""


def test_tuning_freezes_what_start_up_built_and_collects_the_young_less_often():
    out = json.loads(subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout)
    assert out["before"] == 0 and out["frozen"] > 10_000  # the imported modules' objects, at least
    assert out["threshold"] == [GC_YOUNG_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD]
