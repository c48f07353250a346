"""The autopilot's rule: retune the averaging period so divergence stays on a budget.

Background. Local SGD trades communication for divergence: ranks train alone for a period of tau
steps, drift apart, then average. Four lines of work shape the rule below:

- AdaComm (Wang & Joshi, SysML 2019) picks tau for error against wall-clock time: a long period
  early for fast progress, shortened as the training loss falls to reach a lower error floor.
- Adaptive periodic averaging, ADPSGD (Jiang & Agrawal, 2020) finds the opposite schedule from the
  variance of the models across ranks: average often early, while that variance is large, and
  seldom later; for a fixed communication budget this gives a smaller overall variance.
- Dynamic averaging (Kamp et al., ECML PKDD 2018) averages only when a rank's model has moved
  further than a threshold from the last common model: communication triggered by divergence.
- Post-local SGD (Lin et al., ICLR 2020): synchronous SGD first, then local SGD with a longer
  period (torch's ``PostLocalSGDOptimizer`` with ``warmup_steps``).

Our rule is Kamp's threshold turned into a period, since we cannot trigger a round per rank without
a collective every step. Each round measures ``delta_r = mean_i ||theta_i - theta_bar||^2 /
||theta_bar||^2`` (from every rank's ``relative_divergence``); the growth per step ``g`` is an EMA of
``delta_r / tau_r``; the period that spends the budget ``delta*`` is ``tau = delta* / g``. While the
models move fast, ``g`` is large and the period short; as they settle it grows: ADPSGD's schedule
and post-local SGD's, found from measurements instead of set by hand. The budget is the person's
(``target_divergence``) or calibrated as the median ``delta_r`` at their period, once the first
rounds' transient has passed, so switching the autopilot on keeps the divergence they had and lets
the period follow it. Each change is bounded
(x0.5..x2, within [tau_min, tau_max]) and small ones are ignored, so the period does not flip-flop.
A loss guard halves the period (and the budget, so the next proposal does not undo it) when the loss
jumps right after averaging or its average rises for two rounds. The cost floor ``tau_cost`` is the
least period keeping averaging under a share ``rho`` of wall time; a period under it is proposed all
the same, marked communication-bound, so the trade is visible rather than hidden.

Everything here is numbers in, numbers out: no clock, no I/O. ``server/autopilot.py`` runs it per job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from avgctl.protocol.bounds import MAX_PERIOD

Mode = Literal["off", "calibrating", "active", "suspended"]

# Pending per-step losses kept between rounds at most (a job whose rounds stopped coming).
_MAX_PENDING_STEPS = 8192
# The largest cost floor reported: a round of 1e308 s against a step of 1e-300 s has a ratio of
# inf, and ``math.ceil`` of that raised OverflowError inside the worker socket's handler.
COST_FLOOR_MAX = 2**53
_RAW_MAX = 1e300  # delta*/g reported at most (a Proposal's figures are finite: they are stored as JSON)


@dataclass(kw_only=True, slots=True)
class AutotuneConfig:
    """The rule's parameters; the defaults suit the demo task and a typical job."""

    tau_min: int = 1
    """Shortest period the autopilot sets."""
    tau_max: int = 1024
    """Longest period the autopilot sets."""
    max_change: float = 2.0
    """One change moves the period at most this factor up or down (x0.5..x2)."""
    dead_band: float = 0.10
    """Proposals within this share of the current period are ignored, and twice this share when
    they would reverse the last change (no flip-flopping on noisy divergence)."""
    gain: float = 1.0
    """Step toward ``delta*/g`` in log space: 1 jumps to it; 0.5 goes half way (for divergence that
    grows like tau^2, where the full step would swing between tau and tau*^2/tau)."""
    growth_smoothing: float = 0.3
    """Weight of the newest round in the EMA of ``delta_r / tau_r``."""
    calibration_rounds: int = 8
    """Rounds at the person's period whose median ``delta_r`` becomes ``delta*`` (no target given)."""
    calibration_skip: int = 8
    """Rounds at the person's period let pass before those: switched on at the start of training,
    the first rounds carry the initial transient (models moving fastest, divergence several times
    its later level), and a budget taken from them would let the models drift that far all run."""
    comm_share: float = 0.10
    """rho: the share of wall time averaging may take; sets the cost floor ``tau_cost``."""
    time_smoothing: float = 0.1
    """Weight of the newest value in the EMAs of the step time and the averaging time."""
    jump_window: int = 4
    """Steps before and after a round whose mean losses the loss guard compares."""
    loss_jump: float = 1.0
    """Relative loss jump right after averaging, at two rounds in a row, that halves the period (1.0:
    the loss doubled). Non-IID ranks see some jump after every round (the average fits their data
    less well than their own model did): medians 0.3-0.75 at periods 8-64 on the demo task, with
    single rounds of one rank past 1.0, hence the margin and the two rounds."""
    loss_span: int = 100
    """Span in steps of the EMA of the loss that the 'rising loss' check samples at each round."""
    loss_rise: float = 0.05
    """Relative rise of that average, at each of two rounds in a row, that halves the period (on the
    demo task one rank's average moves by about 1.5% between rounds from noise alone)."""
    guard_cooldown: int = 4
    """Rounds after a loss-guard halving before the guard may fire again."""

    def __post_init__(self) -> None:
        if not 1 <= self.tau_min <= self.tau_max:
            raise ValueError(f"need 1 <= tau_min <= tau_max, got {self.tau_min}, {self.tau_max}")
        if self.max_change <= 1.0:
            raise ValueError("max_change must be above 1")
        if not 0.0 <= self.dead_band < 1.0:
            raise ValueError("dead_band must be in [0, 1)")
        if not 0.0 < self.gain <= 1.0:
            raise ValueError("gain must be in (0, 1]")
        for name in ("growth_smoothing", "time_smoothing"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.calibration_rounds < 1 or self.calibration_skip < 0:
            raise ValueError("calibration_rounds must be positive and calibration_skip non-negative")
        if not 0.0 < self.comm_share < 1.0:
            raise ValueError("comm_share must be in (0, 1)")
        if self.jump_window < 1 or self.loss_span < 1 or self.guard_cooldown < 0:
            raise ValueError("jump_window and loss_span must be positive, guard_cooldown non-negative")
        if self.loss_jump <= 0.0 or self.loss_rise < 0.0:
            raise ValueError("loss_jump must be positive and loss_rise non-negative")


@dataclass(frozen=True, slots=True)
class Proposal:
    """What the rule makes of the latest round; ``changed`` means: issue ``set_period(period)``."""

    step: int
    """The round it was made at."""
    current: int
    """The period in force."""
    period: int
    """The period proposed (equal to ``current`` when the rule holds)."""
    reason: str
    """One line for people: the figures and what limited the proposal."""
    delta: float
    """delta_r of the round: mean over ranks of (||theta_i - theta_bar|| / ||theta_bar||)^2."""
    growth: float
    """g: EMA of delta_r / tau_r, per step."""
    target: float
    """delta*: the budget in force."""
    raw_period: float
    """delta* / g before any limit."""
    tau_cost: int | None
    """Least period that keeps averaging under ``comm_share`` of wall time (None until timed)."""
    communication_bound: bool
    """The proposed period is under ``tau_cost``: averaging will take more than its share."""
    guard: str | None = None
    """Why the loss guard halved the period, when it did."""

    @property
    def changed(self) -> bool:
        return self.period != self.current


@dataclass(frozen=True, slots=True)
class AutotuneState:
    """One job's autopilot: its mode, its budget and the evidence gathered from rounds and steps."""

    mode: Mode = "off"
    user_target: float | None = None
    """The person's ``target_divergence`` (None: calibrate one)."""
    target: float | None = None
    """delta* in force: the person's, or the calibrated one once calibration is done."""
    calibration: tuple[float, ...] = ()
    """delta_r of the rounds at the person's period so far (while calibrating; the first
    ``calibration_skip`` of them are not used)."""
    growth: float | None = None
    delta: float | None = None
    last_round: int | None = None
    """Step of the last round observed."""
    t_comm: float | None = None
    """EMA of seconds per averaging round."""
    t_step: float | None = None
    """EMA of seconds per training step (without averaging)."""
    losses: Mapping[int, tuple[float, int]] = field(default_factory=lambda: MappingProxyType({}))
    """step -> (sum, count) of losses reported for steps after ``last_round``."""
    tail_loss: float | None = None
    """Mean loss over the ``jump_window`` steps up to the last round."""
    jumps: tuple[float, ...] = ()
    """Relative loss change right after each of the last two rounds (head / tail - 1), oldest first."""
    loss_avg: float | None = None
    loss_avgs: tuple[float, ...] = ()
    """``loss_avg`` at the last three rounds, oldest first."""
    guard_wait: int = 0
    period_seen: int | None = None
    """The period in force at the last round."""
    direction: int = 0
    """Sign of the last change of the period (+1 longer, -1 shorter, 0 none yet)."""
    note: str | None = None
    """Why the mode is what it is, for people (e.g. who suspended it)."""


# ------------------------------------------------------------------------------------------ helpers


def round_delta(relative: Iterable[float], world_size: int, relative_mean: float) -> float:
    """delta_r of one round from the ``relative_divergence`` of the ranks that reported it.

    With every rank's figure it is the mean of their squares, as defined. With fewer (a rank's link
    dropped records, or only rank 0 listens, as in an in-process controller) it falls back to
    ``relative_mean ** 2``, which every rank's record carries: a lower bound (Jensen), equal when
    ranks diverge alike; on the demo task the two differ by 0.1-0.2%.
    """
    values = list(relative)
    if len(values) >= world_size > 0:
        return sum(v * v for v in values) / len(values)
    return relative_mean * relative_mean


def cost_floor(t_comm: float | None, t_step: float | None, share: float) -> int | None:
    """tau_cost = ceil((t_comm / t_step) * (1 - rho) / rho): averaging's share of wall time is
    t_comm / (tau * t_step + t_comm), at most rho from this period on. None until both are known
    (or while either is not a finite figure); at most ``COST_FLOOR_MAX``."""
    if t_comm is None or t_step is None or not t_step > 0.0 or not math.isfinite(t_comm) or not math.isfinite(t_step):
        return None
    ratio = (t_comm / t_step) * (1.0 - share) / share  # inf for a round of 1e308 s and a step of 1e-300 s
    if math.isnan(ratio):
        return None
    return max(1, math.ceil(min(ratio, float(COST_FLOOR_MAX)) - 1e-9))


def _ema(old: float | None, new: float, weight: float) -> float:
    """The EMA, finite whenever ``old`` and ``new`` are (two terms near the float maximum may
    round past it): then the newest value stands alone."""
    if old is None:
        return new
    value = weight * new + (1.0 - weight) * old
    return value if math.isfinite(value) else new


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _mean(values: list[float]) -> float:
    # Finite losses near the float maximum overflow a plain sum (fsum raises): divide first then.
    try:
        return math.fsum(values) / len(values)
    except OverflowError:
        return math.fsum(v / len(values) for v in values)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ------------------------------------------------------------------------------------------ updates


def _median(values: Iterable[float]) -> float:
    """``statistics.median``, but the mean of the middle two is taken as halves: two finite deltas
    near 1.8e308 have a finite median, and (a + b) / 2 overflowed to an infinite target."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else ordered[mid - 1] / 2 + ordered[mid] / 2


def switch(state: AutotuneState, enabled: bool, target: float | None = None) -> AutotuneState:
    """``set_autotune``: on (with the person's target, or calibrating one) or off.

    Switching on again after a suspension starts afresh from the period in force; the evidence
    (growth, timings, losses) is kept, the calibration and the loss guard's history are not.
    """
    if not enabled:
        return dataclasses.replace(state, mode="off", user_target=None, target=None, calibration=(), note=None)
    if target is not None and not (math.isfinite(target) and target > 0.0):
        raise ValueError("target divergence must be a positive finite number")
    return dataclasses.replace(
        state,
        mode="active" if target is not None else "calibrating",
        user_target=target,
        target=target,
        calibration=(),
        loss_avgs=(),
        jumps=(),
        guard_wait=0,
        note=None if target is not None else "calibrating the target at the current period",
    )


def suspend(state: AutotuneState, note: str) -> AutotuneState:
    """A person's command: the autopilot stops proposing until it is switched on again."""
    if state.mode in ("off", "suspended"):
        return state
    return dataclasses.replace(state, mode="suspended", note=note)


def observe_steps(
    state: AutotuneState, cfg: AutotuneConfig, steps: Iterable[tuple[int, float | None, float | None]]
) -> AutotuneState:
    """Fold ``(step, loss, step_time)`` of any rank into the evidence (ignored while off)."""
    if state.mode == "off":
        return state
    t_step = state.t_step
    losses: dict[int, tuple[float, int]] | None = None
    for step, loss, step_time in steps:
        # Figures are data: NaN, ±inf or a negative time teach nothing and are passed over.
        if _finite(step_time) and step_time > 0.0:
            t_step = _ema(t_step, step_time, cfg.time_smoothing)
        if not _finite(loss) or (state.last_round is not None and step <= state.last_round):
            continue
        if losses is None:
            losses = dict(state.losses)
        total, count = losses.get(step, (0.0, 0))
        if math.isfinite(total + loss):  # ranks' losses near the float maximum would sum to inf
            losses[step] = (total + loss, count + 1)
    if losses is None:
        return dataclasses.replace(state, t_step=t_step) if t_step != state.t_step else state
    if len(losses) > _MAX_PENDING_STEPS:
        losses = dict(sorted(losses.items())[-_MAX_PENDING_STEPS:])
    return dataclasses.replace(state, t_step=t_step, losses=MappingProxyType(losses))


def _close_losses(state: AutotuneState, cfg: AutotuneConfig, step: int) -> dict:
    """Loss evidence once the round at ``step`` closes the steps up to it."""
    closed = sorted((s, total / count) for s, (total, count) in state.losses.items() if s <= step)
    keep = MappingProxyType({s: v for s, v in state.losses.items() if s > step})
    loss_avg = state.loss_avg
    alpha = 2.0 / (cfg.loss_span + 1.0)
    for _, mean in closed:
        loss_avg = _ema(loss_avg, mean, alpha)
    jumps, tail = state.jumps, state.tail_loss
    if closed and state.last_round is not None:
        window = min(cfg.jump_window, step - state.last_round)
        head = [m for s, m in closed if s <= state.last_round + window]
        if head and state.tail_loss is not None and state.tail_loss > 0.0:
            jump = _mean(head) / state.tail_loss - 1.0
            if math.isfinite(jump):
                jumps = (jumps + (jump,))[-2:]
        recent = [m for s, m in closed if s > step - window]
        tail = _mean(recent) if recent else None
    elif closed:
        recent = [m for s, m in closed if s > step - cfg.jump_window]
        tail = _mean(recent) if recent else None  # losses of steps long before the first round only
    if tail is not None and not math.isfinite(tail):
        tail = None
    loss_avgs = state.loss_avgs
    if loss_avg is not None and closed:
        loss_avgs = (loss_avgs + (loss_avg,))[-3:]
    return dict(losses=keep, loss_avg=loss_avg, loss_avgs=loss_avgs, jumps=jumps, tail_loss=tail)


def observe_round(
    state: AutotuneState,
    cfg: AutotuneConfig,
    *,
    step: int,
    delta: float,
    seconds: float | None,
    period: int,
) -> tuple[AutotuneState, Proposal | None]:
    """Fold one averaging round into the state; a proposal while active (else None).

    ``period`` is the period in force. The period that shaped ``delta`` is measured, not assumed:
    the steps since the previous round (a command, ``average_now`` or a pause may have moved it).
    The first round seen has no previous round and only starts the clock.
    """
    if state.mode == "off":
        return state, None
    updates = _close_losses(state, cfg, step)
    tau_r = None if state.last_round is None or step <= state.last_round else step - state.last_round
    growth, calibration, target, mode, note = state.growth, state.calibration, state.target, state.mode, state.note
    # A figure that is not a finite, non-negative number is data the rule cannot use: the round
    # still closes the steps before it, and the rule holds, saying why.
    usable = _finite(delta) and delta >= 0.0
    if not usable:
        note = f"round at step {step}: divergence {delta!r} is not a finite non-negative number; ignored"
    elif not 1 <= period <= MAX_PERIOD:
        note = f"round at step {step}: period {period} is outside 1..{MAX_PERIOD}; holding"
    if tau_r is not None and usable:
        growth = _ema(growth, delta / tau_r, cfg.growth_smoothing)
        if mode == "calibrating" and tau_r == period:
            calibration = calibration + (delta,)
            if len(calibration) >= cfg.calibration_skip + cfg.calibration_rounds:
                used = calibration[cfg.calibration_skip :]
                target = _median(used)
                mode = "active"
                note = f"target {_fmt(target)} calibrated over {len(used)} rounds at period {period}"
                if cfg.calibration_skip:
                    note += f" (after skipping {cfg.calibration_skip})"
    state = dataclasses.replace(
        state,
        **updates,
        mode=mode,
        target=target,
        calibration=calibration,
        growth=growth,
        delta=delta if usable else state.delta,
        last_round=step,
        t_comm=_ema(state.t_comm, seconds, cfg.time_smoothing) if _finite(seconds) and seconds >= 0.0 else state.t_comm,
        guard_wait=max(0, state.guard_wait - 1),
        period_seen=period,
        direction=state.direction if state.period_seen in (None, period) else (1 if period > state.period_seen else -1),
        note=note,
    )
    if state.mode != "active" or state.growth is None or state.target is None:
        return state, None
    if not usable or not 1 <= period <= MAX_PERIOD:
        return state, None
    proposal = propose(state, cfg, period, step=step)
    if proposal.guard is not None:
        state = dataclasses.replace(
            state,
            target=state.target / 2.0,
            guard_wait=cfg.guard_cooldown,
            loss_avgs=(),
            jumps=(),
            note=f"loss guard at step {step}: {proposal.guard}; target halved to {_fmt(state.target / 2.0)}",
        )
    return state, proposal


# ------------------------------------------------------------------------------------------ the rule


def loss_guard(state: AutotuneState, cfg: AutotuneConfig) -> str | None:
    """Why the loss says the models drift too far, or None."""
    if state.guard_wait > 0:
        return None
    if len(state.jumps) == 2 and min(state.jumps) > cfg.loss_jump:
        a, b = state.jumps
        return f"loss jumped {a:+.0%}, {b:+.0%} right after the last two rounds (threshold {cfg.loss_jump:+.0%})"
    if len(state.loss_avgs) == 3:
        a, b, c = state.loss_avgs
        if b > a * (1.0 + cfg.loss_rise) and c > b * (1.0 + cfg.loss_rise):
            return f"loss average rose two rounds in a row ({_fmt(a)} -> {_fmt(b)} -> {_fmt(c)})"
    return None


def propose(state: AutotuneState, cfg: AutotuneConfig, period: int, *, step: int = 0) -> Proposal:
    """The period for the next rounds: ``delta*/g``, bounded, or half the period when the loss guard fires.

    Order: the raw ``delta*/g``; a ``gain`` step toward it in log space; the x0.5..x2 limit; the
    [tau_min, tau_max] clamp; the dead band (hold when that is within 10% of ``period``, 20% when it
    would reverse the last change); rounding.
    """
    if state.growth is None or state.target is None:
        raise ValueError("propose needs a growth estimate and a target")
    growth = max(state.growth, 1e-300)
    raw = min(state.target / growth, _RAW_MAX)  # a target of 1e308 over a growth of 1e-300 is inf
    tau_cost = cost_floor(state.t_comm, state.t_step, cfg.comm_share)
    guard = loss_guard(state, cfg)
    limits: list[str] = []
    if guard is not None:
        new = max(cfg.tau_min, period // 2)
        if new == period:
            limits.append(f"already at tau_min {cfg.tau_min}")
    else:
        want = period * (raw / period) ** cfg.gain
        if want > period * cfg.max_change:
            want = period * cfg.max_change
            limits.append(f"limited to x{cfg.max_change:g}")
        elif want < period / cfg.max_change:
            want = period / cfg.max_change
            limits.append(f"limited to x1/{cfg.max_change:g}")
        if want > cfg.tau_max:
            want = cfg.tau_max
            limits.append(f"clamped to tau_max {cfg.tau_max}")
        elif want < cfg.tau_min:
            want = cfg.tau_min
            limits.append(f"clamped to tau_min {cfg.tau_min}")
        # Round inside the limits: x2 of 3 is 6, x0.5 of 3 is 2 (not 1).
        low = max(cfg.tau_min, math.ceil(period / cfg.max_change - 1e-9))
        high = min(cfg.tau_max, math.floor(period * cfg.max_change + 1e-9))
        if low <= high:
            new = min(max(math.floor(want + 0.5), low), high)
        else:  # a period far outside [tau_min, tau_max]: move toward it by the most one change allows
            new = low if period > cfg.tau_max else high
        reverses = (want - period) * state.direction < 0
        band = cfg.dead_band * (2.0 if reverses else 1.0)
        if new != period and abs(want - period) < band * period:
            limits.append(f"{want:.3g} is within {band:.0%} of {period}{' (a reversal)' if reverses else ''}")
            new = period
    bound = tau_cost is not None and new < tau_cost
    figures = f"delta {_fmt(state.delta or 0.0)}, growth {_fmt(growth)}/step, target {_fmt(state.target)}: delta*/g = {raw:.1f}"
    action = figures if guard is None else f"{figures}; loss guard: {guard}; halving"
    verdict = f"period {new} (from {period})" if new != period else f"hold period {period}"
    reason = f"{action} -> {verdict}"
    if limits:
        reason += f" ({'; '.join(limits)})"
    if bound:
        reason += (
            f"; communication-bound: under the cost floor {tau_cost} "
            f"(averaging {state.t_comm * 1e3:.3g} ms vs {state.t_step * 1e3:.3g} ms a step, rho {cfg.comm_share:.0%})"
        )
    return Proposal(
        step=step,
        current=period,
        period=new,
        reason=reason,
        delta=state.delta if state.delta is not None else 0.0,
        growth=growth,
        target=state.target,
        raw_period=raw,
        tau_cost=tau_cost,
        communication_bound=bound,
        guard=guard,
    )
