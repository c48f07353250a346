"""Commands: the REST body of ``POST /api/jobs/{job_id}/commands``.

``WorkerCommand`` is what rank 0 receives and carries out; ``Command`` adds ``set_autotune``, which
the server's autopilot carries out and no worker ever sees.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from avgctl.protocol.bounds import MAX_HIERARCHY_LEVELS, Period


class Message(BaseModel):
    """Every protocol message refuses unknown fields, and writes a non-finite float as the JSON
    string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``: a diverged run's figures are data, sent,
    stored and shown as they are (``null`` would be refused where a figure is required, and a bare
    ``NaN`` token is not JSON). Float fields read those strings back (pydantic's lax mode)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class SetPeriod(Message):
    """Average every ``period`` steps from the step the command is applied at."""

    type: Literal["set_period"] = "set_period"
    period: Period


class PauseAveraging(Message):
    """Stop averaging rounds; training goes on locally."""

    type: Literal["pause_averaging"] = "pause_averaging"


class ResumeAveraging(Message):
    """Start averaging again; the period grid restarts at the applied step."""

    type: Literal["resume_averaging"] = "resume_averaging"


class PauseTraining(Message):
    """Hold every rank at the end of the applied step until resumed."""

    type: Literal["pause_training"] = "pause_training"


class ResumeTraining(Message):
    """Release ranks held by ``pause_training``."""

    type: Literal["resume_training"] = "resume_training"


class AverageNow(Message):
    """One averaging round over the whole process group at the applied step."""

    type: Literal["average_now"] = "average_now"


class SetHierarchy(Message):
    """New periods for a hierarchical averager: ``{group_size: period}``.

    Group sizes are fixed when the averager is built; only their periods change. Keys are JSON
    strings (``{"2": 2, "8": 4}``: groups of 2 ranks average every 2 steps, groups of 8 every 4).
    set_hierarchy takes {group_size: period}, while torch's HierarchicalModelAverager takes
    {period: group_size}. The body must name exactly the averager's group sizes, with periods that
    grow with the size (``avgctl.protocol.hierarchy``); the server answers 422 otherwise.
    """

    type: Literal["set_hierarchy"] = "set_hierarchy"
    periods: dict[str, Period] = Field(
        min_length=1,
        max_length=MAX_HIERARCHY_LEVELS,
        description="{group_size: period} for every group size of the job's averager (torch's"
        " HierarchicalModelAverager takes the inverse, {period: group_size}).",
    )

    @field_validator("periods")
    @classmethod
    def _keys_are_group_sizes(cls, periods: dict[str, int]) -> dict[str, int]:
        for key in periods:
            if not key.isdigit() or int(key) < 1:
                raise ValueError(f"group size {key!r} is not a positive integer")
        return periods


class SetOuterLr(Message):
    """A new learning rate for every param group of a DiLoCo job's outer optimizer, from the applied
    step on, on every rank; finite and above 0 (else 422). Other averagers reject it."""

    type: Literal["set_outer_lr"] = "set_outer_lr"
    lr: float = Field(gt=0, le=1e6, allow_inf_nan=False)


NOT_DILOCO = "set_outer_lr needs a DiLoCo averager (this job averages without an outer optimizer)"
"""Why ``set_outer_lr`` is refused for a job without an outer optimizer (rank 0 and the server alike)."""


class SetAutotune(Message):
    """Switch the server's autopilot; ``target_divergence`` None means calibrate it (else a finite
    number in (0, 1e6]: NaN, ``Infinity`` and ``1e999`` are refused with a 422)."""

    type: Literal["set_autotune"] = "set_autotune"
    enabled: bool
    target_divergence: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False)


_WORKER_COMMANDS = (
    SetPeriod,
    PauseAveraging,
    ResumeAveraging,
    PauseTraining,
    ResumeTraining,
    AverageNow,
    SetHierarchy,
    SetOuterLr,
)

WorkerCommand = Annotated[Union[_WORKER_COMMANDS], Field(discriminator="type")]  # noqa: UP007 (a tuple of members)
"""A command rank 0 carries out."""

Command = Annotated[Union[(*_WORKER_COMMANDS, SetAutotune)], Field(discriminator="type")]  # noqa: UP007
"""Any command a person, the CLI or the autopilot may post."""

WORKER_COMMAND_TYPES = frozenset(cls.model_fields["type"].default for cls in _WORKER_COMMANDS)
