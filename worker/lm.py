"""The language-model demo task: a small byte-level GPT on the Python standard library's own source.

No download: the text is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (tens of MB on
every machine with Python), read as bytes, so the vocabulary is the 256 byte values. The split is
non-IID by top-level module, as real federated or multi-site data is: each rank trains on its own
packages (``email``, ``asyncio``, ...), and a held-out set of other modules is the evaluation data,
so what the held-out loss rewards is what the ranks learn together. ``test`` (half the bytes, and
one package) and installed third-party packages are left out. Everything is a pure function of the
seed and the world size (on one Python installation): the held-out modules, each rank's share and
the order of its batches.

Losses are in bits per byte (the cross-entropy's nats over ln 2): 8 for a uniform guess; a model
that has learnt indentation, keywords and common identifiers is near 2-3.
"""

from __future__ import annotations

import math
import random
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256
EXCLUDED = frozenset({"test", "site-packages", "dist-packages", "__pycache__"})
"""Top-level names not used: the regression tests (half of the stdlib's bytes) and installed packages
(as are names that are no module's, such as ``config-3.11-x86_64-linux-gnu``)."""
HELD_OUT_SHARE = 0.1
"""Share of the bytes, in whole modules, kept for evaluation."""
BITS = 1.0 / math.log(2.0)


@dataclass(frozen=True, slots=True)
class GPTConfig:
    """The model's shape: small enough for a CPU core, large enough to learn Python's syntax."""

    layers: int = 2
    width: int = 128
    heads: int = 4
    context: int = 128


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def stdlib_modules(root: Path | None = None) -> dict[str, tuple[Path, ...]]:
    """Top-level module name -> its ``.py`` files (sorted), from the standard library at ``root``."""
    root = root or stdlib_root()
    modules: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        top = path.relative_to(root).parts[0].removesuffix(".py")
        if top.isidentifier() and top not in EXCLUDED and path.is_file():  # not config-3.11-x86_64-linux-gnu
            modules.setdefault(top, []).append(path)
    return {name: tuple(paths) for name, paths in sorted(modules.items())}


@dataclass(frozen=True, slots=True)
class Split:
    """Which modules each rank trains on and which are held out."""

    ranks: tuple[tuple[str, ...], ...]
    held_out: tuple[str, ...]


def split_modules(sizes: dict[str, int], world: int, seed: int, held_out_share: float = HELD_OUT_SHARE) -> Split:
    """A seeded, non-IID split of whole modules: a held-out set of about ``held_out_share`` of the
    bytes, the rest dealt to ``world`` ranks largest first to the rank with the fewest bytes so far
    (each rank's share is its own packages, and the shares are of similar size)."""
    if world < 1:
        raise ValueError("world must be at least 1")
    names = sorted(sizes)
    if len(names) < world + 1:
        raise ValueError(f"{len(names)} modules cannot feed {world} ranks and a held-out set")
    order = names[:]
    random.Random(seed).shuffle(order)
    total = sum(sizes.values())
    held, held_bytes = [], 0
    for name in order:
        if held_bytes >= held_out_share * total or len(order) - len(held) <= world:
            break
        if held_bytes + sizes[name] <= 2 * held_out_share * total:  # no one huge package as the whole test set
            held.append(name)
            held_bytes += sizes[name]
    rest = sorted((n for n in order if n not in held), key=lambda n: (-sizes[n], order.index(n)))
    shares: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in rest:
        r = min(range(world), key=lambda i: (loads[i], i))
        shares[r].append(name)
        loads[r] += sizes[name]
    return Split(tuple(tuple(sorted(s)) for s in shares), tuple(sorted(held)))


def read_bytes(modules: dict[str, tuple[Path, ...]], names: tuple[str, ...]) -> torch.Tensor:
    """The files of ``names``, concatenated as one stream of byte tokens (a blank line between files)."""
    parts = [path.read_bytes() + b"\n\n" for name in names for path in modules[name]]
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


class Corpus:
    """One rank's training stream and the shared held-out windows."""

    def __init__(self, rank: int, world: int, seed: int, context: int, eval_windows: int = 64):
        modules = stdlib_modules()
        sizes = {name: sum(p.stat().st_size for p in paths) for name, paths in modules.items()}
        self.split = split_modules(sizes, world, seed)
        self.context = context
        self.train = read_bytes(modules, self.split.ranks[rank])
        held = read_bytes(modules, self.split.held_out)
        # Fixed, evenly spaced windows: every run and every rank scores the same bytes.
        starts = torch.linspace(0, len(held) - context - 2, eval_windows).long()
        self.eval_x, self.eval_y = _windows(held, starts, context)

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.train) - self.context - 1, (batch_size,), generator=gen)
        return _windows(self.train, starts, self.context)


def _windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """A causal byte-level GPT; the output layer shares the embedding's weights."""

    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.width)
        self.position = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def loss_bits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in bits per byte."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)) * BITS


class LmTask:
    """The byte-level GPT as a demo task (``avgctl.worker.demo.GaussTask``'s shape): model, AdamW,
    this rank's batches and the held-out bits per byte."""

    name = "lm"
    metric = "eval"
    """The held-out figure the round table shows besides the loss: held-out bits per byte."""

    def __init__(
        self, rank: int, world: int, seed: int, batch_size: int, gpt: GPTConfig = GPTConfig(), eval_windows: int = 64
    ):
        self.seed, self.batch_size, self.gpt = seed, batch_size, gpt
        self.corpus = Corpus(rank, world, seed, gpt.context, eval_windows)

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # the same initial weights on every rank
        return TinyGPT(self.gpt)

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.corpus.batch(self.batch_size, gen)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_bits(model, x, y)

    def evaluate(self, model: nn.Module) -> tuple[float, None]:
        """Held-out bits per byte (no accuracy)."""
        with torch.no_grad():
            return float(loss_bits(model, self.corpus.eval_x, self.corpus.eval_y)), None
