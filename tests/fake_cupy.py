"""Stand-ins for CuPy's stream API and for ``cupyx``, so the CuPy code paths run on the CPU.

* :func:`fake_cuda`: ``cuda.Event``/streams/``empty``/``asnumpy`` as ``BatchProcessor`` uses them; events
  and waits are logged, ``empty`` hands out :class:`FakeDeviceArray` (with CuPy's ``set``).
* :func:`numpy_as_cupy`: NumPy under another name (``xp is np`` is False, ``__name__`` is "cupy"), so
  CuPy-only branches run, with the attributes of :func:`fake_cuda` added.
* :func:`install_fake_cupyx`: ``cupyx`` replaced by SciPy with the CuPy restrictions we know of:
  ``scatter_min`` takes int32/uint32/uint64/float32/float64 only, ``ndimage.label`` numbers labels in
  another order than SciPy.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import scipy.fft
import scipy.sparse
from scipy import ndimage as sp_ndimage


class FakeDeviceArray(np.ndarray):
    """A NumPy array with CuPy's ``set(host, stream=)``."""

    def set(self, host, stream=None):
        assert host.shape == self.shape and host.dtype == self.dtype
        assert stream is not None, "uploads go on an explicit stream"
        np.copyto(np.asarray(self), host)


class OutOfMemoryError(MemoryError):
    pass


def fake_cuda(log, oom_slots=False):
    """(xp with cuda/empty/asnumpy/asarray, stream factory handing out the "copy" then "compute" stream)."""
    class Event:
        def __init__(self):
            self.stream = None

        def record(self, stream=None):
            self.stream = stream
            log.append(("record", stream.name))

        def synchronize(self):
            pass

    class Stream:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait_event(self, event):
            log.append(("wait", self.name, event.stream.name))

    def empty(shape, dtype=np.float64):
        if oom_slots and len(log) == 0:
            raise OutOfMemoryError("Out of memory allocating the slots")
        return np.empty(shape, dtype).view(FakeDeviceArray)

    cuda = types.SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: 2.0)
    xp = types.SimpleNamespace(cuda=cuda, empty=empty, asnumpy=np.asarray, asarray=np.asarray,
                               get_default_memory_pool=lambda: types.SimpleNamespace(free_all_blocks=lambda: None))
    streams = iter([Stream("copy"), Stream("compute")])
    return xp, lambda non_blocking=True: next(streams)


def numpy_as_cupy(extra=None):
    """NumPy's namespace as a module that is not NumPy, plus the attributes of ``extra``."""
    xp = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("_")})
    xp.__name__ = "cupy"
    if extra is not None:
        for k, v in vars(extra).items():
            setattr(xp, k, v)
    return xp


def install_fake_cupyx(monkeypatch, seed=1):
    """Put the ``cupyx`` stand-in into ``sys.modules`` for one test."""
    def label(mask, structure=None):
        lab, n = sp_ndimage.label(mask, structure=structure)
        perm = np.concatenate([[0], 1 + np.random.default_rng(seed).permutation(n)]).astype(np.int32)
        return perm[lab], n

    def scatter_min(a, slices, value):
        if np.asarray(value).dtype not in (np.int32, np.uint32, np.uint64, np.float32, np.float64):
            raise TypeError("scatter_min only supports int32, float32, float64, uint32, uint64 as data type")
        np.minimum.at(a, slices, np.asarray(value, a.dtype))

    ndi = types.ModuleType("cupyx.scipy.ndimage")
    ndi.label = label
    sparse = types.ModuleType("cupyx.scipy.sparse")
    sparse.csr_matrix = scipy.sparse.csr_matrix
    sci = types.ModuleType("cupyx.scipy")
    sci.ndimage, sci.sparse, sci.fft = ndi, sparse, scipy.fft
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy, cupyx.scatter_min = sci, scatter_min
    for name, mod in (("cupyx", cupyx), ("cupyx.scipy", sci), ("cupyx.scipy.ndimage", ndi),
                      ("cupyx.scipy.sparse", sparse), ("cupyx.scipy.fft", scipy.fft)):
        monkeypatch.setitem(sys.modules, name, mod)
