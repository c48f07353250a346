"""The demo tasks: ``torchrun --nproc-per-node N -m avgctl.worker.demo [--task gauss|lm] [--server URL] ...``.

Two tasks, both made on the spot (no downloads) and both split non-IID across ranks, so local models
pull apart between averaging rounds and divergence grows visibly with the period:

- ``gauss`` (the default here, for fast tests): a small MLP learns a 10-class Gaussian mixture; each
  rank sees mostly its own few classes. Its held-out loss stops moving after a few hundred steps.
- ``lm``: a small byte-level GPT on the Python standard library's source, each rank on its own
  top-level packages, scored on held-out modules in bits per byte (``avgctl.worker.lm``): the
  workload local SGD is used for, with a loss that keeps falling for thousands of steps.

Without ``--server`` it trains and prints the metrics table locally.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from avgctl.protocol.flags import add_flags, from_flags
from avgctl.worker.averagers import HierarchicalAverager, LiveAverager, PeriodicAverager
from avgctl.worker.diloco import DiLoCoAverager
from avgctl.worker.dist import read_env
from avgctl.worker.lm import LmTask

CLASSES = 10
FEATURES = 32
SEPARATION = 0.35  # class centers overlap: the best loss stays well above 0

LrSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
AveragerKind = Literal["periodic", "hierarchical", "diloco"]
AVERAGER_KINDS: tuple[str, ...] = get_args(AveragerKind)
TaskKind = Literal["gauss", "lm"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
# What each task trains best with, where the person gives no --lr or --batch-size: the MLP with SGD
# and momentum; the GPT with AdamW, whose lr is two orders of magnitude smaller.
TASK_DEFAULTS: dict[str, dict[str, float | int]] = {
    "gauss": {"lr": 0.05, "batch_size": 32},
    "lm": {"lr": 3e-3, "batch_size": 16},
}


def _hierarchy(text: str) -> dict[int, int]:
    """``2:4,4:16`` -> {group size 2: period 4, group size 4: period 16}."""
    try:
        pairs = [part.split(":") for part in text.split(",") if part]
        return {int(size): int(period) for size, period in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GROUP_SIZE:PERIOD[,GROUP_SIZE:PERIOD...], got {text!r}") from None


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """Everything one demo run needs; built by ``main`` from flags, or by benchmarks directly."""

    task: TaskKind = field(
        default="gauss",
        metadata={"help": "gauss (non-IID Gaussian mixture, small MLP) or lm (byte-level GPT on the stdlib's source)"},
    )
    """``gauss``: fast, for tests; ``lm``: a real workload (``avgctl.worker.lm``)."""
    steps: int = field(default=2000, metadata={"help": "training steps"})
    """Training steps per rank."""
    averager: AveragerKind = field(
        default="periodic",
        metadata={
            "help": "periodic, hierarchical (groups of half the world; see --hierarchy) or diloco (an outer SGD step per round)"
        },
    )
    """Which averager trains: ``PeriodicAverager``, ``HierarchicalAverager`` or ``DiLoCoAverager``."""
    outer_lr: float = field(default=0.7, metadata={"help": "DiLoCo's outer lr (SGD, Nesterov momentum 0.9)"})
    """The outer optimizer's lr for ``--averager diloco`` (Douillard et al.: 0.7)."""
    period: int = field(default=8, metadata={"help": "averaging period"})
    """Averaging period (the global period when ``hierarchy`` is set)."""
    warmup_steps: int = field(default=0, metadata={"help": "steps before the first average"})
    """Steps before the first averaging round."""
    hierarchy: dict[int, int] | None = field(
        default=None,
        metadata={"help": "hierarchical averaging, e.g. 2:4 (groups of 2 average every 4 steps)", "parse": _hierarchy},
    )
    """``{group_size: period}`` for a HierarchicalAverager; the world's period is ``period``."""
    lr: float | None = field(
        default=None, metadata={"help": "(peak) learning rate (default: 0.05 for gauss, SGD; 0.003 for lm, AdamW)"}
    )
    """Peak learning rate: SGD with momentum 0.9 for ``gauss``, AdamW for ``lm``; None: the task's
    (``TASK_DEFAULTS``)."""
    lr_schedule: LrSchedule = field(
        default="constant", metadata={"help": "constant, or cosine decay to 0 over --steps (stable final figures)"}
    )
    """``constant``: ``lr`` throughout, so the loss settles at a noise floor set by the lr and the
    local models keep pulling apart at the same pace: good for watching divergence live. ``cosine``:
    ``lr`` decays to 0 over ``steps``, so the final figures are stable (no noise floor) and the
    divergence gathered per step falls with the lr, the regime where a longer period costs little."""
    batch_size: int | None = None
    """Samples (``gauss``) or windows of bytes (``lm``) per step; None: the task's (``TASK_DEFAULTS``)."""
    skew: float = field(default=0.9, metadata={"help": "share of a rank's data from its own classes (gauss)"})
    """Share of a rank's samples drawn from its own classes (0.1 would be IID for 10 classes); ``lm``
    ranks read only their own packages."""
    seed: int = field(default=0, metadata={"help": "seed of the data and the initial weights"})
    step_delay: float = field(default=0.0, metadata={"help": "seconds to sleep per step (to watch it live)"})
    """Extra seconds per step, so a person can watch the dashboard move."""
    eval_every: int = 100
    """Steps between held-out accuracy checks."""
    checkpoint: Path | None = field(
        default=None, metadata={"help": "checkpoint path prefix; resumes from it when present"}
    )
    """Save (and resume from) ``<checkpoint>.rank<r>.pt`` every ``checkpoint_every`` steps."""
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints"})
    quiet: bool = field(default=False, metadata={"help": "no metrics table"})
    summary: Path | None = field(
        default=None,
        metadata={
            "help": "write rank 0's task, steps, rounds, initial_eval_loss, final_eval_loss and wall_seconds to this JSON file"
        },
    )
    """Where rank 0 writes the run's summary (``DemoResult.summary``: ../shared/CONTRACT.md's JSON)."""
    server: str | None = field(
        default=None,
        metadata={"help": "avgctl server URL (default: $AVGCTL_SERVER; without one, metrics print locally)"},
    )
    job_id: str | None = field(default=None, metadata={"help": "job id (default: torchrun's run id)"})
    token: str | None = None
    extra_averager_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASK_KINDS:
            raise ValueError(f"task must be one of {', '.join(TASK_KINDS)}, got {self.task!r}")
        if self.lr is None:
            self.lr = TASK_DEFAULTS[self.task]["lr"]
        if self.batch_size is None:
            self.batch_size = TASK_DEFAULTS[self.task]["batch_size"]
        if self.lr <= 0 or self.batch_size < 1:
            raise ValueError("lr must be positive and batch_size at least 1")
        if self.steps < 0:
            raise ValueError("steps must be non-negative")
        if self.period < 1:
            raise ValueError("period must be a positive integer")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError("skew must be between 0 and 1")
        if self.averager not in AVERAGER_KINDS:
            raise ValueError(f"averager must be one of {', '.join(AVERAGER_KINDS)}, got {self.averager!r}")
        if self.averager == "diloco" and self.hierarchy:
            raise ValueError("--hierarchy and --averager diloco do not go together (DiLoCo averages the whole world)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")


@dataclass(slots=True)
class DemoResult:
    """What a run ends with (the same on every rank after the final average)."""

    final_loss: float
    """Held-out loss of the final average (nats for ``gauss``, bits per byte for ``lm``)."""
    accuracy: float | None
    """Held-out accuracy (``gauss``; None for ``lm``)."""
    rounds: int
    bytes_moved: int
    wall_seconds: float
    steps: int
    initial_loss: float = float("nan")
    """Held-out loss of the model the run started from (before its first step)."""
    task: str = "gauss"

    def summary(self) -> dict:
        """The ``--summary`` JSON (../shared/CONTRACT.md, "Demo task flags")."""
        return {
            "task": self.task,
            "steps": self.steps,
            "rounds": self.rounds,
            "initial_eval_loss": self.initial_loss,
            "final_eval_loss": self.final_loss,
            "wall_seconds": self.wall_seconds,
        }


def class_centers(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(CLASSES, FEATURES, generator=gen) * SEPARATION


def sample(centers: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return centers[labels] + torch.randn(len(labels), FEATURES, generator=gen)


def rank_labels(rank: int, world: int, n: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """Mostly this rank's own classes (label skew), the rest uniform over all classes."""
    own = [c for c in range(CLASSES) if c % world == rank % world] or [rank % CLASSES]
    own_t = torch.tensor(own)
    mine = own_t[torch.randint(len(own), (n,), generator=gen)]
    anyc = torch.randint(CLASSES, (n,), generator=gen)
    take_own = torch.rand(n, generator=gen) < skew
    return torch.where(take_own, mine, anyc)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, CLASSES))


def lr_at(cfg: DemoConfig, step: int) -> float:
    """The learning rate for training step ``step`` (0-based): a pure function of the step, so a run
    resumed from a checkpoint picks up the schedule where it left off."""
    if cfg.lr_schedule == "cosine" and cfg.steps > 0:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return cfg.lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def make_averager(cfg: DemoConfig, world: int, model: nn.Module | None = None) -> LiveAverager:
    """The averager ``cfg`` names (DiLoCo needs the ``model`` its outer optimizer steps)."""
    if cfg.averager == "diloco":
        assert model is not None, "DiLoCo's outer optimizer needs the model"
        outer = torch.optim.SGD(model.parameters(), lr=cfg.outer_lr, momentum=0.9, nesterov=True)
        return DiLoCoAverager(outer, cfg.period, warmup_steps=cfg.warmup_steps, **cfg.extra_averager_args)
    hierarchy = cfg.hierarchy
    if not hierarchy and cfg.averager == "hierarchical":  # groups of half the world, twice as often
        hierarchy = {max(1, world // 2): max(1, cfg.period // 2)}
    if hierarchy:
        levels = {period: size for size, period in sorted(hierarchy.items()) if size != world}
        levels[cfg.period] = world
        return HierarchicalAverager(levels, warmup_steps=cfg.warmup_steps, **cfg.extra_averager_args)
    return PeriodicAverager(cfg.period, warmup_steps=cfg.warmup_steps, **cfg.extra_averager_args)


def evaluate(model: nn.Module, centers: torch.Tensor, seed: int) -> tuple[float, float]:
    """Loss and accuracy on a fixed IID held-out set."""
    gen = torch.Generator().manual_seed(seed + 99)
    labels = torch.randint(CLASSES, (2000,), generator=gen)
    with torch.no_grad():
        logits = model(sample(centers, labels, gen))
        loss = nn.functional.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
    return float(loss), float(accuracy)


class GaussTask:
    """The Gaussian mixture as a task: model, optimizer, batches and held-out figures (``LmTask``'s shape)."""

    name = "gauss"
    metric = "acc"
    """The held-out figure the round table shows besides the loss: accuracy."""

    def __init__(self, rank: int, world: int, seed: int, batch_size: int, skew: float):
        self.rank, self.world, self.seed, self.batch_size, self.skew = rank, world, seed, batch_size, skew
        self.centers = class_centers(seed)

    def model(self) -> nn.Module:
        return make_model(self.seed)

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rank_labels(self.rank, self.world, self.batch_size, self.skew, gen)
        return sample(self.centers, labels, gen), labels

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> tuple[float, float | None]:
        """Held-out loss (nats) and accuracy."""
        return evaluate(model, self.centers, self.seed)


Task = GaussTask | LmTask


def make_task(cfg: DemoConfig, rank: int, world: int) -> Task:
    """The task ``cfg`` names, with this rank's share of its data."""
    if cfg.task == "lm":
        return LmTask(rank, world, cfg.seed, cfg.batch_size)
    return GaussTask(rank, world, cfg.seed, cfg.batch_size, cfg.skew)


class RoundTable:
    """Rank 0's readable progress: one line per round, at most a few lines a second."""

    HEADER = f"{'step':>8} {'done':>5} {'loss':>7} {'acc':>6} {'div mean':>9} {'div max':>9} {'rel max':>8} {'drift':>8} {'period':>6} {'avg ms':>7}"

    def __init__(self, steps: int, enabled: bool, metric: str = "acc"):
        self.steps, self.enabled = steps, enabled
        self.last_print = 0.0
        self.accuracy = float("nan")
        """The latest held-out figure: accuracy (``gauss``) or held-out bits per byte (``lm``)."""
        if enabled:
            print(self.HEADER.replace("   acc", f"{metric:>6}"), flush=True)

    def maybe_print(self, averager: LiveAverager, loss: float | torch.Tensor, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last_print < 0.5):
            return
        self.last_print = now
        loss = float(loss)  # read only when printed (twice a second), not every step
        rnd, step = averager.metrics.last_round, averager.metrics.last_step
        fmt = lambda v, w, p=4: f"{v:>{w}.{p}f}" if v is not None and not math.isnan(v) else f"{'-':>{w}}"  # noqa: E731
        done = f"{100 * (averager.step) / max(self.steps, 1):>4.0f}%"
        print(
            f"{averager.step:>8} {done:>5} {fmt(loss, 7)} {fmt(self.accuracy, 6, 3)} "
            f"{fmt(rnd and rnd.divergence_mean, 9)} {fmt(rnd and rnd.divergence_max, 9)} "
            f"{fmt(rnd and rnd.relative_max, 8)} {fmt(step and step.drift, 8)} "
            f"{averager.control.period:>6} {fmt(rnd and rnd.seconds * 1e3, 7, 2)}",
            flush=True,
        )


def _checkpoint_path(cfg: DemoConfig, rank: int) -> Path | None:
    return None if cfg.checkpoint is None else Path(f"{cfg.checkpoint}.rank{rank}.pt")


def _previous(path: Path) -> Path:
    return path.with_suffix(".prev.pt")


def _checkpoint_state(model: nn.Module, opt: torch.optim.Optimizer, averager: LiveAverager) -> dict:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "averager": averager.state_dict()}
    outer = getattr(averager, "outer_optimizer", None)
    if outer is not None:  # DiLoCo: the outer optimizer's momentum is the user's to keep
        state["outer_optimizer"] = outer.state_dict()
    return state


def _save_checkpoint(path: Path, state: dict) -> None:
    """Keep this rank's last two checkpoints: ranks save on their own, so a crash can leave them one apart."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    if path.exists():
        os.replace(path, _previous(path))
    os.replace(tmp, path)


def _load_common_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, averager: LiveAverager
) -> Path | None:
    """Load the newest checkpoint step that every rank has (ranks must resume at one step)."""
    mine = {}
    for candidate in (path, _previous(path)):
        if candidate.exists():
            state = torch.load(candidate, weights_only=False)
            mine[state["averager"]["step"]] = (candidate, state)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    common = set.intersection(*(set(steps) for steps in everyone))
    if not common:
        return None
    chosen, state = mine[max(common)]
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    averager.load_state_dict(state["averager"])
    outer = getattr(averager, "outer_optimizer", None)
    if outer is not None and "outer_optimizer" in state:
        outer.load_state_dict(state["outer_optimizer"])
    return chosen


def train(cfg: DemoConfig, rank: int, world: int) -> DemoResult:
    """Run the demo on an initialized process group; returns the final figures."""
    task = make_task(cfg, rank, world)
    model = task.model()
    opt = task.optimizer(model, cfg.lr)
    averager = make_averager(cfg, world, model)
    averager.name_parameters(model)
    ckpt = _checkpoint_path(cfg, rank)
    if ckpt is not None:
        resumed = _load_common_checkpoint(ckpt, model, opt, averager)
        if resumed is not None and rank == 0 and not cfg.quiet:
            print(f"resumed from {resumed} at step {averager.step}", flush=True)
    link = None
    if cfg.server:
        from avgctl.worker.link import connect

        link = connect(averager, server=cfg.server, job_id=cfg.job_id, token=cfg.token)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * averager.step)
    table = RoundTable(cfg.steps, enabled=rank == 0 and not cfg.quiet, metric=task.metric)
    initial_loss = task.evaluate(model)[0]
    started = time.perf_counter()
    loss_value: float | torch.Tensor = float("nan")
    try:
        while averager.step < cfg.steps:
            x, y = task.batch(gen)
            set_lr(opt, lr_at(cfg, averager.step))
            opt.zero_grad()
            loss = task.loss(model, x, y)
            loss.backward()
            opt.step()
            loss_value = loss.detach()
            averager.record(loss=loss_value)  # the tensor: read without a per-step sync
            if cfg.eval_every and averager.step % cfg.eval_every == 0:
                held_out_loss, accuracy = task.evaluate(model)
                if accuracy is None:  # lm: the held-out bits per byte of this rank's model
                    table.accuracy = held_out_loss
                    averager.record(eval_loss=held_out_loss)
                else:
                    table.accuracy = accuracy
                    averager.record(accuracy=accuracy)
            averager.average_parameters(model.parameters())
            table.maybe_print(averager, loss_value)
            if ckpt is not None and averager.step % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, _checkpoint_state(model, opt, averager))
            if cfg.step_delay:
                time.sleep(cfg.step_delay)
        averager.flush()  # the last round's group figures and command acks
        # One final average so every rank ends with the same model (a real job would too).
        final = [p.detach().clone() for p in model.parameters()]
        for p in final:
            dist.all_reduce(p)
            p /= world
        with torch.no_grad():
            for p, avg in zip(model.parameters(), final):
                p.copy_(avg)
        final_loss, accuracy = task.evaluate(model)
        table.accuracy = final_loss if accuracy is None else accuracy
        table.maybe_print(averager, loss_value, force=True)
    finally:
        if link is not None:
            link.close()
    metrics = averager.metrics
    return DemoResult(
        final_loss=final_loss,
        accuracy=accuracy,
        rounds=metrics.rounds,
        bytes_moved=metrics.bytes_moved,
        wall_seconds=time.perf_counter() - started,
        steps=averager.step,
        initial_loss=initial_loss,
        task=task.name,
    )


# The flags, in the order --help lists them; the other fields are for code that builds a DemoConfig.
FLAGS = (
    "server",
    "job_id",
    "task",
    "steps",
    "averager",
    "period",
    "warmup_steps",
    "hierarchy",
    "outer_lr",
    "lr",
    "lr_schedule",
    "batch_size",
    "seed",
    "skew",
    "step_delay",
    "checkpoint",
    "checkpoint_every",
    "quiet",
    "summary",
)


def parse_args(argv: list[str] | None = None) -> tuple[DemoConfig, Path | None]:
    """The run's config and where to write rank 0's result (``--result``)."""
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m avgctl.worker.demo",
        description="Train an avgctl demo task (non-IID across ranks) with live-controlled averaging.",
    )
    add_flags(parser, DemoConfig, FLAGS)
    parser.add_argument("--result", type=Path, help="write rank 0's final figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        cfg = from_flags(DemoConfig, args)
    except ValueError as err:
        parser.error(str(err))
    return cfg, args.result


def main(argv: list[str] | None = None) -> int:
    cfg, result_path = parse_args(argv)
    env = read_env()
    cfg.server = cfg.server or env.server
    cfg.token = env.token
    torch.set_num_threads(1)  # several ranks share a CPU
    # Namespace the store by torchrun's restart count: after a restart, keys left by the dead
    # attempt (a rank's old address) must not be read by the new one.
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"avgctl/attempt-{env.restart_count}", store)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        result = train(cfg, dist.get_rank(), dist.get_world_size())
        if dist.get_rank() == 0:
            if not cfg.quiet:
                score = (
                    f"held-out {result.initial_loss:.3f} -> {result.final_loss:.3f} bits per byte"
                    if result.accuracy is None
                    else f"final loss {result.final_loss:.4f}, accuracy {result.accuracy:.3f}"
                )
                print(f"done: {result.steps} steps, {result.rounds} averaging rounds, {score}", flush=True)
            if result_path is not None:
                result_path.write_text(json.dumps(dataclasses.asdict(result)))
            if cfg.summary is not None:
                cfg.summary.write_text(json.dumps(result.summary()))
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
