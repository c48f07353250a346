"""The command log: post a command to a job, follow what became of it."""

import unicodedata
from typing import Annotated

from fastapi import APIRouter, Body, Header, HTTPException, Path

from avgctl.protocol import Command
from avgctl.server.api import CommandOut
from avgctl.server.commands import AUTOPILOT
from avgctl.server.deps import CommandsDep, JobIdPath, StoreDep
from avgctl.server.store import InapplicableCommand, JobFinished, UnknownJob

router = APIRouter(prefix="/api/jobs/{job_id}/commands", tags=["commands"])

CommandIdPath = Annotated[int, Path(ge=1, le=2**62)]
AuthorHeader = Annotated[
    str | None,
    Header(
        alias="X-Avgctl-Author",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:@+ -]+$",
        description="Who sends the command (shown in the log); default 'api'.",
    ),
]


def is_reserved(author: str) -> bool:
    """``author`` reads as the autopilot's name: equal to it once control and format characters are
    taken out, the ends stripped of whitespace and the case folded (``"autopilot "``, ``"AutoPilot"``).
    The header's pattern admits only ASCII today; this holds whatever it comes to admit."""
    visible = "".join(ch for ch in unicodedata.normalize("NFKC", author) if unicodedata.category(ch)[0] != "C")
    return visible.strip().casefold() == AUTOPILOT


@router.post("", status_code=202, response_model=CommandOut)
async def post_command(
    job_id: JobIdPath,
    command: Annotated[Command, Body()],
    commands: CommandsDep,
    author: AuthorHeader = None,
) -> CommandOut:
    """Queue a command; it is ``pending`` until rank 0 applies (or rejects) it.

    A command that can never apply is answered at once and not logged: 404 for an unknown job,
    409 for a finished one, 422 for a ``set_hierarchy`` that does not fit the job's group sizes or a
    ``set_outer_lr`` for a job whose averager is not DiLoCo (the job's config, ``kind``)."""
    if author is not None and is_reserved(author):
        raise HTTPException(422, f"the author {author!r} is reserved: 'autopilot' names the server's own commands")
    try:
        return await commands.submit(job_id, command, author or "api")
    except UnknownJob:
        raise HTTPException(404, f"no job {job_id!r}") from None
    except JobFinished as err:
        raise HTTPException(409, str(err)) from None
    except InapplicableCommand as err:
        raise HTTPException(422, str(err)) from None


@router.get("", response_model=list[CommandOut])
def list_commands(job_id: JobIdPath, store: StoreDep) -> list[CommandOut]:
    """The job's command log, oldest first (the latest 1000)."""
    if store.get_job(job_id) is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return store.list_commands(job_id)


@router.get("/{command_id}", response_model=CommandOut)
def get_command(job_id: JobIdPath, command_id: CommandIdPath, store: StoreDep) -> CommandOut:
    """One command: ``pending``, ``applied`` (with ``applied_step``) or ``rejected`` (with ``reason``)."""
    out = store.get_command(job_id, command_id)
    if out is None:
        raise HTTPException(404, f"no command {command_id} in job {job_id!r}")
    return out
