"""With no commands our averagers average at torch's steps to torch's values (real gloo ranks)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import HierarchicalModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer

from avgctl.worker import HierarchicalAverager, PeriodicAverager
from tests.support.distributed import run_ranks
from tests.support.workloads import RoundLog, flat_copy, make_model, sgd_step

pytestmark = pytest.mark.dist


def _torch_round_steps(averager, model, params_fn, steps, rank, opt):
    rounds = []
    for step in range(steps):
        sgd_step(model, opt, rank, step)
        before = flat_copy(model)
        averager.average_parameters(params_fn(model, opt))
        if not torch.equal(before, flat_copy(model)):
            rounds.append(step)
    return rounds


def _compare(rank, make_torch, make_ours, params_fn, steps=30, dtype=torch.float32):
    """Train twin models side by side; params must be bit-identical after every step."""
    ref, mine = make_model(dtype=dtype), make_model(dtype=dtype)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    my_opt = torch.optim.SGD(mine.parameters(), lr=0.05, momentum=0.9)
    ref_avg, my_avg = make_torch(), make_ours()
    log = RoundLog()
    my_avg.add_listener(log)
    ref_rounds = []
    for step in range(steps):
        sgd_step(ref, ref_opt, rank, step)
        sgd_step(mine, my_opt, rank, step)
        before = flat_copy(ref)
        ref_avg.average_parameters(params_fn(ref, ref_opt))
        my_avg.average_parameters(params_fn(mine, my_opt))
        if not torch.equal(before, flat_copy(ref)):
            ref_rounds.append(step)
        assert torch.equal(flat_copy(ref), flat_copy(mine)), f"rank {rank}: values differ after step {step}"
    assert ref_avg.step == my_avg.step == steps
    my_avg.flush()  # the last round's record rides on an exchange no later step collects
    assert log.rounds == ref_rounds, (log.rounds, ref_rounds)
    return log.rounds, my_avg.metrics.fallback_reason


def _by_params(model, opt):
    return model.parameters()


def _by_groups(model, opt):
    return opt.param_groups


def _periodic_cases(rank, world):
    out = {}
    for name, period, warmup, params_fn in [
        ("p3_w0_params", 3, 0, _by_params),
        ("p4_w5_groups", 4, 5, _by_groups),
        ("p2_w7_params", 2, 7, _by_params),
    ]:
        out[name] = _compare(
            rank,
            lambda: PeriodicModelAverager(period=period, warmup_steps=warmup),
            lambda: PeriodicAverager(period=period, warmup_steps=warmup),
            params_fn,
        )
    return out


def test_periodic_parity_two_ranks():
    results = run_ranks(_periodic_cases, 2)
    p3 = results[0]["p3_w0_params"]
    assert p3[0] == list(range(0, 30, 3)) and p3[1] is None
    assert results[0]["p4_w5_groups"][0] == list(range(5, 30, 4))  # anchored at the end of warm-up
    assert results[0] == results[1]


def test_periodic_parity_three_ranks():
    # Three ranks: the exchange is its own collective (started after each round, collected a step
    # later) and the all-reduce is gloo's ring; values must still match torch's bit for bit.
    results = run_ranks(_periodic_cases, 3, timeout=240)
    assert results[0]["p3_w0_params"][0] == list(range(0, 30, 3))
    assert results[0] == results[1] == results[2]


def _mixed_dtype(rank, world):
    def make_mixed(low):
        model = make_model()
        model[2].to(low)  # a bf16 (or fp64) layer beside fp32 ones: one flat buffer per dtype
        return model

    out = {}
    for low in (torch.bfloat16, torch.float64):
        ref, mine = make_mixed(low), make_mixed(low)
        ref_opt, my_opt = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(mine.parameters(), lr=0.1)
        ref_avg, my_avg = PeriodicModelAverager(period=2), PeriodicAverager(period=2)
        for step in range(12):
            for model, opt, avg in ((ref, ref_opt, ref_avg), (mine, my_opt, my_avg)):
                gen = torch.Generator().manual_seed(rank * 7 + step)
                x, y = torch.randn(4, 8, generator=gen), torch.zeros(4, 4)
                opt.zero_grad()
                model[2](model[1](model[0](x)).to(low)).float().sub(y).pow(2).mean().backward()
                opt.step()
                avg.average_parameters(model.parameters())
            assert torch.equal(flat_copy(ref), flat_copy(mine)), (low, step)
        out[str(low)] = (my_avg.metrics.fallback_reason, my_avg.metrics.rounds)
    return out


def _set_changes(rank, world):
    """A layer frozen at the start, unfrozen mid-run, another frozen later: torch's values throughout."""
    ref, mine = make_model(), make_model()
    for model in (ref, mine):
        model[2].weight.requires_grad_(False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    my_opt = torch.optim.SGD(mine.parameters(), lr=0.05)
    ref_avg, my_avg = PeriodicModelAverager(period=3), PeriodicAverager(period=3)
    worst = 0.0
    for step in range(24):
        if step == 7:  # unfrozen between rounds: the round at step 9 averages it, as torch's does
            for model in (ref, mine):
                model[2].weight.requires_grad_(True)
        if step == 15:  # the round at step 15 itself: leaves the set with its grad gone
            for model in (ref, mine):
                model[0].bias.requires_grad_(False)
                model[0].bias.grad = None
        sgd_step(ref, ref_opt, rank, step)
        sgd_step(mine, my_opt, rank, step)
        ref_avg.average_parameters(ref.parameters())
        my_avg.average_parameters(mine.parameters())
        assert torch.equal(flat_copy(ref), flat_copy(mine)), f"rank {rank}: values differ after step {step}"
        if step == 9:
            gathered = [torch.empty_like(mine[2].weight) for _ in range(world)]
            torch.distributed.all_gather(gathered, mine[2].weight.detach())
            worst = max(float((g - gathered[0]).abs().max()) for g in gathered)
    return worst


def _mixed_and_changing(rank, world):
    return _mixed_dtype(rank, world), _set_changes(rank, world)  # one set of ranks for both


@pytest.mark.parametrize("world", [2, 3])  # two ranks: the change is read from the tail; three: a pre-check
def test_mixed_dtypes_and_parameter_set_changes_keep_torchs_steps_and_values(world):
    mixed = {"torch.bfloat16": (None, 6), "torch.float64": (None, 6)}  # the fast path, no fallback
    # After the round that follows the unfreeze, the unfrozen layer is equal on every rank.
    assert run_ranks(_mixed_and_changing, world) == [(mixed, 0.0)] * world


def _post_local_sgd(rank, world):
    ref, mine = make_model(), make_model()
    ref_opt = PostLocalSGDOptimizer(torch.optim.SGD(ref.parameters(), lr=0.05), PeriodicModelAverager(3, 4))
    my_avg = PeriodicAverager(3, 4)
    my_opt = PostLocalSGDOptimizer(torch.optim.SGD(mine.parameters(), lr=0.05), my_avg)
    for step in range(25):
        sgd_step(ref, ref_opt, rank, step)
        sgd_step(mine, my_opt, rank, step)
        assert torch.equal(flat_copy(ref), flat_copy(mine)), step
    # PostLocalSGDOptimizer checkpoints carry our step like torch's.
    state = my_opt.state_dict()
    assert state["step"] == 25
    return my_avg.metrics.rounds


def test_post_local_sgd_optimizer_parity():
    assert run_ranks(_post_local_sgd, 2) == [7, 7]  # steps 4, 7, ..., 22


def _hierarchical(rank, world):
    out = {}
    for warmup in (0, 5):
        hierarchy = {2: 2, 6: world}
        out[warmup] = _compare(
            rank,
            lambda: HierarchicalModelAverager(period_group_size_dict=hierarchy, warmup_steps=warmup),
            lambda: HierarchicalAverager(period_group_size_dict=hierarchy, warmup_steps=warmup),
            _by_groups if warmup else _by_params,
            steps=26,
        )[0]
    return out


def _hierarchies(rank, world):
    return _hierarchical(rank, world), _repeated_sizes(rank, world)  # one set of four ranks for both


def test_hierarchical_parity_four_ranks_also_for_hierarchies_that_repeat_a_group_size():
    results = run_ranks(_hierarchies, 4, timeout=180)
    plain, repeated = results[0]
    # torch anchors hierarchical periods at step 0, not at the end of warm-up.
    assert plain[0] == [s for s in range(26) if s % 2 == 0]
    assert plain[5] == [s for s in range(6, 26) if s % 2 == 0]
    # Repeated sizes are canonicalised (one warning each): the same steps and values as torch's.
    assert repeated == {
        "{2: 2, 4: 2, 8: 4}": ({"2": 2, "4": 8}, 9, [True]),
        "{2: 4, 4: 4}": ({"4": 2}, 9, [True]),
    }
    assert all(r == results[0] for r in results)


def _repeated_sizes(rank, world):
    """Hierarchies torch accepts that repeat a group size: canonicalised, same steps and values."""
    out = {}
    for hierarchy in ({2: 2, 4: 2, 8: world}, {2: world, 4: world}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mine = HierarchicalAverager(period_group_size_dict=hierarchy)
        # torch's attributes, with the periods it averages at
        assert list(mine.period_process_group_dict) == list(mine.control.periods)
        assert mine.step == 0 and mine.warmup_steps == 0
        rounds = _compare(
            rank,
            lambda: HierarchicalModelAverager(period_group_size_dict=hierarchy),
            lambda: mine,
            _by_params,
            steps=17,
        )[0]
        out[str(hierarchy)] = (
            dict(mine.control_view().hierarchy),
            len(rounds),
            ["repeats a group size" in str(w.message) for w in caught],
        )
    return out


def _ddp_hook(rank, world):
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    # One rank per "node" on CPU: intra-node subgroups of size 1 (CUDA would pick the size itself).
    subgroup, _ = torch.distributed.new_subgroups(group_size=1)

    def build():
        model = DDP(make_model())
        state = PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=6)
        model.register_comm_hook(state, post_localSGD_hook)
        return model

    ref, mine = build(), build()
    ref_opt, my_opt = torch.optim.SGD(ref.parameters(), lr=0.05), torch.optim.SGD(mine.parameters(), lr=0.05)
    ref_avg, my_avg = PeriodicModelAverager(4, warmup_steps=6), PeriodicAverager(4, warmup_steps=6)
    for step in range(20):
        sgd_step(ref, ref_opt, rank, step)
        sgd_step(mine, my_opt, rank, step)
        ref_avg.average_parameters(ref.parameters())
        my_avg.average_parameters(mine.parameters())
        assert torch.equal(flat_copy(ref), flat_copy(mine)), step
    return my_avg.metrics.rounds


def test_post_local_sgd_hook_recipe_parity():
    assert run_ranks(_ddp_hook, 2) == [4, 4]  # steps 6, 10, 14, 18


def test_constructor_validation_matches_torch():
    with pytest.raises(ValueError, match="period"):
        PeriodicAverager.__init__(object.__new__(PeriodicAverager), period=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        PeriodicAverager.__init__(object.__new__(PeriodicAverager), period=2, warmup_steps=-1)
    with pytest.raises(ValueError, match="must not be empty"):
        HierarchicalAverager.__init__(object.__new__(HierarchicalAverager), {})
    with warnings.catch_warnings(record=True), pytest.raises(ValueError):
        warnings.simplefilter("always")
        HierarchicalAverager.__init__(object.__new__(HierarchicalAverager), {0: 2})
