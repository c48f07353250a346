"""The metric batch fast path (msgspec) against the pydantic models it stands in for: the same
fields, never a batch the models would refuse, the same values and record texts."""

from __future__ import annotations

import json
import math

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from avgctl.protocol import MetricsBatch, StepRecord
from avgctl.server.records import StepFigures, _WireBatch, decode_metrics, encode, received
from avgctl.server.routes.ws import _WORKER_MESSAGE
from tests.support.frames import batch
from tests.support.strict import NON_FINITE, strict_json


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
# Non-finite figures: as the protocol spells them (JSON strings) and as bare tokens (json.dumps'
# NaN, Infinity, -Infinity), which the models' JSON parser takes too.
_NON_FINITE = st.sampled_from(NON_FINITE) | st.sampled_from([math.nan, math.inf, -math.inf])
_FIGURE = _FLOAT | _NON_FINITE
# Scalar names about their bounds (1..64 characters, no control character): short ones, ones of
# 63-66 characters, and ones with a control character (a trailing newline, which Python's ``$``
# would let through, NUL, DEL, C1) or none at all.
_NAME = st.one_of(
    st.text(max_size=4),
    st.integers(62, 66).map(lambda n: "n" * n),
    st.sampled_from(["", "loss\n", "\n", "a\x00b", "\x7f", "x\x85", "\x9f", "tab\t", "é", "\u2028", " "]),
)
_VALID_STEP = st.fixed_dictionaries(
    {"step": st.integers(0, 10**6), "time": _FIGURE},
    optional={
        "step_time": _FIGURE | st.none(),
        "drift": _FIGURE | st.none(),
        "loss": _FIGURE | st.none(),
        "scalars": st.dictionaries(_NAME, _FIGURE, max_size=3)
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
    if fast is None:  # the models decide: the route asks them next, and stores what they take
        try:
            model = _WORKER_MESSAGE.validate_json(text)
        except ValidationError:
            return
        if isinstance(model, MetricsBatch):  # stored as the models write it, as valid JSON
            assert [strict_json(t) for _, t in encode(received(model)).steps] == [
                strict_json(r.model_dump_json()) for r in model.steps
            ]
        return
    model = _WORKER_MESSAGE.validate_json(text)  # raises if the fast path took a batch the route's models refuse
    assert isinstance(model, MetricsBatch)
    assert (fast.dropped, fast.seq) == (model.dropped, model.seq)
    assert [msgspec.structs.asdict(s) for s in fast.steps] == [r.model_dump() for r in model.steps]
    assert [json.loads(t) for _, t in encode(fast).steps] == [json.loads(r.model_dump_json()) for r in model.steps]


def test_non_finite_figures_are_stored_as_the_protocol_spells_them():
    step = {
        "step": 1,
        "time": "NaN",
        "step_time": "Infinity",
        "drift": "-Infinity",
        "loss": None,
        "scalars": {"g": "NaN"},
    }
    figures = dict.fromkeys(
        ("divergence", "relative_divergence", "divergence_mean", "divergence_max", "relative_mean", "relative_max"),
        "Infinity",
    )
    rnd = {
        "step": 4,
        "group_size": 2,
        **figures,
        "seconds": "NaN",
        "bytes": 8,
        "exact": True,
        "top_layers": [["w", "-Infinity"]],
        "layers_total": 1,
        "pseudo_gradient_norm": "Infinity",
        "pseudo_gradient_relative": "NaN",
        "outer_lr": 0.7,
    }
    text = json.dumps({"kind": "metrics", "steps": [step], "rounds": [rnd]})
    assert decode_metrics(text) is None  # the fast path leaves the strings to the models
    model = _WORKER_MESSAGE.validate_json(text)
    assert math.isnan(model.steps[0].time) and model.rounds[0].divergence == math.inf
    assert strict_json(model.model_dump_json())["steps"] == [step]  # the models write what they read
    enc = encode(received(model))
    assert [strict_json(t) for _, t in enc.steps] == [step]
    assert [strict_json(t) for _, _, t in enc.rounds] == [rnd]
    assert math.isinf(enc.latest.divergence_mean)
    # Bare tokens (Python's json.dumps writes them) are read as the same figures, stored as strings.
    bare = text.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity").replace('"-Infinity"', "-Infinity")
    assert [strict_json(t) for _, t in encode(received(_WORKER_MESSAGE.validate_json(bare))).steps] == [step]


def test_scalar_names_are_bounded_alike_on_both_paths():
    def frame(name: str) -> str:
        return json.dumps({"kind": "metrics", "steps": [{"step": 1, "time": 1.0, "scalars": {name: 0.5}}]})

    for name in ("", "n" * 65, "n" * 900_000, "loss\n", "a\x00b", "\x7f", "x\x85", "tab\t"):
        assert decode_metrics(frame(name)) is None, repr(name[:10])
        with pytest.raises(ValidationError, match="scalars"):
            _WORKER_MESSAGE.validate_json(frame(name))
    for name in ("n" * 64, "lr", "é", "a b", "\u2028"):
        fast = decode_metrics(frame(name))
        assert fast is not None and fast.steps[0].scalars == {name: 0.5}
        assert _WORKER_MESSAGE.validate_json(frame(name)).steps[0].scalars == {name: 0.5}
