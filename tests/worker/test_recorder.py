"""The recorder's checks on user figures: what the server would refuse is refused here, and nothing is half-kept."""

import pytest

from avgctl.protocol.bounds import MAX_SCALARS, SCALAR_NAME_MAX_LENGTH
from avgctl.worker.recorder import Recorder


def _next_step(recorder: Recorder) -> dict:
    recorder.step(0, None, None)
    step = recorder.metrics.last_step
    return {"loss": step.loss, "scalars": step.scalars}


@pytest.mark.parametrize("name", ["", "x" * (SCALAR_NAME_MAX_LENGTH + 1), "bad\nname", "tab\tname", "del\x7f"])
def test_a_scalar_name_the_server_would_refuse_is_refused_and_nothing_is_kept(name):
    recorder = Recorder(rank=0, world_size=1)
    recorder.record(loss=1.0, ok=2.0)
    with pytest.raises(ValueError, match="scalar names"):
        recorder.record(loss=5.0, **{name: 3.0})
    assert _next_step(recorder) == {"loss": 1.0, "scalars": {"ok": 2.0}}


def test_too_many_scalars_are_refused_and_nothing_is_kept():
    recorder = Recorder(rank=0, world_size=1)
    recorder.record(**{f"s{i}": float(i) for i in range(MAX_SCALARS)})
    with pytest.raises(ValueError, match=f"at most {MAX_SCALARS}"):
        recorder.record(loss=9.0, extra=1.0)
    kept = _next_step(recorder)
    assert kept["loss"] is None and len(kept["scalars"]) == MAX_SCALARS


def test_names_up_to_the_bound_are_kept():
    recorder = Recorder(rank=0, world_size=1)
    recorder.record(**{"é" * SCALAR_NAME_MAX_LENGTH: 1.5})
    assert _next_step(recorder)["scalars"] == {"é" * SCALAR_NAME_MAX_LENGTH: 1.5}
