"""Limits both sides check: ids, integers SQLite can store, record counts, periods."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# A job id is a torchrun run id or a name a person chose: keep it printable and short.
# At least one letter, digit or underscore: ids of dots only ("..") would be rewritten by browsers.
JOB_ID_PATTERN = r"^[A-Za-z0-9_.:@+-]*[A-Za-z0-9_][A-Za-z0-9_.:@+-]*$"
JOB_ID_MAX_LENGTH = 128
MAX_BATCH_RECORDS = 10_000  # records of one kind in one metric batch
MAX_SCALARS = 32  # user figures per step record
# A user figure's name: 1-64 characters, none of them a control character (C0, DEL or C1), so a
# step record stays under about 3 KB whatever its scalars (a 900 KB name was once accepted).
SCALAR_NAME_MAX_LENGTH = 64
SCALAR_NAME_CHARS = r"[^\x00-\x1f\x7f-\x9f]"
MAX_PERIOD = 1_000_000  # steps; also served to the dashboard (GET /api/limits)
MAX_RANKS = 1_000_000
MAX_HIERARCHY_LEVELS = 16
MAX_TOP_LAYERS = 64  # a round carries every layer's share up to this many layers, else its top TOP_LAYERS
TOP_LAYERS = 16
SQLITE_INT_MAX = 2**63 - 1  # SQLite's INTEGER: a worker's larger int could not be stored
# A job's secret (``Hello.job_secret``): the workers send 32 hex digits; short ones are guessable.
JOB_SECRET_MIN_LENGTH = 16
JOB_SECRET_MAX_LENGTH = 128

# A step, pid, batch number or version from a worker: checked on arrival, so it cannot fail the
# SQLite writer later (and take the other batches of its transaction with it).
StorableInt = Annotated[int, Field(ge=0, le=SQLITE_INT_MAX)]
JobId = Annotated[str, Field(min_length=1, max_length=JOB_ID_MAX_LENGTH, pattern=JOB_ID_PATTERN)]
Period = Annotated[int, Field(ge=1, le=MAX_PERIOD)]
# ``$`` is the end of the text for pydantic's (Rust) regex; Python's ``re`` (msgspec's mirror in
# server/records.py) needs ``\Z`` for the same, since its ``$`` also matches before a final newline.
ScalarName = Annotated[str, Field(min_length=1, max_length=SCALAR_NAME_MAX_LENGTH, pattern=f"^{SCALAR_NAME_CHARS}+$")]
