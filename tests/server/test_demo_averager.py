"""``avgctl demo --averager``: forwarded to the demo workers as they parse it, and only when given,
so the workers' own default stands otherwise (written once, in ``avgctl.worker.demo``). ``--task``
is always forwarded: the launcher's default (``lm``) is not the workers' (the fast ``gauss``)."""

from __future__ import annotations

import dataclasses

import pytest

from avgctl.protocol.flags import from_flags
from avgctl.server.cli import build_parser
from avgctl.server.cli.demo import DemoLaunch, worker_args
from avgctl.worker import demo as worker_demo


def _launch(*argv: str) -> DemoLaunch:
    return from_flags(DemoLaunch, build_parser().parse_args(["demo", *argv]))


@pytest.mark.parametrize("kind", ["periodic", "hierarchical", "diloco"])
def test_the_averager_named_is_the_one_the_workers_build(kind):
    cfg, _ = worker_demo.parse_args(worker_args(_launch("--averager", kind, "--period", "6"), "http://s", "j"))
    assert (cfg.averager, cfg.period, cfg.server, cfg.job_id) == (kind, 6, "http://s", "j")


def test_without_the_flag_the_workers_default_stands():
    args = worker_args(_launch(), "http://s", "j")
    assert "--averager" not in args
    default = next(f.default for f in dataclasses.fields(worker_demo.DemoConfig) if f.name == "averager")
    assert worker_demo.parse_args(args)[0].averager == default


def test_an_unknown_averager_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["demo", "--averager", "ddp"])
    assert exited.value.code == 2
    assert "argument --averager: invalid choice: 'ddp'" in capsys.readouterr().err


def test_the_demo_trains_the_language_model_unless_told_gauss():
    cfg, _ = worker_demo.parse_args(worker_args(_launch(), "http://s", "j"))
    assert cfg.task == "lm"
    cfg, _ = worker_demo.parse_args(worker_args(_launch("--task", "gauss"), "http://s", "j"))
    assert cfg.task == "gauss"


def test_the_launchers_tasks_are_the_workers():
    # `avgctl demo` must not import torch to read them, so they are written twice: held equal here.
    from typing import get_args

    from avgctl.server.cli.demo import TaskKind

    assert get_args(TaskKind) == worker_demo.TASK_KINDS
