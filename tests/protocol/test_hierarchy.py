"""The one ``set_hierarchy`` rule (``avgctl.protocol.hierarchy``): what it takes and refuses, and that
rank 0's ``apply_command`` rejects exactly what it refuses, with the same reason."""

from __future__ import annotations

import pytest

from avgctl.protocol import SetHierarchy
from avgctl.protocol.hierarchy import ORIENTATION, InvalidHierarchy, hierarchy_periods
from avgctl.worker import control_state as cs

SIZES = (2, 8)

REFUSED = [
    # A torch-style {period: group_size} body, or a guess at the levels: size 4 is no level, 8 is missing.
    ({"2": 16, "4": 4}, "exactly the group sizes [2, 8], got [2, 4]"),
    ({"2": 4}, "exactly the group sizes [2, 8], got [2]"),
    ({"2": 4, "8": 16, "16": 32}, "exactly the group sizes [2, 8], got [2, 8, 16]"),
    ({"2": 16, "8": 4}, "grow with the group size, got [16, 4]"),
    ({"2": 4, "8": 4}, "grow with the group size, got [4, 4]"),
    ({"2": 4, "02": 5, "8": 16}, "group size 2 is given twice"),
]


@pytest.mark.parametrize(("periods", "expected"), [({"2": 4, "8": 16}, (4, 16)), ({"8": 3, "2": 1}, (1, 3))])
def test_a_body_naming_every_level_once_with_growing_periods_gives_the_periods_in_level_order(periods, expected):
    assert hierarchy_periods(SIZES, periods) == expected


@pytest.mark.parametrize(("periods", "reason"), REFUSED)
def test_a_body_that_does_not_fit_the_levels_is_refused_saying_the_orientation(periods, reason):
    with pytest.raises(InvalidHierarchy) as info:
        hierarchy_periods(SIZES, periods)
    assert reason in str(info.value) and ORIENTATION in str(info.value)
    assert "{group_size: period}" in ORIENTATION and "{period: group_size}" in ORIENTATION


def test_a_periodic_averager_takes_no_hierarchy():
    with pytest.raises(InvalidHierarchy, match="needs a hierarchical averager; use set_period"):
        hierarchy_periods(None, {"2": 4})


@pytest.mark.parametrize("periods", [{"0": 4, "8": 16}, {"²": 4, "8": 16}, {"2": 0, "8": 16}, {"2": True, "8": 16}])
def test_group_sizes_and_periods_must_be_positive_integers(periods):
    with pytest.raises(InvalidHierarchy, match="positive integer"):
        hierarchy_periods(SIZES, periods)


@pytest.mark.parametrize(("periods", "reason"), REFUSED)
def test_rank_0_rejects_exactly_what_the_rule_refuses_with_its_reason(periods, reason):
    state = cs.hierarchical_state((2, 4), SIZES, 0)
    command = SetHierarchy(periods=periods)
    with pytest.raises(InvalidHierarchy) as refused:
        hierarchy_periods(SIZES, command.periods)
    with pytest.raises(cs.CommandRejected) as rejected:
        cs.apply_command(state, command, 10)
    assert str(rejected.value) == str(refused.value)
    applied = cs.apply_command(state, SetHierarchy(periods={"2": 4, "8": 16}), 10)
    assert applied.periods == (4, 16) and applied.anchor == 10


def test_a_size_written_with_a_leading_zero_is_that_size_and_rank_0_applies_it():
    # It once passed the size check and then failed the lookup: a KeyError out of rank 0's exchange.
    state = cs.hierarchical_state((2, 4), SIZES, 0)
    assert cs.apply_command(state, SetHierarchy(periods={"02": 4, "8": 16}), 10).periods == (4, 16)


def test_the_model_and_the_averager_docstring_say_the_orientation():
    from avgctl.worker.averagers import HierarchicalAverager

    assert ORIENTATION in " ".join(SetHierarchy.__doc__.split())
    assert ORIENTATION in " ".join(HierarchicalAverager.__doc__.split())
    assert "{period: group_size}" in SetHierarchy.model_fields["periods"].description
