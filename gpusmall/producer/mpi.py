"""MPI for the producer: a small communicator wrapper with a serial fallback, and event distribution.

``gpusmall run`` works the same with or without mpi4py: :func:`get_comm` returns an MPI-backed
:class:`Comm` only when the process was started by an MPI launcher with more than one rank
(``mpiexec -n K``, ``srun``) and mpi4py imports; otherwise a serial one (rank 0 of 1). Set
``GPUSMALL_MPI=0`` to force the serial communicator.

Random-access sources (sim, hdf5) are split by :func:`block_range`: contiguous blocks of whole batches,
balanced to within one batch, in rank order, so concatenating the ranks' outputs gives event order.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

log = logging.getLogger(__name__)

# environment variables by which MPI launchers announce the world size
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE", "SLURM_NTASKS", "MV2_COMM_WORLD_SIZE")


class Comm:
    """The producer's view of MPI: rank, size, local rank, a few collectives.

    Attributes:
        rank, size: in the world communicator.
        local_rank, local_size: among the ranks on the same node (``COMM_TYPE_SHARED`` split);
            a rank takes GPU ``local_rank % n_gpus``.
    """

    def __init__(self, mpi_comm=None):
        self._comm = mpi_comm
        if mpi_comm is None:
            self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
            self._local = None
            return
        from mpi4py import MPI

        self._MPI = MPI
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self._local = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = self._local.Get_rank(), self._local.Get_size()

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    @property
    def is_mpi(self) -> bool:
        return self._comm is not None

    def allreduce(self, arr, op: str = "sum") -> np.ndarray:
        """Element-wise ``sum``, ``max`` or ``min`` of a NumPy array over all ranks (a copy)."""
        arr = np.ascontiguousarray(arr)
        if self._comm is None:
            return arr.copy()
        mop = {"sum": self._MPI.SUM, "max": self._MPI.MAX, "min": self._MPI.MIN}[op]
        out = np.empty_like(arr)
        self._comm.Allreduce(arr, out, op=mop)
        return out

    def allgather(self, obj) -> list:
        """Every rank's ``obj`` (any picklable object), in rank order, on every rank."""
        return [obj] if self._comm is None else self._comm.allgather(obj)

    def bcast(self, obj, root: int = 0):
        return obj if self._comm is None else self._comm.bcast(obj, root=root)

    def barrier(self, timeout: float | None = None) -> bool:
        """Wait for every rank; with ``timeout`` (s) give up after it and return False."""
        if self._comm is None:
            return True
        if timeout is None:
            self._comm.Barrier()
            return True
        req = self._comm.Ibarrier()
        t_end = time.monotonic() + timeout
        while not req.Test():
            if time.monotonic() > t_end:
                return False
            time.sleep(0.01)
        return True

    def abort(self, code: int = 1) -> None:
        if self._comm is not None:
            self._comm.Abort(code)


def launched_with_mpi() -> bool:
    """Whether an MPI launcher started this process as one of several ranks."""
    if os.environ.get("GPUSMALL_MPI", "").strip() in ("0", "no", "off", "false"):
        return False
    for v in _SIZE_VARS:
        try:
            if int(os.environ.get(v, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


_COMM: Comm | None = None


def get_comm() -> Comm:
    """The process's communicator (created once): MPI when launched as several ranks, else serial."""
    global _COMM
    if _COMM is None:
        comm = None
        if launched_with_mpi():
            try:
                from mpi4py import MPI

                comm = MPI.COMM_WORLD
            except ImportError:
                log.warning("launched under MPI but mpi4py is not importable: running as one rank")
        _COMM = Comm(comm)
    return _COMM


def block_range(n_events: int | None, batch_size: int, rank: int, size: int) -> tuple[int, int | None]:
    """Events ``[start, stop)`` of ``rank``: contiguous whole batches, balanced to within one batch.

    A sequential source of unknown length (``n_events`` None, psana) is read whole by rank 0
    (``stop`` None: to the end); psana's own MPI event distribution is not used yet.

    >>> [block_range(10, 2, r, 2) for r in range(2)]
    [(0, 6), (6, 10)]
    """
    if n_events is None:
        return (0, None) if rank == 0 else (0, 0)
    n_batches = -(-n_events // batch_size)
    per, extra = divmod(n_batches, size)
    b0 = rank * per + min(rank, extra)
    b1 = b0 + per + (1 if rank < extra else 0)
    return min(b0 * batch_size, n_events), min(b1 * batch_size, n_events)


def gpu_for_rank(comm: Comm, choice: str) -> int | None:
    """GPU id ``local_rank % n_gpus`` for this rank, or None (NumPy, or no GPU visible)."""
    if choice == "numpy":
        return None
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return None
    return comm.local_rank % n if n > 0 else None
