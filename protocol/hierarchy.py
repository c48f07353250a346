"""The rule a ``set_hierarchy`` body must meet, written once: rank 0 applies it (``worker/control_state.py``)
and the server checks it before logging the command (``server/store/writes.py``), so the two cannot
disagree. It depends only on the averager's group sizes, which never change, not on the live state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ORIENTATION = (
    "set_hierarchy takes {group_size: period}, while torch's HierarchicalModelAverager takes {period: group_size}"
)
"""Said with every refused hierarchy: the two spellings are each other's inverse, and easy to swap."""


class InvalidHierarchy(ValueError):
    """A ``set_hierarchy`` body that no averager with these group sizes can apply; the message says why."""


def hierarchy_periods(group_sizes: Sequence[int] | None, periods: Mapping[str, int]) -> tuple[int, ...]:
    """The new periods, one per entry of ``group_sizes`` (ascending, as the averager was built), from a
    ``set_hierarchy`` body's ``periods`` (``{"<group_size>": period}``); ``InvalidHierarchy`` unless
    it names exactly those sizes, once each, with positive integer periods that grow with the size.

    ``group_sizes`` None: the averager is not hierarchical."""
    if group_sizes is None:
        raise InvalidHierarchy("set_hierarchy needs a hierarchical averager; use set_period")
    by_size: dict[int, int] = {}
    for key, period in periods.items():
        size = _group_size(key)
        if size in by_size:
            raise InvalidHierarchy(f"group size {size} is given twice ({ORIENTATION})")
        by_size[size] = period
    if set(by_size) != set(group_sizes):
        raise InvalidHierarchy(
            f"hierarchy must give a period for exactly the group sizes {list(group_sizes)},"
            f" got {sorted(by_size)} ({ORIENTATION})"
        )
    ordered = tuple(by_size[size] for size in group_sizes)
    if any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in ordered):
        raise InvalidHierarchy(f"periods must be positive integers, got {list(ordered)}")
    if any(a >= b for a, b in zip(ordered, ordered[1:])):
        raise InvalidHierarchy(
            f"periods must grow with the group size, got {list(ordered)} for the group sizes {list(group_sizes)}"
            f" ({ORIENTATION})"
        )
    return ordered


def _group_size(key: str) -> int:
    if not (key.isascii() and key.isdigit()) or int(key) < 1:
        raise InvalidHierarchy(f"group size {key!r} is not a positive integer ({ORIENTATION})")
    return int(key)
