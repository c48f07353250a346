"""The metric batch fast path (msgspec) against the pydantic models it stands in for: the same
fields, never a batch the models would refuse, the same values and record texts."""

from __future__ import annotations

import json

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgctl.protocol import MetricsBatch, StepRecord
from avgctl.server.records import StepFigures, _WireBatch, decode_metrics, encode, received
from avgctl.server.routes.ws import _WORKER_MESSAGE
from tests.support.frames import batch


def test_step_figures_mirror_the_step_record_fields_defaults_and_required_ones():
    fields = StepRecord.model_fields
    assert StepFigures.__struct_fields__ == tuple(fields)
    required = StepFigures.__struct_fields__[: len(fields) - len(StepFigures.__struct_defaults__)]
    assert set(required) == {name for name, f in fields.items() if f.is_required()}
    for name, default in zip(StepFigures.__struct_fields__[len(required) :], StepFigures.__struct_defaults__):
        value = default.factory() if isinstance(default, msgspec._core.Factory) else default
        assert value == fields[name].get_default(call_default_factory=True), name
    assert set(_WireBatch.__struct_fields__) == set(MetricsBatch.model_fields)


def test_a_batch_decodes_to_the_models_values_and_record_texts():
    text = batch(1, 8, seq=5)
    fast, model = decode_metrics(text), MetricsBatch.model_validate_json(text)
    assert fast is not None and (fast.seq, fast.dropped) == (5, 3)
    assert [msgspec.structs.asdict(s) for s in fast.steps] == [r.model_dump() for r in model.steps]
    assert fast.rounds == model.rounds
    enc = encode(fast)
    assert [(s, json.loads(t)) for s, t in enc.steps] == [
        (r.step, json.loads(r.model_dump_json())) for r in model.steps
    ]
    assert enc.rounds == [(r.step, r.group_size, r.model_dump_json()) for r in model.rounds]
    assert (enc.top, enc.latest.step, enc.dropped) == (8, 8, 3)
    assert encode(received(model)).steps == enc.steps  # the models' path ends in the same texts


def test_what_the_fast_path_leaves_goes_to_the_models():
    lax = '{"kind": "metrics", "steps": [{"step": "4", "time": 1}]}'  # pydantic's lax mode takes "4"
    assert decode_metrics(lax) is None and _WORKER_MESSAGE.validate_json(lax).steps[0].step == 4
    for other in ('{"kind": "hello"}', '{"kind": "ack"}', "{not json", "[]", '{"steps": []}'):
        assert decode_metrics(other) is None
    bad_round = batch(1, 4).replace('"group_size":2', '"group_size":0')
    assert decode_metrics(bad_round) is None


# Values of the wrong types, out of range, or that json.dumps would not write.
_ODD = st.one_of(
    st.integers(-3, -1),
    st.integers(min_value=2**62, max_value=2**65),
    st.floats(allow_nan=False, width=64),
    st.sampled_from(["NaN", "Infinity", "1e999"]).map(lambda s: ("raw", s)),
    st.text(max_size=3),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 5)
_VALID_STEP = st.fixed_dictionaries(
    {"step": st.integers(0, 10**6), "time": _FLOAT},
    optional={
        "step_time": _FLOAT | st.none(),
        "drift": _FLOAT | st.none(),
        "loss": _FLOAT | st.none(),
        "scalars": st.dictionaries(st.text(max_size=4), _FLOAT, max_size=3)
        | st.integers(30, 34).map(lambda n: {f"s{i}": 0.5 for i in range(n)}),
    },  # about the bound of 32
)
_FIELDS = ["step", "time", "step_time", "drift", "loss", "scalars", "kind", "extra"]


@st.composite
def _step(draw) -> dict:
    """A valid step record, or one with a field set to an odd value or left out."""
    record = draw(_VALID_STEP)
    how = draw(st.sampled_from(["keep", "keep", "odd", "drop"]))
    field = draw(st.sampled_from(_FIELDS))
    if how == "odd":
        record[field] = draw(_ODD)
    elif how == "drop":
        record.pop(field, None)
    return record


@st.composite
def _batch(draw) -> dict:
    message = {"kind": "metrics", "steps": draw(st.lists(_step(), max_size=3))}
    for field in ("dropped", "seq"):
        if draw(st.booleans()):
            message[field] = draw(st.integers(0, 10**9) | _ODD)
    how = draw(st.sampled_from(["keep", "keep", "odd", "drop"]))
    field = draw(st.sampled_from(["kind", "steps", "rounds", "extra"]))
    if how == "odd":
        message[field] = draw(_ODD | st.just("hello"))
    elif how == "drop":
        message.pop(field, None)
    return message


def _json(value) -> str:
    if isinstance(value, tuple) and value[0] == "raw":
        return value[1]  # a literal json.dumps would not write (or would write as a string)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json(v) for v in value) + "]"
    return json.dumps(value)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_batch())
def test_the_fast_path_takes_only_what_the_models_take_with_the_same_values(message):
    text = _json(message)
    fast = decode_metrics(text)
    if fast is None:
        return  # the models decide: the route asks them next
    model = _WORKER_MESSAGE.validate_json(text)  # raises if the fast path took a batch the route's models refuse
    assert isinstance(model, MetricsBatch)
    assert (fast.dropped, fast.seq) == (model.dropped, model.seq)
    assert [msgspec.structs.asdict(s) for s in fast.steps] == [r.model_dump() for r in model.steps]
    assert [json.loads(t) for _, t in encode(fast).steps] == [json.loads(r.model_dump_json()) for r in model.steps]
