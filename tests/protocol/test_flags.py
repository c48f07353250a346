"""Flags built from a config dataclass: each default and help text is written once, in the dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from avgctl.protocol.flags import add_flags, from_flags


@dataclass(kw_only=True, slots=True)
class Example:
    """A config with one field of each kind the flags support."""

    steps: int = field(default=30, metadata={"help": "training steps"})
    """Steps per rank (the docstring, which the help in metadata overrides)."""
    rate: float = 0.5
    """Peak ``rate`` of
    something.

    A second paragraph stays out of the help."""
    schedule: Literal["flat", "cosine"] = "flat"
    log: Path | None = None
    quiet: bool = field(default=False, metadata={"help": "print nothing"})
    pairs: dict[int, int] | None = field(
        default=None, metadata={"parse": lambda text: dict([map(int, text.split(":"))])}
    )
    tags: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be at least 1")


FLAGGED = ("steps", "rate", "schedule", "log", "quiet", "pairs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_flags(parser, Example, FLAGGED)
    return parser


def _help_of(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    return {a.option_strings[0]: a.help for a in parser._actions if a.option_strings and a.dest != "help"}


def test_flags_carry_the_fields_defaults_and_help():
    parser = _parser()
    assert _help_of(parser) == {
        "--steps": "training steps (default 30)",
        "--rate": "Peak rate of something (default 0.5)",
        "--schedule": "default flat",
        "--log": None,
        "--quiet": "print nothing",
        "--pairs": None,
    }
    defaults = vars(parser.parse_args([]))
    assert defaults == {"steps": 30, "rate": 0.5, "schedule": "flat", "log": None, "quiet": False, "pairs": None}


def test_flags_parse_by_the_fields_types():
    args = _parser().parse_args(
        ["--steps", "7", "--rate", "2", "--schedule", "cosine", "--log", "x.log", "--quiet", "--pairs", "2:4"]
    )
    assert (args.steps, args.rate, args.schedule, args.log, args.quiet, args.pairs) == (
        7,
        2.0,
        "cosine",
        Path("x.log"),
        True,
        {2: 4},
    )


@pytest.mark.parametrize("argv", [["--steps", "x"], ["--schedule", "linear"], ["--tags", "a"]])
def test_a_value_the_field_cannot_take_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(argv)
    assert info.value.code == 2


def test_the_config_is_built_from_the_parsed_flags_and_the_fields_defaults():
    args = _parser().parse_args(["--steps", "9"])
    args.unrelated = "ignored"  # other flags of the same parser are not fields
    assert from_flags(Example, args) == Example(steps=9)
    assert from_flags(Example, args, tags=["a"]).tags == ["a"]
    with pytest.raises(ValueError, match="at least 1"):
        from_flags(Example, _parser().parse_args(["--steps", "0"]))


def test_a_field_type_without_a_parser_is_refused():
    with pytest.raises(TypeError, match="metadata"):
        add_flags(argparse.ArgumentParser(), Example, ["tags"])


def test_the_demo_commands_given_no_flags_build_the_default_configs():
    from avgctl.server.cli import build_parser
    from avgctl.server.cli.demo import DemoLaunch
    from avgctl.worker.demo import DemoConfig, parse_args

    assert parse_args([]) == (DemoConfig(), None)
    assert from_flags(DemoLaunch, build_parser().parse_args(["demo"])) == DemoLaunch()
