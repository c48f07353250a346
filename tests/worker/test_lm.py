"""The language-model task: the stdlib split by module, the GPT's causality, bits per byte."""

from __future__ import annotations

import math

import pytest
import torch

from avgctl.worker import lm

SIZES = {f"mod{i}": 100 + 37 * i for i in range(30)}


def test_a_split_deals_whole_modules_once_and_is_the_same_for_a_seed():
    split = lm.split_modules(SIZES, world=4, seed=3)
    dealt = [name for share in split.ranks for name in share] + list(split.held_out)
    assert sorted(dealt) == sorted(SIZES)  # every module once: to one rank, or held out
    assert lm.split_modules(SIZES, world=4, seed=3) == split
    assert lm.split_modules(SIZES, world=4, seed=4) != split
    held = sum(SIZES[n] for n in split.held_out)
    assert 0.1 <= held / sum(SIZES.values()) <= 0.2
    loads = [sum(SIZES[n] for n in share) for share in split.ranks]
    assert max(loads) - min(loads) <= max(SIZES.values())  # dealt largest first to the lightest rank


def test_a_split_needs_a_module_per_rank_and_one_to_hold_out():
    with pytest.raises(ValueError, match="cannot feed"):
        lm.split_modules({"a": 1, "b": 1}, world=2, seed=0)


def test_the_stdlib_corpus_gives_each_rank_its_own_packages_and_all_the_same_held_out_bytes():
    modules = lm.stdlib_modules()
    assert "email" in modules and "asyncio" in modules and "test" not in modules
    corpora = [lm.Corpus(rank, 2, seed=0, context=32, eval_windows=8) for rank in range(2)]
    a, b = (set(c.split.ranks[r]) for r, c in enumerate(corpora))
    assert a and b and not a & b and not (a | b) & set(corpora[0].split.held_out)
    assert torch.equal(corpora[0].eval_x, corpora[1].eval_x)
    x, y = corpora[0].batch(4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < lm.VOCAB


def test_the_gpt_is_causal_and_starts_near_eight_bits_per_byte():
    torch.manual_seed(0)
    model = lm.TinyGPT(lm.GPTConfig(context=16))
    x = torch.randint(lm.VOCAB, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % lm.VOCAB
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :10], model(changed)[:, :10], atol=1e-5)
        assert not torch.allclose(model(x)[:, 10:], model(changed)[:, 10:])
        next_bytes = torch.randint(lm.VOCAB, (2, 16))
        assert abs(float(lm.loss_bits(model, x, next_bytes)) - math.log2(lm.VOCAB)) < 0.1  # uniform at init
