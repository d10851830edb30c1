"""Output arrays that are reused once nobody holds them: a fresh multi-megabyte ``np.empty`` per batch
costs a page fault per 4 kB page on its first write, which for a calibration kernel that writes
each byte once is as much time as the kernel itself.

:class:`ReusableArrays` keeps the arrays it handed out and gives one again only when its reference
count shows that only the pool holds it (no caller, no view of it, no frame kept by a user's
function), so reuse never changes a result anyone still has. Thread-safe: the pipeline's threads
share one calibrator.
"""

from __future__ import annotations

import sys
import threading

import numpy as np


def _refs_when_only_listed() -> int:
    """References of an array held only by a list, seen as :meth:`ReusableArrays.empty` sees them (the
    list's, the loop variable's, getrefcount's argument): measured, not assumed, per interpreter."""
    for a in [np.empty(0)]:
        return sys.getrefcount(a)
    raise AssertionError


_POOL_REFS = _refs_when_only_listed()


class ReusableArrays:
    """A few arrays of one per-event shape and dtype, each (capacity events, *shape); ``empty(n)`` is
    an uninitialised (n, *shape) array, a leading slice of a free one when there is one."""

    def __init__(self, shape: tuple[int, ...], dtype, keep: int = 8):
        self.shape, self.dtype, self.keep = tuple(shape), np.dtype(dtype), int(keep)
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.reused = 0  # arrays handed out again (for tests)

    def empty(self, n_events: int) -> np.ndarray:
        """(n_events, *shape) array of ``dtype``, contents undefined."""
        with self._lock:
            for a in self._arrays:
                if a.shape[0] >= n_events and sys.getrefcount(a) <= _POOL_REFS:
                    self.reused += 1
                    return a[:n_events]
            a = np.empty((n_events, *self.shape), self.dtype)
            if len(self._arrays) >= self.keep:  # all busy: drop the smallest
                self._arrays.remove(min(self._arrays, key=len))
            self._arrays.append(a)
            return a
