"""What every event source provides: detector descriptions and raw batches.

A source yields :class:`RawBatch` objects: raw arrays (events, panels, rows, cols) per detector with
the events' timestamps and indices. Sources with random access (sim, hdf5) implement
:meth:`Source.read`; the producer splits ``[0, n_events)`` into batches (and ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..detectors.constants import Constants


@dataclass
class DetectorSource:
    """A detector as a source delivers it.

    Attributes:
        name: detector name in the config and output file.
        type: detector model type.
        shape: (panels, rows, cols).
        dtype: raw dtype.
        config_bits: (panels, rows, cols) uint8 ePix10ka pixel configuration, or None.
        x, y, z: (panels, rows, cols) pixel centres in um from the source (psana geometry), or None.
        constants: constants the source brings (the simulator's own), or None.
        segments: (panels,) int, the detector's segment (panel) numbers in data order, as psana
            numbers them (e.g. 0-15 of an ePix10k2M; a subset when some are not read out), or None.
    """

    name: str
    type: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    config_bits: np.ndarray | None = None
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    z: np.ndarray | None = None
    constants: Constants | None = None
    segments: np.ndarray | None = None


@dataclass
class RawBatch:
    """Raw events of one batch.

    Attributes:
        timestamp: (events,) uint64.
        event_index: (events,) int64, index of each event in the run.
        raw: detector name -> (events, panels, rows, cols) raw array.
        damaged: detector name -> (events,) bool, True where the detector had no or bad data.
        context: context name -> (events,) array of the event context (SPEC 10; :mod:`.context`), every name of
            :attr:`Source.context` in every batch.
    """

    timestamp: np.ndarray
    event_index: np.ndarray
    raw: dict[str, np.ndarray]
    damaged: dict[str, np.ndarray] = field(default_factory=dict)
    context: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.timestamp.shape[0])


class Source:
    """Base class of event sources."""

    detectors: dict[str, DetectorSource]
    n_events: int | None = None
    #: True when the source itself hands each MPI rank its own events (psana's MPI distribution):
    #: every rank then reads "its" events from 0 to the end, and ``event_index`` is rank-local.
    distributed: bool = False
    #: context name -> dtype (:func:`.context.context_dtype`) of the event context every batch carries, known
    #: when the source is open (before any event is read)
    context: dict[str, np.dtype] = {}

    def context_once(self) -> dict[str, object]:
        """Run-constant values (``epicsOnce/<pv>`` -> value), asked for once at the end of the run."""
        return {}

    def should_stop(self) -> bool:
        """Asked by sources that wait for data (following a run): True ends the wait. The run loop
        replaces it with its stop flag (SIGTERM / SIGINT, reader cancelled)."""
        return False

    def read(self, start: int, stop: int, out: dict[str, np.ndarray] | None = None) -> RawBatch:
        """Events ``[start, stop)``; ``out`` may give (stop - start, ...) arrays to fill (pinned buffers)."""
        raise NotImplementedError

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[RawBatch]:
        stop = self.n_events if stop is None else stop
        for b in range(start, stop, batch_size):  # type: ignore[arg-type]
            yield self.read(b, min(b + batch_size, stop))  # type: ignore[arg-type, type-var]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
