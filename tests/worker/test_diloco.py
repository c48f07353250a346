"""DiLoCoAverager on real gloo ranks: the paper's algorithm, live control of the outer lr, checkpoints."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from torch.distributed.optim import PostLocalSGDOptimizer

from avgctl.protocol import CommandAck, SetOuterLr
from avgctl.worker import DiLoCoAverager, InProcessControlSource, PeriodicAverager
from avgctl.worker import control_state as cs
from tests.support.distributed import run_ranks
from tests.support.workloads import RoundLog, flat_copy, make_model, sgd_step

pytestmark = pytest.mark.dist


def _outer(model):
    return torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)


class Reference:
    """DiLoCo as the paper writes it, on separate tensors with plain all-reduces."""

    def __init__(self, model, outer, period, warmup):
        self.model, self.outer, self.period, self.warmup = model, outer, period, warmup
        self.step, self.global_params = 0, None

    def __call__(self) -> None:
        step, self.step = self.step, self.step + 1
        if step < self.warmup or (step - self.warmup) % self.period:
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        means = [p.detach().clone() for p in params]
        for m in means:
            dist.all_reduce(m)
            m /= dist.get_world_size()
        if self.global_params is None:  # the first round: a plain average, which becomes θ_g
            for p, m in zip(params, means):
                p.data.copy_(m)
            self.global_params = means
            return
        for p, g, m in zip(params, self.global_params, means):
            p.grad = g - m
            p.data.copy_(g)
        self.outer.step()
        self.global_params = [p.detach().clone() for p in params]


def _against_reference(rank, world):
    out = {}
    for name, period, warmup, wrapped in [("p3", 3, 0, False), ("p4_w5", 4, 5, False), ("p3_postlocal", 3, 2, True)]:
        ref, mine = make_model(), make_model()
        ref_inner = torch.optim.SGD(ref.parameters(), lr=0.05)
        reference = Reference(ref, _outer(ref), period, warmup)
        averager = DiLoCoAverager(_outer(mine), period=period, warmup_steps=warmup)
        log = RoundLog()
        averager.add_listener(log)
        inner = torch.optim.SGD(mine.parameters(), lr=0.05)
        if wrapped:  # torch's wrapper hands the averager the inner optimizer's param groups
            inner = PostLocalSGDOptimizer(inner, averager)
        worst = 0.0
        for step in range(25):
            sgd_step(ref, ref_inner, rank, step)
            reference()
            sgd_step(mine, inner, rank, step)
            if not wrapped:
                averager.average_parameters(mine.parameters())
            worst = max(worst, float((flat_copy(ref) - flat_copy(mine)).abs().max()))
        averager.flush()
        last = averager.metrics.last_round
        out[name] = (worst, log.rounds, last.pseudo_gradient_norm > 0, last.outer_lr)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_diloco_equals_the_papers_algorithm(world):
    results = run_ranks(_against_reference, world)
    for result in results:
        for name, (worst, _rounds, has_delta, lr) in result.items():
            assert worst < 1e-5, (name, worst)  # float rounding only: our mean divides first
            assert has_delta and lr == 0.7
        assert result["p3"][1] == list(range(0, 25, 3))
        assert result["p4_w5"][1] == list(range(5, 25, 4))
    assert all({k: v[1] for k, v in r.items()} == {k: v[1] for k, v in results[0].items()} for r in results)


def _storm(rank, world):
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    outer = _outer(model)
    averager = DiLoCoAverager(outer, period=3)
    source = InProcessControlSource()
    averager.set_control_source(source)  # only rank 0's counts
    rng = random.Random(7)
    for step in range(60):
        if rank == 0 and rng.random() < 0.4:
            kind = rng.choice(["lr", "lr", "period", "now", "pause", "resume"])
            body = {
                "lr": {"type": "set_outer_lr", "lr": rng.choice([0.1, 0.35, 0.7, 1.1])},
                "period": {"type": "set_period", "period": rng.randint(1, 5)},
                "now": {"type": "average_now"},
                "pause": {"type": "pause_averaging"},
                "resume": {"type": "resume_averaging"},
            }[kind]
            source.submit(body)
        sgd_step(model, inner, rank, step)
        rounds = averager.metrics.rounds
        averager.average_parameters(model.parameters())
        if averager.metrics.rounds > rounds:  # after every round: one lr and one set of parameters
            lrs = [g["lr"] for g in outer.param_groups]
            mine = torch.tensor([*lrs, *flat_copy(model).tolist()], dtype=torch.float64)
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            assert all(torch.equal(g, gathered[0]) for g in gathered), f"ranks differ after step {step}"
    averager.flush()
    # (commands sent in the last steps may not have reached an exchange: they stay unacknowledged)
    applied = [a.status for a in source.acks().values()].count("applied")
    return averager.control.outer_lr, applied, averager.metrics.rounds


@pytest.mark.parametrize("world", [2, 3])
def test_outer_lr_storms_never_leave_ranks_apart(world):
    results = run_ranks(_storm, world)
    assert len({(lr, rounds) for lr, _, rounds in results}) == 1
    assert results[0][1] > 5  # rank 0 applied a good share of the storm


def _resume(rank, world):
    def run(steps, start=None):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        outer = _outer(model)
        averager = DiLoCoAverager(outer, period=4)
        if start is not None:
            model.load_state_dict(start["model"])
            inner.load_state_dict(start["inner"])
            outer.load_state_dict(start["outer"])
            averager.load_state_dict(start["averager"])
        while averager.step < steps:
            sgd_step(model, inner, rank, averager.step)
            averager.average_parameters(model.parameters())
        saved = {
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "inner": inner.state_dict(),
            "outer": outer.state_dict(),
            "averager": averager.state_dict(),
        }
        return flat_copy(model), saved

    straight, _ = run(26)
    _, checkpoint = run(14)  # saved between rounds, after three outer steps
    resumed, _ = run(26, start=checkpoint)
    return bool(torch.equal(straight, resumed)), checkpoint["averager"]["global_params"] is not None


def _resume_and_plain(rank, world):
    return _resume(rank, world), _plain_rejects(rank, world)  # one set of ranks for both


def test_a_resumed_run_ends_where_an_uninterrupted_one_does_and_a_plain_averager_rejects_set_outer_lr():
    results = run_ranks(_resume_and_plain, 2)
    assert [resumed for resumed, _ in results] == [(True, True)] * 2
    assert results[0][1] == ("rejected", True)


def test_set_outer_lr_is_rejected_with_a_reason_and_changes_nothing():
    periodic = cs.periodic_state(4, 0)
    with pytest.raises(cs.CommandRejected, match="DiLoCo"):
        cs.apply_command(periodic, SetOuterLr(lr=0.3), 10)
    diloco = cs.diloco_state(4, 0)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):  # past the model's own check (as a bug would be)
        with pytest.raises(cs.CommandRejected, match="finite and above 0"):
            cs.apply_command(diloco, SetOuterLr.model_construct(lr=bad), 10)
    applied = cs.apply_command(diloco, SetOuterLr(lr=0.35), 10)
    assert (applied.outer_lr, applied.version, applied.anchor) == (0.35, 1, 0)
    # The exchange carries the lr exactly.
    assert cs.decode(cs.encode(applied), diloco).outer_lr == 0.35
    with pytest.raises(ValueError):
        SetOuterLr(lr=float("nan"))
    with pytest.raises(ValueError):
        InProcessControlSource().submit({"type": "set_outer_lr", "lr": -0.1})


def _plain_rejects(rank, world):
    averager = PeriodicAverager(period=2)
    source = InProcessControlSource()
    averager.set_control_source(source)
    cid = source.submit(SetOuterLr(lr=0.3)) if rank == 0 else None
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        sgd_step(model, opt, rank, step)
        averager.average_parameters(model.parameters())
    averager.flush()
    ack: CommandAck | None = source.result(cid, timeout=10) if cid is not None else None
    return None if ack is None else (ack.status, "DiLoCo" in (ack.reason or ""))
