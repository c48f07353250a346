"""The exchange's tail encoding: integers survive a float32 all-reduce SUM exactly."""

from __future__ import annotations

import torch

from avgctl.worker.control import _join, _split


def test_integers_split_into_parts_exact_in_float32_up_to_2_to_the_40():
    values = [0, 1, 7, 2**20 - 1, 2**20, 123_456_789, 2**40 - 1]
    parts = _split(values)
    assert all(0 <= p < 2**20 for p in parts)
    # As one rank's slots plus zeros from the other, summed in float32 the way the all-reduce does.
    summed = (torch.tensor(parts, dtype=torch.float32) + torch.zeros(len(parts))).tolist()
    assert _join(summed) == values
