"""The loss history of a run: appended to by the training thread, read by every page's poll.

A snapshot used to copy the whole history into a new tuple on every step, which made a
100k-step run quadratic. Points are only ever appended, so a snapshot is the history's list
and a length: it stays as it was however many points come later, and costs nothing to take.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import overload

LossPoint = tuple[int, float, float]  # (step, loss, smoothed loss)


class LossPoints(Sequence):
    """The first ``length`` points of a history, as they were when taken (read-only)."""

    __slots__ = ("_points", "_length")

    def __init__(self, points: list[LossPoint] | None = None, length: int = 0):
        self._points = points if points is not None else []
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[LossPoint]:
        return islice(self._points, self._length)

    @overload
    def __getitem__(self, index: int) -> LossPoint: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[LossPoint, ...]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self._points[i] for i in range(*index.indices(self._length)))
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("loss history index out of range")
        return self._points[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (LossPoints, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"LossPoints({len(self)} points)"


class LossHistory:
    """Append-only; ``view()`` is a snapshot that later appends do not change. The caller serialises appends."""

    def __init__(self) -> None:
        self._points: list[LossPoint] = []

    def append(self, point: LossPoint) -> None:
        self._points.append(point)

    def view(self) -> LossPoints:
        return LossPoints(self._points, len(self._points))
