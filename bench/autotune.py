"""Autopilot benchmark: fixed averaging periods against the autopilot, on the demo task.

Run: ``.venv/bin/python bench/autotune.py`` (about 2 minutes on 2 idle cores). Four spawned gloo ranks
(one intra-op thread each) train the demo task (``avgctl.worker.demo``: non-IID Gaussian mixture,
small MLP, batch size 32, ``--seed`` 0 by default) for the same number of steps, once per fixed period (1, 2, 4, 8,
16, 32) and once with the autopilot. Every run sees the same data stream and the same initial weights.
The training loop is ``demo.train``'s (same data, optimizer, lr schedule and final average), written
out here so rank 0 can watch rounds: after each round the ranks hold the average, so rank 0 evaluates
it on the demo's held-out set every ``--eval-every`` steps (time excluded from wall time).

The task's settings differ from the demo's interactive defaults on purpose (``--lr-schedule cosine``,
``--skew 1.0``). At a constant lr the held-out loss settles after ~300 steps at a noise floor that
moves it +-2% from one evaluation to the next, more than the periods' differences, so the final
figure ranked runs by noise; with the lr decaying to 0 the last evaluations agree to 0.1%. Cosine
decay is also the regime a divergence budget is for: the divergence a period gathers falls with the
lr, so a fixed period that is short enough early averages more often than needed late. Each rank
seeing only its own classes (skew 1.0) makes the period matter: final losses spread ~2% from period 1
to 32, in the order of the period.

The autopilot runs in-process on rank 0: the server's pure rule (``avgctl.server.autotune``, default
``AutotuneConfig`` but ``tau_max``) fed with the averager's RoundRecords and StepRecords, issuing
``set_period`` through an ``InProcessControlSource`` (one command pending at a time), so no server is
needed. Rank 0 sees only its own records: delta_r is ``relative_mean ** 2`` (see ``round_delta``) and
the loss guard reads rank 0's loss. It starts at ``--start-period`` (the person's period) and
calibrates its target there, after the first rounds' transient (``calibration_skip``): it keeps that
period's divergence, so it cannot be expected to beat that fixed period's loss, only its rounds.

Phased schedules (``--schedules``, ``A:S:B[:S2:C...]``: period A until step S, then B...) show where
rounds pay on this task. The defaults: 16 then 4 from step 750 against 4 then 16 (the same rounds
either way; late rounds pay: +1.02% against +1.30% from the best fixed loss at seed 0), and 16 with
period 4 only for steps 1125-1400 (144 rounds), the best of the hand-made schedules tried: +1.14%,
+0.72% and +1.42% at seeds 0, 1 and 2 (within the goal at seed 1 only).
Early rounds are forgotten and the last ones, at an lr near 0, have little left to fix. A divergence
budget moves the other way: as the lr decays, the divergence a period gathers falls and the period
grows; the loss guard's halvings are what shorten it late.

Goal (from the issue): no fixed period better on both final loss and rounds; the autopilot within 1%
of the best fixed final loss with at most half the rounds of the fixed period that gets there.
Writes a plot (``--plot``, default ``docs/autotune.png``): held-out loss against rounds, every round's
delta_r against steps, and the autopilot's period."""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from gloo_ranks import gloo_rank, spawned_ranks  # bench/ is first on sys.path when this runs as a script
from torch import nn

from avgctl.protocol import ControlEvent, RoundRecord, SetPeriod, StepRecord
from avgctl.server import autotune as at
from avgctl.worker import InProcessControlSource, demo

GOAL_LOSS = 0.01  # within 1% of the best fixed final loss
GOAL_ROUNDS = 0.5  # with at most half the rounds


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    period: int
    autopilot: bool = False
    switches: tuple[tuple[int, int], ...] = ()
    """A phased schedule: (step, period) pairs, each switched to once its step is reached."""


def parse_schedule(text: str) -> Spec:
    """``A:S:B[:S2:C...]``: period A until step S, then period B (until step S2, then C...)."""
    bad = ValueError(f"a schedule is A:S:B[:S2:C...] with periods >= 1 and rising steps S, got {text!r}")
    try:
        first, *rest = (int(x) for x in text.split(":"))
    except ValueError:
        raise bad from None
    switches = tuple(zip(rest[0::2], rest[1::2]))
    steps = [step for step, _ in switches]
    if not rest or len(rest) % 2 or steps != sorted(set(steps)) or min(first, *(p for _, p in switches)) < 1:
        raise bad
    name = " then ".join([str(first)] + [f"{period} @{step}" for step, period in switches])
    return Spec(name, first, switches=switches)


class Watcher:
    """Rank 0's listener: held-out loss of the averaged model after rounds, and the period in force."""

    def __init__(self, model: nn.Module, centers: torch.Tensor, seed: int, eval_every: int):
        self.model, self.centers, self.seed, self.eval_every = model, centers, seed, eval_every
        self.rounds = 0
        self.next_eval = 0
        self.eval_seconds = 0.0
        self.curve: list[tuple[int, int, float]] = []  # (rounds so far, step, held-out loss)
        self.periods: list[tuple[int, int]] = []  # (step, period) at every change
        self.deltas: list[tuple[int, float]] = []  # (step, relative_mean ** 2) at every round

    def on_step(self, record: StepRecord) -> None:
        pass

    def on_round(self, record: RoundRecord) -> None:
        self.rounds += 1
        self.deltas.append((record.step, record.relative_mean**2))
        if record.step >= self.next_eval:
            started = time.perf_counter()
            loss, _ = demo.evaluate(self.model, self.centers, self.seed)
            self.curve.append((self.rounds, record.step, loss))
            self.eval_seconds += time.perf_counter() - started
            self.next_eval = record.step + self.eval_every

    def on_control(self, event: ControlEvent) -> None:
        self.periods.append((event.step, event.control.period))


class Switcher:
    """Rank 0's hand-made schedule: a ``set_period`` once each switch's step is reached."""

    def __init__(self, averager, switches: tuple[tuple[int, int], ...]):
        self.source = InProcessControlSource()
        averager.set_control_source(self.source)
        self.switches = list(switches)

    def on_step(self, record: StepRecord) -> None:
        if self.switches and record.step >= self.switches[0][0]:
            self.source.submit(SetPeriod(period=self.switches.pop(0)[1]))

    def on_round(self, record: RoundRecord) -> None:
        pass

    def on_control(self, event: ControlEvent) -> None:
        pass


class LocalPilot:
    """The autopilot's rule on rank 0: records in, ``set_period`` out through the control source."""

    def __init__(self, averager, world: int, config: at.AutotuneConfig, target: float | None):
        self.averager, self.world, self.config = averager, world, config
        self.source = InProcessControlSource()
        averager.set_control_source(self.source)
        self.state = at.switch(at.AutotuneState(), True, target)
        self.pending: int | None = None
        self.changes: list[at.Proposal] = []
        self.calibrated: float | None = target  # the budget before any loss-guard halving

    def on_step(self, record: StepRecord) -> None:
        self.state = at.observe_steps(self.state, self.config, [(record.step, record.loss, record.step_time)])

    def on_round(self, record: RoundRecord) -> None:
        if self.pending is not None and self.pending in self.source.acks():
            self.pending = None
        delta = at.round_delta([record.relative_divergence], self.world, record.relative_mean)
        self.state, proposal = at.observe_round(
            self.state,
            self.config,
            step=record.step,
            delta=delta,
            seconds=record.seconds,
            period=self.averager.control.period,
        )
        if self.calibrated is None:
            self.calibrated = self.state.target
        if proposal is not None and proposal.changed and self.pending is None:
            self.pending = self.source.submit(SetPeriod(period=proposal.period))
            self.changes.append(proposal)

    def on_control(self, event: ControlEvent) -> None:
        pass


def run(spec: Spec, rank: int, world: int, args: argparse.Namespace) -> dict | None:
    """One training run on every rank (``demo.train``'s loop); rank 0 returns its figures."""
    cfg = demo.DemoConfig(
        steps=args.steps,
        period=spec.period,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        skew=args.skew,
        seed=args.seed,
        quiet=True,
    )
    centers = demo.class_centers(cfg.seed)
    model = demo.make_model(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    averager = demo.make_averager(cfg, world)
    averager.name_parameters(model)
    watcher = pilot = None
    if rank == 0:
        watcher = Watcher(model, centers, cfg.seed, args.eval_every)
        averager.add_listener(watcher)
        if spec.switches:
            averager.add_listener(Switcher(averager, spec.switches))
        if spec.autopilot:
            config = at.AutotuneConfig(tau_min=1, tau_max=args.tau_max)
            pilot = LocalPilot(averager, world, config, args.target)
            averager.add_listener(pilot)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    dist.barrier()
    started = time.perf_counter()
    while averager.step < cfg.steps:
        labels = demo.rank_labels(rank, world, cfg.batch_size, cfg.skew, gen)
        x = demo.sample(centers, labels, gen)
        demo.set_lr(opt, demo.lr_at(cfg, averager.step))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        averager.record(loss=loss.item())
        averager.average_parameters(model.parameters())
    with torch.no_grad():  # the demo's final average: every rank ends with the same model
        for p in model.parameters():
            dist.all_reduce(p)
            p /= world
    dist.barrier()
    wall = time.perf_counter() - started
    if rank != 0:
        return None
    final_loss, accuracy = demo.evaluate(model, centers, cfg.seed)
    metrics = averager.metrics
    return {
        "name": spec.name,
        "period": spec.period,
        "autopilot": spec.autopilot,
        "schedule": bool(spec.switches),
        "final_loss": final_loss,
        "accuracy": accuracy,
        "rounds": metrics.rounds,
        "bytes": metrics.bytes_moved,
        "averaging_seconds": metrics.averaging_seconds,
        "wall": wall - watcher.eval_seconds,
        "curve": watcher.curve + [(metrics.rounds, cfg.steps, final_loss)],
        "periods": [(0, spec.period)] + watcher.periods,
        "deltas": watcher.deltas,
        "changes": [(p.step, p.current, p.period, p.reason) for p in pilot.changes] if pilot else [],
        "target": pilot.calibrated if pilot else None,
        "final_target": pilot.state.target if pilot else None,
    }


def _rank_main(rank: int, world: int, store_path: str, specs: list[Spec], args, results) -> None:
    warnings.filterwarnings("ignore", message="When period is 1")  # torch's hint for period 1
    with gloo_rank(rank, world, store_path):
        for spec in specs:
            out = run(spec, rank, world, args)
            if out is not None:
                results.put(out)


# ------------------------------------------------------------------------------ report


def table(results: list[dict]) -> str:
    best = min(r["final_loss"] for r in results if not (r["autopilot"] or r["schedule"]))
    width = max(14, *(len(r["name"]) for r in results))
    lines = [
        f"{'run':<{width}} {'final loss':>10} {'vs best':>8} {'accuracy':>8} {'rounds':>7} {'MB moved':>9} {'wall s':>7} {'avg s':>6}",
    ]
    for r in results:
        lines.append(
            f"{r['name']:<{width}} {r['final_loss']:>10.4f} {100 * (r['final_loss'] / best - 1):>+7.2f}% {r['accuracy']:>8.3f} "
            f"{r['rounds']:>7} {r['bytes'] / 1e6:>9.1f} {r['wall']:>7.1f} {r['averaging_seconds']:>6.1f}"
        )
    return "\n".join(lines)


def verdict(results: list[dict]) -> list[str]:
    fixed = [r for r in results if not (r["autopilot"] or r["schedule"])]
    auto = next(r for r in results if r["autopilot"])
    best = min(r["final_loss"] for r in fixed)
    near = [r for r in fixed if r["final_loss"] <= best * (1 + GOAL_LOSS)]
    cheapest = min(near, key=lambda r: r["rounds"])
    dominating = [
        r["name"]
        for r in fixed
        if r["final_loss"] <= auto["final_loss"]
        and r["rounds"] <= auto["rounds"]
        and (r["final_loss"] < auto["final_loss"] or r["rounds"] < auto["rounds"])
    ]

    def meets(r: dict) -> tuple[bool, bool]:
        return r["final_loss"] <= best * (1 + GOAL_LOSS), r["rounds"] <= GOAL_ROUNDS * cheapest["rounds"]

    within, half = meets(auto)
    return [
        f"best fixed final loss {best:.4f}; within 1% of it: {', '.join(r['name'] for r in near)}; "
        f"the fewest rounds among those: {cheapest['name']} ({cheapest['rounds']})",
        f"autopilot: final loss {auto['final_loss']:.4f} ({100 * (auto['final_loss'] / best - 1):+.2f}% vs best), "
        f"{auto['rounds']} rounds ({auto['rounds'] / cheapest['rounds']:.2f}x {cheapest['name']})",
        f"fixed periods better on both loss and rounds: {', '.join(dominating) or 'none'}",
        *(
            f"schedule {r['name']}: {100 * (r['final_loss'] / best - 1):+.2f}% at {r['rounds']} rounds"
            f"{' (within the goal)' if all(meets(r)) else ''}"
            for r in results
            if r["schedule"]
        ),
        f"goal (within 1% with <= half the rounds of {cheapest['name']}): "
        f"{'MET' if within and half else 'NOT MET'} (within 1%: {'yes' if within else 'no'}; half the rounds: {'yes' if half else 'no'})",
    ]


def plot(results: list[dict], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8), dpi=90, gridspec_kw={"width_ratios": [3, 3, 2]})
    for r in results:
        style = dict(color="black", linewidth=1.5) if r["autopilot"] else dict(linewidth=0.8, alpha=0.8)
        deltas = [(step, d) for step, d in r["deltas"] if d > 0.0]
        middle.plot([s for s, _ in deltas], [d for _, d in deltas], label=r["name"], **style)
    auto = next(r for r in results if r["autopilot"])
    if auto["target"]:
        middle.axhline(auto["target"], color="black", linestyle=":", linewidth=1.0, label="autopilot target")
    middle.set_yscale("log")
    middle.set_xlabel("step")
    middle.set_ylabel("delta_r = relative divergence^2")
    middle.set_title("divergence at each round", fontsize=9)
    middle.grid(alpha=0.3)
    middle.legend(fontsize=6, ncol=2)
    for r in results:
        xs = [max(rounds, 1) for rounds, _, _ in r["curve"]]
        ys = [loss for _, _, loss in r["curve"]]
        style = dict(color="black", linewidth=2.0) if r["autopilot"] else dict(linewidth=1.0, alpha=0.85)
        left.plot(xs, ys, label=r["name"], **style)
    left.set_xscale("log")
    left.set_xlabel("averaging rounds (log)")
    left.set_ylabel("held-out loss of the average")
    left.set_ylim(top=min(2.0, left.get_ylim()[1]))
    left.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    left.set_title("loss vs rounds, same steps", fontsize=9)
    xs, ys = [], []
    for step, period in auto["periods"]:
        if xs:
            xs.append(step)
            ys.append(ys[-1])
        xs.append(step)
        ys.append(period)
    xs.append(steps)
    ys.append(ys[-1])
    right.plot(xs, ys, color="black")
    right.set_yscale("log", base=2)
    right.set_xlabel("step")
    right.set_ylabel("period")
    right.set_title("the autopilot's period", fontsize=9)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (the demo's default)")
    parser.add_argument("--lr-schedule", choices=demo.LR_SCHEDULES, default="cosine")
    parser.add_argument("--skew", type=float, default=1.0, help="share of a rank's data from its own classes")
    parser.add_argument("--seed", type=int, default=0, help="the task's seed: class centers, weights and data")
    parser.add_argument("--periods", default="1,2,4,8,16,32", help="fixed periods, comma-separated")
    parser.add_argument(
        "--schedules",
        default="16:750:4,4:750:16,16:1125:4:1400:16",
        help="hand-made schedules A:S:B[:S2:C...] (period A until step S, then B, ...), comma-separated; "
        "they show which part of training the period matters in",
    )
    parser.add_argument("--start-period", type=int, default=8, help="the autopilot's starting (the person's) period")
    parser.add_argument("--target", type=float, default=None, help="target divergence (default: calibrate)")
    parser.add_argument("--tau-max", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    parser.add_argument("--plot", default="docs/autotune.png", help="PNG path ('' for none)")
    parser.add_argument("--results", default="", help="also write every run's figures and curves to this JSON file")
    args = parser.parse_args(argv)
    periods = [int(p) for p in args.periods.split(",") if p]
    specs = [Spec(f"fixed {p}", p) for p in periods]
    try:
        specs += [parse_schedule(text) for text in args.schedules.split(",") if text]
    except ValueError as err:
        parser.error(str(err))
    specs.append(Spec(f"autopilot ({args.start_period})", args.start_period, True))

    started = time.perf_counter()
    results = []
    with spawned_ranks(_rank_main, args.world, (specs, args)) as next_result:
        for _ in specs:
            out = next_result(900)
            results.append(out)
            print(f"  {out['name']}: {out['wall']:.0f}s", flush=True)
    print(
        f"\n{args.world} ranks x {args.steps} steps, lr {args.lr:g} {args.lr_schedule}, skew {args.skew:g}, seed {args.seed}; "
        f"total {time.perf_counter() - started:.0f}s\n"
    )
    print(table(results))
    auto = next(r for r in results if r["autopilot"])
    how = "set by --target" if args.target is not None else f"calibrated at period {args.start_period}"
    if auto["target"] is None:  # a run too short to calibrate
        budget = f"no target (still calibrating at period {args.start_period} when the run ended)"
    else:
        budget = f"target {auto['target']:.3g} ({how}; {auto['final_target']:.3g} after the loss guard's halvings)"
    print(f"\nautopilot: {budget}; {len(auto['changes'])} set_period commands:")
    for step, old, new, reason in auto["changes"]:
        print(f"  step {step:>5}: {old} -> {new}: {reason}")
    print()
    for line in verdict(results):
        print(line)
    if args.results:
        with open(args.results, "w") as f:
            json.dump(results, f)
    if args.plot:
        plot(results, args.plot, args.steps)
        print(f"\nplot: {args.plot} ({os.path.getsize(args.plot) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
