"""Persistent flat buffers whose slices are the parameters, so averaging runs in place.

torch's ``average_parameters`` concatenates every parameter into a new buffer each round and then
re-points each ``p.data`` into it. Doing that once and keeping the buffer saves an allocation and two
copies per round while the arithmetic (divide, then all-reduce SUM) stays the same.

Parameters of several dtypes (fp32 norms in a bf16 model) get one buffer per dtype
(``MixedFlatParams``); a round packs them, in the parameters' order, into one buffer of the promoted
dtype, as torch's ``torch.cat`` does, so the values stay torch's.
"""

from __future__ import annotations

import functools
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
        self.dtype, self.device = params[0].dtype, params[0].device
        if any(p.dtype != self.dtype for p in params):
            raise ValueError("one dtype per FlatParams (MixedFlatParams holds several)")
        self.storage = torch.zeros(total + tail, dtype=self.dtype, device=self.device)
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

    def selection(self, index: torch.Tensor) -> torch.Tensor:
        """``index`` (positions, on the CPU) where ``gather`` needs it: on the buffer's device."""
        return index.to(self.device)

    def gather(self, index: torch.Tensor | None) -> torch.Tensor:
        """The coordinates at ``index`` (from ``selection``; None: a copy of every one)."""
        return self.buffer.clone() if index is None else self.buffer.index_select(0, index)


def flatten(params: list[torch.nn.Parameter], tail: int = 0) -> FlatParams | MixedFlatParams:
    """One buffer for parameters of one dtype (with ``tail``), one per dtype otherwise (no tail)."""
    if len({p.dtype for p in params}) == 1:
        return FlatParams(params, tail=tail)
    return MixedFlatParams(params)


class MixedFlatParams:
    """Parameters of several dtypes as views into one ``FlatParams`` per dtype.

    ``pack`` lays them out in the parameters' order in one buffer of the promoted dtype (what
    ``torch.cat`` builds in torch's ``average_parameters``) and ``unpack`` rounds them back, as
    torch's ``type_as`` does. Copies go by runs of consecutive parameters of one dtype.
    """

    tail = None  # a tail rides only in a one-dtype buffer

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        self.dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
        self.device = params[0].device
        dtypes = list(dict.fromkeys(p.dtype for p in params))
        self.parts = [FlatParams([p for p in params if p.dtype == dtype]) for dtype in dtypes]
        part_of = {dtype: i for i, dtype in enumerate(dtypes)}
        self.numel = sum(p.numel() for p in params)
        # Per parameter: its part, its offset in that part's buffer and in the packed order.
        self._param_part, self._param_local, self._param_start = [], [], []
        local = [0] * len(self.parts)
        start = 0
        for p in params:
            i = part_of[p.dtype]
            self._param_part.append(i)
            self._param_local.append(local[i])
            self._param_start.append(start)
            local[i] += p.numel()
            start += p.numel()
        self.runs: list[tuple[int, slice, slice]] = []
        for i, p in enumerate(params):
            n, part, lo, at = p.numel(), self._param_part[i], self._param_local[i], self._param_start[i]
            if self.runs and self.runs[-1][0] == part and self.runs[-1][2].stop == at:
                _, src, dst = self.runs[-1]
                self.runs[-1] = (part, slice(src.start, lo + n), slice(dst.start, at + n))
            else:
                self.runs.append((part, slice(lo, lo + n), slice(at, at + n)))
        self.fingerprint = layout_fingerprint(params)

    def still_views(self) -> bool:
        return all(part.still_views() for part in self.parts)

    def readopt(self) -> bool:
        return all([part.readopt() for part in self.parts])  # every part, even after one fails

    def pack(self) -> torch.Tensor:
        """A new buffer of the promoted dtype holding every parameter in order."""
        packed = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        for part, src, dst in self.runs:
            packed[dst].copy_(self.parts[part].buffer[src])
        return packed

    def unpack(self, packed: torch.Tensor) -> None:
        """Write ``pack``'s layout back into the parameters, rounded to their dtypes."""
        for part, src, dst in self.runs:
            self.parts[part].buffer[src].copy_(packed[dst])

    def selection(self, index: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """For sorted positions ``index`` (CPU) in the packed order: per part, where its samples go
        and where they are in its buffer (built once per layout, then moved to the device)."""
        starts = torch.tensor(self._param_start, dtype=torch.int64)
        param = torch.searchsorted(starts, index, right=True) - 1
        part = torch.tensor(self._param_part, dtype=torch.int64)[param]
        local = index - starts[param] + torch.tensor(self._param_local, dtype=torch.int64)[param]
        out = []
        for i in range(len(self.parts)):
            slots = torch.nonzero(part == i).reshape(-1)
            out.append((i, slots.to(self.device), local[slots].to(self.device)))
        return out

    def gather(self, selection: list[tuple[int, torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        """The selected coordinates in the promoted dtype (None: every one, in order)."""
        if selection is None:
            return self.pack()
        count = sum(slots.numel() for _, slots, _ in selection)
        out = torch.empty(count, dtype=self.dtype, device=self.device)
        for part, slots, local in selection:
            out.index_copy_(0, slots, self.parts[part].buffer.index_select(0, local).to(self.dtype))
        return out
