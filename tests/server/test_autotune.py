"""The autopilot: the pure rule on synthetic series, then the server acting through the command log."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgctl.protocol import CommandAck, ControlView, MetricsBatch, StepRecord
from avgctl.server import autotune as at
from tests.support.frames import hello, uniform_round
from tests.support.polling import wait_for
from tests.support.servers import WORKER, auth

CFG = at.AutotuneConfig()


def active(target: float = 0.08, **fields) -> at.AutotuneState:
    return dataclasses.replace(at.switch(at.AutotuneState(), True, target), **fields)


def feed(state, cfg, rounds, period, start=0, loss=None):
    """Rounds every ``period`` steps from ``start`` with these deltas; returns the state and proposals."""
    proposals = []
    step = start
    for delta in rounds:
        if loss is not None:
            state = at.observe_steps(
                state, cfg, [(s, loss(s), None) for s in range(max(0, step - period + 1), step + 1)]
            )
        state, proposal = at.observe_round(state, cfg, step=step, delta=delta, seconds=None, period=period)
        proposals.append(proposal)
        step += period
    return state, proposals


# ------------------------------------------------------------------------------ growth and delta


def test_growth_is_an_ema_of_delta_per_step_measured_between_rounds():
    state = active()
    state, _ = at.observe_round(state, CFG, step=0, delta=0.5, seconds=None, period=4)
    assert state.growth is None and state.last_round == 0  # the first round only starts the clock
    state, _ = at.observe_round(state, CFG, step=4, delta=0.04, seconds=None, period=4)
    assert state.growth == pytest.approx(0.01)
    # An off-grid round (average_now, a new period): tau_r is the steps since the last round, 8 here.
    state, _ = at.observe_round(state, CFG, step=12, delta=0.16, seconds=None, period=4)
    assert state.growth == pytest.approx(0.3 * 0.02 + 0.7 * 0.01)


def test_round_delta_uses_every_rank_else_relative_mean_squared():
    assert at.round_delta([0.1, 0.3], 2, relative_mean=0.2) == pytest.approx((0.01 + 0.09) / 2)
    assert at.round_delta([0.1], 2, relative_mean=0.2) == pytest.approx(0.04)  # a rank's record is missing


def test_calibration_takes_the_median_delta_at_the_persons_period():
    cfg = at.AutotuneConfig(calibration_skip=0)
    state = at.switch(at.AutotuneState(), True, None)
    assert state.mode == "calibrating" and state.target is None
    deltas = [0.05, 0.01, 0.03, 0.02, 0.04, 0.09, 0.06, 0.07, 0.08]  # the first only starts the clock
    state, proposals = feed(state, cfg, deltas, period=4)
    assert proposals == [None] * 8 + [proposals[-1]] and proposals[-1] is not None
    assert state.mode == "active" and state.target == pytest.approx(0.05)  # median of deltas[1:]
    assert state.note.endswith("calibrated over 8 rounds at period 4")


def test_calibration_skips_the_initial_transient():
    state = at.switch(at.AutotuneState(), True, None)
    transient = [0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1]  # models moving fast from their initial weights
    settled = [0.01, 0.03, 0.02, 0.04, 0.09, 0.06, 0.07, 0.08]
    state, proposals = feed(state, CFG, [0.0] + transient + settled, period=4)
    assert CFG.calibration_skip == len(transient)
    assert proposals[:-1] == [None] * 16 and proposals[-1] is not None
    assert state.mode == "active" and state.target == pytest.approx(0.05)  # median of the settled rounds only
    assert "calibrated over 8 rounds at period 4 (after skipping 8)" in state.note


def test_calibration_ignores_rounds_off_the_persons_period():
    state = at.switch(at.AutotuneState(), True, None)
    state, _ = at.observe_round(state, CFG, step=0, delta=0.0, seconds=None, period=4)
    state, _ = at.observe_round(state, CFG, step=2, delta=9.0, seconds=None, period=4)  # average_now
    assert state.calibration == ()
    n = CFG.calibration_skip + CFG.calibration_rounds
    state, _ = feed(state, CFG, [0.02] * n, period=4, start=6)
    assert state.mode == "active" and state.target == pytest.approx(0.02) and len(state.calibration) == n


# ------------------------------------------------------------------------------ the proposal


def proposal_for(raw: float, period: int, cfg=CFG, **fields) -> at.Proposal:
    state = active(target=raw * 0.01, growth=0.01, delta=0.1, **fields)
    return at.propose(state, cfg, period)


def test_proposal_is_target_over_growth():
    p = proposal_for(6.0, period=4)
    assert (p.period, p.current, p.changed) == (6, 4, True) and p.raw_period == pytest.approx(6.0)
    assert "delta*/g = 6.0" in p.reason and "period 6 (from 4)" in p.reason


def test_each_change_is_limited_to_half_or_double():
    up, down = proposal_for(100.0, period=8), proposal_for(1.0, period=8)
    assert (up.period, down.period) == (16, 4)
    assert "limited to x2" in up.reason and "limited to x1/2" in down.reason
    assert proposal_for(100.0, period=3).period == 6 and proposal_for(0.1, period=3).period == 2


def test_clamped_to_tau_min_and_tau_max():
    cfg = at.AutotuneConfig(tau_min=2, tau_max=10)
    assert proposal_for(16.0, period=8, cfg=cfg).period == 10
    assert proposal_for(1.0, period=3, cfg=cfg).period == 2
    assert "clamped to tau_max 10" in proposal_for(16.0, period=8, cfg=cfg).reason


def test_changes_under_ten_percent_are_ignored():
    held = proposal_for(8.7, period=8)
    assert held.period == 8 and not held.changed and "hold period 8" in held.reason
    assert proposal_for(8.9, period=8).period == 9
    assert proposal_for(21.9, period=20).period == 20 and proposal_for(22.1, period=20).period == 22


def test_reversing_the_last_change_needs_twice_the_dead_band():
    after_rise = active(direction=1)
    assert proposal_for(7.0, period=8, direction=1).period == 8  # -12.5% right after going up: held
    assert "(a reversal)" in proposal_for(7.0, period=8, direction=1).reason
    assert proposal_for(6.3, period=8, direction=1).period == 6
    assert proposal_for(9.0, period=8, direction=1).period == 9  # the same direction: 10% as usual
    assert proposal_for(7.0, period=8, direction=-1).period == 7
    state, _ = at.observe_round(after_rise, CFG, step=0, delta=0.1, seconds=None, period=8)
    state, _ = at.observe_round(state, CFG, step=8, delta=0.1, seconds=None, period=6)
    assert (state.period_seen, state.direction) == (6, -1)


def test_noisy_steady_divergence_does_not_flip_flop():
    rng = random.Random(0)
    cfg = at.AutotuneConfig()
    state = active(target=0.08)
    # delta grows 0.01 per step, so the budget 0.08 is spent in 8 steps; +-10% noise per round.
    periods, period, step, changes = [], 8, 0, 0
    for _ in range(200):
        delta = 0.01 * period * (1 + rng.uniform(-0.1, 0.1))
        state, p = at.observe_round(state, cfg, step=step, delta=delta, seconds=None, period=period)
        if p is not None and p.changed:
            period, changes = p.period, changes + 1
        periods.append(period)
        step += period
    assert changes == 0 and set(periods) == {8}


def test_the_period_follows_falling_growth_and_settles():
    state, period, step, periods = active(target=0.08), 2, 0, []
    for growth in [0.04] * 10 + [0.005] * 30:  # models settle: divergence grows 8x slower
        state, p = at.observe_round(state, CFG, step=step, delta=growth * period, seconds=None, period=period)
        if p is not None and p.changed:
            assert p.current / 2 <= p.period <= p.current * 2
            period = p.period
        periods.append(period)
        step += period
    assert periods[:10] == [2] * 10 and periods == sorted(periods)  # held, then only up
    assert abs(period - 16) <= 1.6 and len(set(periods[-15:])) == 1  # 0.08 / 0.005, within the dead band


def test_gain_below_one_moves_part_way_in_log_space():
    cfg = at.AutotuneConfig(gain=0.5)
    assert proposal_for(16.0, period=4, cfg=cfg).period == 8  # sqrt(4 * 16)


def test_cost_floor_and_communication_bound_are_reported():
    assert at.cost_floor(0.03, 0.006, 0.1) == 45  # 5 steps' worth of averaging, kept to 10% of time
    assert at.cost_floor(0.01, 0.01, 0.5) == 1
    assert at.cost_floor(None, 0.01, 0.1) is None
    p = proposal_for(6.0, period=4, t_comm=0.03, t_step=0.006)
    assert p.tau_cost == 45 and p.communication_bound and p.period == 6
    assert "communication-bound: under the cost floor 45" in p.reason
    q = proposal_for(60.0, period=32, t_comm=0.03, t_step=0.006)
    assert q.period == 60 and not q.communication_bound and "communication-bound" not in q.reason


def test_timings_are_learned_from_steps_and_rounds():
    state = active()
    state = at.observe_steps(state, CFG, [(s, 1.0, 0.01) for s in range(1, 5)])
    state, _ = at.observe_round(state, CFG, step=4, delta=0.0, seconds=0.05, period=4)
    assert state.t_step == pytest.approx(0.01) and state.t_comm == pytest.approx(0.05)


# ------------------------------------------------------------------------------ the loss guard


def test_loss_jumps_right_after_two_rounds_halve_the_period_and_the_target():
    def loss(step):  # flat 1.0, but 2.5 (then 2.2) for the 4 steps right after the rounds at 24 and 32
        return 2.5 if 24 < step <= 28 else 2.2 if 32 < step <= 36 else 1.0

    state, proposals = feed(active(target=0.08), CFG, [0.08] * 6, period=8, loss=loss)
    guarded = proposals[-1]
    assert [p.changed for p in proposals[1:-1]] == [False] * 4  # one jump is not enough
    assert guarded.period == 4 and guarded.guard is not None and "jumped +150%, +120%" in guarded.guard
    assert state.target == pytest.approx(0.04) and state.guard_wait == CFG.guard_cooldown
    assert "loss guard" in guarded.reason and "halving" in guarded.reason


def test_a_jump_under_the_threshold_is_left_alone():
    state, proposals = feed(active(), CFG, [0.08] * 6, period=8, loss=lambda s: 1.9 if 24 < s <= 36 else 1.0)
    assert all(p.guard is None and not p.changed for p in proposals[1:])


def test_loss_average_rising_two_rounds_in_a_row_halves_the_period():
    cfg = at.AutotuneConfig(loss_span=4)

    def loss(step):  # flat, then rising 3% a step from step 40 (25% a round)
        return 1.0 if step <= 40 else 1.03 ** (step - 40)

    state, proposals = feed(active(target=0.08), cfg, [0.08] * 8, period=8, loss=loss)
    fired = [p for p in proposals if p is not None and p.guard is not None]
    assert len(fired) == 1 and "rose two rounds in a row" in fired[0].guard and fired[0].period == 4
    assert proposals.index(fired[0]) == 7  # the average rose at the rounds at steps 48 and 56


def test_the_guard_waits_for_its_cooldown():
    state = active(jumps=(1.5, 1.2), guard_wait=2)
    assert at.loss_guard(state, CFG) is None
    assert at.loss_guard(dataclasses.replace(state, guard_wait=0), CFG) is not None


def test_the_guard_does_not_go_under_tau_min():
    p = proposal_for(1.0, period=1, jumps=(1.5, 1.2))
    assert p.guard is not None and p.period == 1 and not p.changed and "already at tau_min 1" in p.reason


# ------------------------------------------------------------------------------ modes


def test_a_persons_command_suspends_until_switched_on_again():
    state, _ = feed(active(), CFG, [0.08, 0.08], period=8)
    state = at.suspend(state, "suspended by alice's set_period (command 3)")
    assert state.mode == "suspended" and "alice" in state.note
    state, p = at.observe_round(state, CFG, step=24, delta=0.5, seconds=None, period=8)
    assert p is None and state.growth is not None  # it keeps learning, but proposes nothing
    state = at.switch(state, True, None)
    assert state.mode == "calibrating" and state.growth is not None
    assert at.suspend(at.AutotuneState(), "x").mode == "off"  # off stays off


def test_off_ignores_everything():
    state = at.AutotuneState()
    state = at.observe_steps(state, CFG, [(1, 1.0, 0.1)])
    state, p = at.observe_round(state, CFG, step=4, delta=1.0, seconds=1.0, period=4)
    assert p is None and state == at.AutotuneState()
    assert at.switch(active(), False).mode == "off"


@pytest.mark.parametrize(
    "fields",
    [
        dict(tau_min=0),
        dict(tau_min=8, tau_max=4),
        dict(max_change=1.0),
        dict(dead_band=1.0),
        dict(gain=0.0),
        dict(growth_smoothing=0.0),
        dict(calibration_rounds=0),
        dict(calibration_skip=-1),
        dict(comm_share=1.0),
        dict(jump_window=0),
        dict(loss_jump=0.0),
    ],
)
def test_config_checks(fields):
    with pytest.raises(ValueError):
        at.AutotuneConfig(**fields)


# ------------------------------------------------------------------------------ total over floats

# Every float a worker could send (NaN and ±inf are data: another path of the server stores them).
_ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e308, -1e308, 1e-300, 5e-324, 0.0, -0.0, math.inf, -math.inf, math.nan, 1.7976931348623157e308]
)
_EVENTS = st.lists(
    st.one_of(
        st.tuples(
            st.just("steps"),
            st.lists(st.tuples(st.integers(0, 2**63 - 1), _ANY_FLOAT | st.none(), _ANY_FLOAT | st.none()), max_size=4),
        ),
        st.tuples(st.just("round"), st.integers(0, 2**63 - 1), _ANY_FLOAT, _ANY_FLOAT | st.none()),
    ),
    max_size=24,
)


def _finite_figures(p: at.Proposal) -> bool:
    return all(math.isfinite(x) for x in (p.delta, p.growth, p.target, p.raw_period))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=_EVENTS,
    target=st.none() | st.floats(min_value=1e-300, max_value=1e6),
    period=st.integers(1, CFG.tau_max),
    step_gap=st.integers(1, 10**6),
)
def test_the_rule_is_total_over_floats_and_proposes_within_the_bounds_or_holds(events, target, period, step_gap):
    cfg = at.AutotuneConfig(calibration_skip=0, calibration_rounds=2)
    state = at.switch(at.AutotuneState(), True, target)
    step = 0
    for event in events:
        if event[0] == "steps":
            state = at.observe_steps(state, cfg, event[1])
            continue
        _, offset, delta, seconds = event
        step = min(step + step_gap + offset % 7, 2**63 - 1)
        state, proposal = at.observe_round(state, cfg, step=step, delta=delta, seconds=seconds, period=period)
        if proposal is not None:
            assert proposal.period == period or cfg.tau_min <= proposal.period <= cfg.tau_max
            assert _finite_figures(proposal), proposal  # stored as JSON, shown on the dashboard
            assert proposal.tau_cost is None or 1 <= proposal.tau_cost <= at.COST_FLOOR_MAX
            if proposal.changed:
                period = proposal.period  # rank 0 applies it
        assert state.growth is None or (math.isfinite(state.growth) and state.growth >= 0)
        for figure in (state.t_comm, state.t_step, state.delta, state.target):
            assert figure is None or math.isfinite(figure)


@given(period=st.integers(-(2**70), 2**70), delta=_ANY_FLOAT)
@settings(max_examples=200, deadline=None)
def test_a_period_the_rule_cannot_work_with_is_held_never_raised_on(period, delta):
    state = active(growth=0.01, last_round=0, delta=0.02)
    state, proposal = at.observe_round(state, CFG, step=4, delta=delta, seconds=0.001, period=period)
    if proposal is None or proposal.period == period:
        return  # held: 0, negative or astronomical periods, and any unusable delta
    assert 1 <= period <= at.MAX_PERIOD
    # Within the bounds, or (from a period beyond them) toward them by at most one change.
    assert CFG.tau_min <= proposal.period <= CFG.tau_max or CFG.tau_max < proposal.period < period


def test_the_cost_floor_of_a_round_of_1e308_seconds_against_a_step_of_1e_300_is_capped():
    assert at.cost_floor(1e308, 1e-300, 0.1) == at.COST_FLOOR_MAX  # was OverflowError
    assert at.cost_floor(math.nan, 0.01, 0.1) is None and at.cost_floor(0.01, math.inf, 0.1) is None
    state = active(t_comm=1e308, t_step=1e-300)
    state, _ = at.observe_round(state, CFG, step=0, delta=0.01, seconds=1e308, period=4)
    _, proposal = at.observe_round(state, CFG, step=4, delta=0.04, seconds=1e308, period=4)
    assert proposal.tau_cost == at.COST_FLOOR_MAX and proposal.communication_bound


def test_a_non_finite_divergence_is_held_on_with_a_note_and_keeps_the_figures_finite():
    state, _ = feed(active(), CFG, [0.04, 0.04], period=4)
    for bad in (math.nan, math.inf, -1.0):
        after, proposal = at.observe_round(state, CFG, step=12, delta=bad, seconds=0.001, period=4)
        assert proposal is None and after.delta == state.delta and after.growth == state.growth
        assert "not a finite non-negative number" in after.note and after.last_round == 12
    # The next good round proposes from the evidence as before.
    after, _ = at.observe_round(state, CFG, step=12, delta=math.nan, seconds=None, period=4)
    _, proposal = at.observe_round(after, CFG, step=16, delta=0.04, seconds=None, period=4)
    assert proposal is not None and _finite_figures(proposal)


# ------------------------------------------------------------------------------ in the server


def send_rounds(ws, first: int, last: int, period: int, relative: float) -> None:
    """Steps ``first..last`` of a 1-rank job with a round every ``period`` steps, in small frames."""
    for lo in range(first, last + 1, 8):
        span = range(lo, min(lo + 8, last + 1))
        steps = [StepRecord(step=s, time=1000.0 + s, step_time=0.01, loss=1.0) for s in span]
        rounds = [uniform_round(s, relative) for s in span if s % period == 0]
        ws.send_text(MetricsBatch(steps=steps, rounds=rounds).model_dump_json())


def test_the_autopilot_retunes_through_the_command_log_and_a_person_suspends_it(client):
    def commands():
        return client.get("/api/jobs/job-1/commands").json()

    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(rank=0, world_size=1))  # period 4
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        on = client.post(
            "/api/jobs/job-1/commands", json={"type": "set_autotune", "enabled": True, "target_divergence": 0.01}
        )
        assert on.json()["status"] == "applied"
        # Divergence grows 0.005 a step (relative 0.1414 after 4 steps): the budget 0.01 lasts 2 steps.
        send_rounds(r0, 1, 12, period=4, relative=math.sqrt(0.02))
        auto = wait_for(lambda: [c for c in commands() if c["author"] == "autopilot"])
        assert len(auto) == 1
        cmd = auto[0]
        assert cmd["type"] == "set_period" and cmd["command"] == {"type": "set_period", "period": 2}
        assert cmd["status"] == "pending" and "delta*/g = 2.0" in cmd["note"] and "period 2 (from 4)" in cmd["note"]
        assert r0.receive_json() == {"kind": "command", "id": cmd["id"], "command": {"type": "set_period", "period": 2}}

        # More rounds while it is pending: no second set_period.
        send_rounds(r0, 13, 24, period=4, relative=math.sqrt(0.02))
        wait_for(lambda: client.get("/api/jobs/job-1").json().get("step") == 24)
        report = wait_for(lambda: (a := client.get("/api/jobs/job-1").json()["control"]["autotune"]).get("state") and a)
        assert report["state"] == "active" and report["enabled"] and report["target_divergence"] == 0.01
        assert report["last_proposal"]["period"] == 2 and report["last_proposal"]["pending_command"] == cmd["id"]
        assert [c["author"] for c in commands()].count("autopilot") == 1

        view = ControlView(period=2, warmup_steps=0, version=1)
        r0.send_text(
            CommandAck(command_id=cmd["id"], status="applied", applied_step=24, control=view).model_dump_json()
        )
        wait_for(lambda: client.get(f"/api/jobs/job-1/commands/{cmd['id']}").json()["status"] == "applied")

        # A person's command suspends it: rounds that would call for a change change nothing.
        manual = client.post(
            "/api/jobs/job-1/commands", json={"type": "set_period", "period": 8}, headers={"X-Avgctl-Author": "alice"}
        ).json()
        assert r0.receive_json()["id"] == manual["id"]
        report = wait_for(
            lambda: (a := client.get("/api/jobs/job-1").json()["control"]["autotune"]).get("state") == "suspended" and a
        )
        assert report["enabled"] is False and "alice" in report["note"] and f"command {manual['id']}" in report["note"]
        r0.send_text(
            CommandAck(
                command_id=manual["id"],
                status="applied",
                applied_step=24,
                control=ControlView(period=8, warmup_steps=0, version=2),
            ).model_dump_json()
        )
        send_rounds(r0, 25, 64, period=8, relative=0.5)
        wait_for(lambda: client.get("/api/jobs/job-1").json().get("step") == 64)
        assert [c["author"] for c in commands()].count("autopilot") == 1

        # Switched on again, it acts again (from the period in force, 8).
        client.post(
            "/api/jobs/job-1/commands", json={"type": "set_autotune", "enabled": True, "target_divergence": 0.01}
        )
        send_rounds(r0, 65, 96, period=8, relative=0.5)
        again = wait_for(lambda: [c for c in commands() if c["author"] == "autopilot"][1:])
        assert again[0]["command"] == {"type": "set_period", "period": 4} and "limited to x1/2" in again[0]["note"]


def test_a_target_calibrated_from_huge_deltas_is_finite():
    # Two finite deltas near the float maximum: their mean, taken as (a + b) / 2, was inf.
    cfg = at.AutotuneConfig(calibration_skip=0, calibration_rounds=2)
    state = at.switch(at.AutotuneState(), True, None)
    for step, delta in ((1, 9e307), (2, 1.7e308), (3, 9e307)):
        state, proposal = at.observe_round(state, cfg, step=step, delta=delta, seconds=0.001, period=1)
    assert state.mode == "active" and state.target == pytest.approx(1.3e308)
    assert proposal is None or math.isfinite(proposal.target)
