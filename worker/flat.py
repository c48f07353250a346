"""A persistent flat buffer whose slices are the parameters, so averaging runs in place.

torch's ``average_parameters`` concatenates every parameter into a new buffer each round and then
re-points each ``p.data`` into it. Doing that once and keeping the buffer saves an allocation and two
copies per round while the arithmetic (divide, then all-reduce SUM) stays the same.
"""

from __future__ import annotations

import hashlib

import torch


def fallback_reason(params: list[torch.nn.Parameter]) -> str | None:
    """Why these parameters cannot share one flat buffer (then torch's own path is used)."""
    if not params:
        return "no parameters with gradients"
    first = params[0]
    for p in params:
        if p.is_sparse or p.layout != torch.strided:
            return "sparse or non-strided parameters"
        if p.dtype != first.dtype:
            # torch averages mixed dtypes in the promoted dtype; one buffer per dtype would round differently.
            return "mixed dtypes"
        if p.device != first.device:
            return "parameters on more than one device"
    return None


def layout_fingerprint(params: list[torch.nn.Parameter]) -> int:
    """A number that differs, with overwhelming odds, when ranks hold different parameter layouts."""
    digest = hashlib.blake2b(digest_size=8)
    for p in params:
        digest.update(f"{tuple(p.shape)}:{p.dtype};".encode())
    # 50 bits: exact in a float64, the exchange's element type.
    return int.from_bytes(digest.digest(), "little") >> 14


class FlatParams:
    """Parameters re-pointed as views into one contiguous buffer, optionally followed by a tail.

    The tail (``tail`` extra elements of the same dtype) lets a small message ride in the same
    all-reduce as the parameters.
    """

    def __init__(self, params: list[torch.nn.Parameter], tail: int = 0):
        reason = fallback_reason(params)
        if reason is not None:
            raise ValueError(f"cannot flatten parameters: {reason}")
        self.params = list(params)
        self.numels = [p.numel() for p in params]
        self.shapes = [p.shape for p in params]
        total = sum(self.numels)
        self.storage = torch.zeros(total + tail, dtype=params[0].dtype, device=params[0].device)
        self.buffer = self.storage[:total]
        self.tail = self.storage[total:] if tail else None
        offset = 0
        with torch.no_grad():
            for p, n in zip(params, self.numels):
                view = self.buffer[offset : offset + n]
                view.copy_(p.data.reshape(-1))
                p.data = view.view_as(p)
                offset += n
        self._ptrs = [p.data_ptr() for p in params]
        self.fingerprint = layout_fingerprint(params)

    def still_views(self) -> bool:
        """False once anything re-pointed a parameter's ``.data`` away from the buffer."""
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._ptrs))

    def readopt(self) -> bool:
        """Bring parameters re-pointed elsewhere (``p.data = t``) back into the buffer, with their values.

        torch's own averager re-points ``.data`` every round, so this is no change of meaning. Returns
        False when some parameter changed shape, dtype or device and cannot come back.
        """
        if self.still_views():
            return True
        whole = True
        offset = 0
        with torch.no_grad():
            for i, (p, n, shape) in enumerate(zip(self.params, self.numels, self.shapes)):
                if p.data_ptr() != self._ptrs[i]:
                    if p.shape != shape or p.dtype != self.buffer.dtype or p.device != self.buffer.device:
                        whole = False
                    else:
                        view = self.buffer[offset : offset + n]
                        view.copy_(p.data.reshape(-1))
                        p.data = view.view_as(p)
                offset += n
        return whole
