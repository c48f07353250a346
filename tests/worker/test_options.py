"""The averagers' options: defaults written once, checked at construction, passed as keywords."""

from __future__ import annotations

import dataclasses

import pytest

from avgctl.worker.options import AveragerOptions


def test_defaults_are_the_documented_ones():
    assert dataclasses.asdict(AveragerOptions()) == {
        "exact_divergence": False,
        "sample_size": 16384,
        "control_interval": 16,
        "poll_interval": 0.2,
        "drift_every": 4,
    }


@pytest.mark.parametrize(
    "bad", [{"sample_size": 0}, {"control_interval": 0}, {"poll_interval": -1.0}, {"drift_every": 0}]
)
def test_out_of_range_options_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AveragerOptions(**bad)


def test_options_are_keyword_only_and_unknown_names_fail():
    with pytest.raises(TypeError):
        AveragerOptions(True)  # type: ignore[misc]
    with pytest.raises(TypeError):
        AveragerOptions(sample_sise=10)  # type: ignore[call-arg]
