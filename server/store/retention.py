"""Retention: old metric records thinned, so the store's file stops growing."""

from __future__ import annotations

import sqlite3


class Retention:
    """Keeps the file bounded: each rank's latest ``retention_steps`` steps at full resolution, and
    at most ``history_records`` older step (and round) records, evenly thinned.

    Older records keep the steps that are multiples of a stride, the smallest power of two that
    leaves at most ``history_records`` of them; the stride doubles as the job grows, so what is kept
    at one stride is kept at the next. Control events and commands are never thinned. Runs on the
    writer thread (its state is the writer's alone); SQLite reuses the freed pages, so the file stops
    growing instead of shrinking.
    """

    def __init__(self, retention_steps: int, history_records: int):
        self.retention_steps = retention_steps
        self.history_records = history_records
        self._done: dict[tuple[str, int], tuple[int, int]] = {}  # (job, rank) -> (thinned below, stride)

    def stride(self, cutoff: int) -> int:
        """The spacing of the records kept below ``cutoff``."""
        stride = 1
        while cutoff > stride * self.history_records:
            stride *= 2
        return stride

    def full_resolution_from(self, conn: sqlite3.Connection, job_id: str) -> dict[int, int]:
        """Per rank of the job, the first step from which every record is kept (by this rule)."""
        rows = conn.execute("SELECT rank, step FROM ranks WHERE job_id = ?", (job_id,))
        return {
            rank: max(0, step - self.retention_steps) if self.stride(step - self.retention_steps) > 1 else 0
            for rank, step in rows
        }

    def prune(self, conn: sqlite3.Connection) -> int:
        """Thin what is due, on the writer's connection inside its transaction; returns the rows deleted."""
        deleted = 0
        for job_id, rank, step in conn.execute("SELECT job_id, rank, step FROM ranks").fetchall():
            cutoff = step - self.retention_steps
            stride = self.stride(cutoff)
            done_below, done_stride = self._done.get((job_id, rank), (0, 0))
            if cutoff <= 0 or stride == 1 or (stride == done_stride and cutoff <= done_below):
                continue
            start = done_below if stride == done_stride else 0  # a new stride re-thins everything older
            for table in ("steps", "rounds"):
                deleted += conn.execute(
                    f"DELETE FROM {table} WHERE job_id = ? AND rank = ? AND step >= ? AND step < ? AND step % ? != 0",
                    (job_id, rank, start, cutoff, stride),
                ).rowcount
            self._done[(job_id, rank)] = (cutoff, stride)
        return deleted
