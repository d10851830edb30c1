"""Stand-ins for CuPy's stream API and for ``cupyx``, so the CuPy code paths run on the CPU.

* :func:`fake_cuda`: ``cuda.Event``/streams/``empty``/``asnumpy`` as ``BatchProcessor`` uses them; events
  and waits are logged, ``empty`` hands out :class:`FakeDeviceArray` (with CuPy's ``set``).
* :func:`numpy_as_cupy`: NumPy under another name (``xp is np`` is False, ``__name__`` is "cupy"), so
  CuPy-only branches run, with the attributes of :func:`fake_cuda` added.
* :func:`install_fake_cupyx`: ``cupyx`` replaced by SciPy with the CuPy restrictions we know of:
  ``scatter_min`` takes int32/uint32/uint64/float32/float64 only, ``ndimage.label`` numbers labels in
  another order than SciPy.
* :func:`strict_cupy` / :class:`DeviceArray`: NumPy under CuPy's rules (no implicit conversion of a
  device array to NumPy or of a host array into device arithmetic, 0-d results of reductions), every
  transfer to the host logged; with a :class:`TrafficLog` as the log, every device operation too (the
  bytes it reads and writes in device memory: ``tests/device_traffic.py``).
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
    """(xp with cuda/empty/asnumpy/asarray/concatenate, stream factory handing out the "copy", "compute"
    and "results" streams)."""

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

    def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
        if out is None:
            return np.array(a, copy=True)
        assert stream is not None and not blocking, "an asynchronous copy names its stream"
        log.append(("d2h", stream.name))
        np.copyto(out, a)
        return out

    cuda = types.SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: 2.0)
    xp = types.SimpleNamespace(
        cuda=cuda,
        empty=empty,
        asnumpy=asnumpy,
        asarray=np.asarray,
        uint8=np.uint8,
        ascontiguousarray=np.ascontiguousarray,
        concatenate=np.concatenate,
        get_default_memory_pool=lambda: types.SimpleNamespace(free_all_blocks=lambda: None),
    )
    streams = iter([Stream("copy"), Stream("compute"), Stream("results")])
    return xp, lambda non_blocking=True: next(streams)


def numpy_as_cupy(extra=None):
    """NumPy's namespace as a module that is not NumPy, plus the attributes of ``extra``."""
    xp = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("_")})
    xp.__name__ = "cupy"
    if extra is not None:
        for k, v in vars(extra).items():
            setattr(xp, k, v)
    return xp


def install_fake_cupyx(monkeypatch, seed=1, transfers=None):
    """Put the ``cupyx`` stand-in into ``sys.modules`` for one test. With ``transfers`` (a log list) it
    takes and gives :class:`DeviceArray` as the real one takes and gives CuPy arrays."""
    dev = (lambda r: r) if transfers is None else (lambda r: wrap(r, transfers))

    def label(mask, structure=None):
        lab, n = sp_ndimage.label(unwrap(mask), structure=structure)
        if transfers is not None:
            transfers.append(("sync", 1))  # cupyx.scipy.ndimage.label reads the number of labels
            if getattr(transfers, "ops", None) is not None:  # its kernels (cupyx _label): init, connect,
                px = lab.size  # count, labels, finalize over int32 labels
                transfers.ops.append(("op", "cupyx label", px * (1 + 4 * 5), px * 4 * 2))
        perm = np.concatenate([[0], 1 + np.random.default_rng(seed).permutation(n)]).astype(np.int32)
        return dev(perm[lab]), int(n)

    def scatter_min(a, slices, value):
        a, slices, value = unwrap(a), unwrap(slices), unwrap(value)
        if np.asarray(value).dtype not in (np.int32, np.uint32, np.uint64, np.float32, np.float64):
            raise TypeError("scatter_min only supports int32, float32, float64, uint32, uint64 as data type")
        np.minimum.at(a, slices, np.asarray(value, a.dtype))

    class DeviceCsr:
        """cupyx.scipy.sparse.csr_matrix made from a SciPy one: ``M @ dense`` on device arrays."""

        def __init__(self, m):
            self.m, self.shape = scipy.sparse.csr_matrix(m), m.shape

        def __matmul__(self, x):
            if transfers is not None:
                assert isinstance(x, DeviceArray), "a cupyx sparse matrix times a host array"
            r = self.m @ unwrap(x)
            if getattr(transfers, "ops", None) is not None:  # the matrix (values, columns, row pointers) + x
                m = self.m
                transfers.ops.append(
                    ("op", "csr matmul", m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + x.nbytes, r.nbytes)
                )
            return dev(r)

    ndi = types.ModuleType("cupyx.scipy.ndimage")
    ndi.label = label
    sparse = types.ModuleType("cupyx.scipy.sparse")
    sparse.csr_matrix = DeviceCsr if transfers is not None else scipy.sparse.csr_matrix
    fft = scipy.fft if transfers is None else strict_cupy(transfers, module=scipy.fft, name="cupyx.scipy.fft")
    sci = types.ModuleType("cupyx.scipy")
    sci.ndimage, sci.sparse, sci.fft = ndi, sparse, fft
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy, cupyx.scatter_min = sci, scatter_min
    for name, mod in (
        ("cupyx", cupyx),
        ("cupyx.scipy", sci),
        ("cupyx.scipy.ndimage", ndi),
        ("cupyx.scipy.sparse", sparse),
        ("cupyx.scipy.fft", fft),
    ):
        monkeypatch.setitem(sys.modules, name, mod)


# ---- CuPy's rules on NumPy arrays ---------------------------------------------------------------------
class TrafficLog(list):
    """A ``transfers`` log that also keeps, in ``ops``, one ``(kind, name, bytes read, bytes written)`` per
    device operation: kind "op" for an array operation (one kernel on a GPU), "view" never (views are
    free), "kernel" for a RawKernel launch (``tests/device_traffic.py`` models what it touches). The byte
    counts are what each operation must move at least: every input array read once, every output
    written once (a gather reads as many elements as it writes, plus its index)."""

    def __init__(self):
        super().__init__()
        self.ops = []


ALLOCATIONS = {"empty", "empty_like"}  # memory handed out, not written: free
VIEWS = {
    "reshape",
    "ravel",
    "view",
    "transpose",
    "swapaxes",
    "moveaxis",
    "squeeze",
    "expand_dims",
    "broadcast_to",
    "T",
    "real",
    "imag",
    "atleast_1d",
    "atleast_2d",
    "atleast_3d",
    "asarray",
}


def _nbytes(x) -> int:
    return sum(v.nbytes for v in _leaves(x) if isinstance(v, (DeviceArray, np.ndarray)) and v.ndim >= 1)


def _record(log, name, inputs, result, written=None):
    """One device operation into ``log.ops`` (when ``log`` is a :class:`TrafficLog`): nothing for a view
    of an input, else every device input read once and the result (or ``written`` bytes) written once."""
    ops = getattr(log, "ops", None)
    if ops is None or name in ALLOCATIONS:
        return
    arrays = [v.a for v in _leaves(inputs) if isinstance(v, DeviceArray)]
    res = [v for v in _leaves(result if isinstance(result, (tuple, list)) else (result,)) if isinstance(v, np.ndarray)]
    if name in VIEWS and res and all(any(np.may_share_memory(r, a) for a in arrays) for r in res):
        return
    read = sum(a.nbytes for a in arrays if a.ndim >= 1)
    ops.append(("op", name, read, sum(r.nbytes for r in res) if written is None else written))


class DeviceArray(np.lib.mixins.NDArrayOperatorsMixin):
    """A NumPy array held as if on a GPU, under CuPy's rules.

    * No implicit conversion to NumPy: ``np.asarray(d)`` raises TypeError (CuPy: "Implicit conversion to
      a NumPy array is not allowed"), so does a host array (ndim >= 1) mixed into a ufunc or a NumPy
      function with device arrays (CuPy: "Unsupported type").
    * Reductions give 0-d device arrays, as CuPy's do, not NumPy scalars.
    * Every way to the host is logged in ``transfers``: ``.get()``/``asnumpy`` as ("d2h", nbytes);
      ``float()``/``int()``/``bool()``/``.item()``/``.tolist()``, boolean-mask indexing and functions whose
      result size depends on the data (``nonzero``, ``unique``, ...) as ("sync", 1).
    """

    __slots__ = ("a", "transfers")

    def __init__(self, a, transfers):
        self.a, self.transfers = a, transfers

    # -- CuPy's conversions
    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
            "a NumPy array explicitly."
        )

    def get(self, stream=None):
        self.transfers.append(("d2h", self.a.nbytes))
        return np.array(self.a, copy=True)

    def set(self, host, stream=None):
        assert isinstance(host, np.ndarray) and host.shape == self.a.shape and host.dtype == self.a.dtype
        assert stream is not None, "uploads go on an explicit stream"
        self.transfers.append(("h2d", host.nbytes))
        np.copyto(self.a, host)

    def _sync(self):
        self.transfers.append(("sync", 1))
        return self.a

    def __float__(self):
        return float(self._sync())

    def __int__(self):
        return int(self._sync())

    def __index__(self):
        return int(self._sync())

    def __bool__(self):
        return bool(self._sync())

    def item(self):
        return self._sync().item()

    def tolist(self):
        return self._sync().tolist()

    def __len__(self):
        return len(self.a)

    def __iter__(self):
        return (self.wrap(x) for x in self.a)

    def __repr__(self):
        return f"DeviceArray({self.a!r})"

    # -- plumbing
    def wrap(self, r):
        return wrap(r, self.transfers)

    @property
    def shape(self):
        return self.a.shape

    @property
    def dtype(self):
        return self.a.dtype

    @property
    def ndim(self):
        return self.a.ndim

    @property
    def size(self):
        return self.a.size

    @property
    def nbytes(self):
        return self.a.nbytes

    @property
    def flags(self):
        return self.a.flags

    @property
    def strides(self):
        return self.a.strides

    @property
    def T(self):
        return self.wrap(self.a.T)

    @property
    def real(self):
        return self.wrap(self.a.real)

    @property
    def imag(self):
        return self.wrap(self.a.imag)

    def __getitem__(self, key):
        if any(getattr(k, "dtype", None) == np.bool_ for k in (key if isinstance(key, tuple) else (key,))):
            self.transfers.append(("sync", 1))  # a boolean mask: CuPy waits for the size of the result
        r = self.a[unwrap(key)]  # a host index array is allowed: CuPy uploads it
        if not np.may_share_memory(r, self.a):  # a gather: reads what it writes, and its index
            _record(self.transfers, "getitem", key, r, written=2 * r.nbytes)
        return self.wrap(r)

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and value.ndim:
            self.transfers.append(("h2d", value.nbytes))  # CuPy uploads a host array set into a device one
        k = unwrap(key)
        if getattr(self.transfers, "ops", None) is not None:
            target = self.a[k]
            _record(self.transfers, "setitem", (key, value), None, written=np.asarray(target).nbytes)
        self.a[k] = unwrap(value)

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ / __array_struct__: NumPy must not see the data
            raise AttributeError(name)
        attr = getattr(self.a, name)
        if callable(attr):

            def method(*args, **kwargs):
                _no_host_arrays(name, args, kwargs)
                r = attr(*unwrap(args), **unwrap(kwargs))
                _record(self.transfers, name, (self, args, kwargs), self.a if r is None else r)  # None: in place
                return self.wrap(r)

            return method
        r = self.wrap(attr)
        if isinstance(r, DeviceArray):
            _record(self.transfers, name, self, r.a)
        return r

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _no_host_arrays(ufunc.__name__, inputs, kwargs)
        r = getattr(ufunc, method)(*unwrap(inputs), **unwrap(kwargs))
        if method == "at":  # a scatter: reads its values and index, writes as many elements as it has indices
            _record(
                self.transfers,
                f"{ufunc.__name__}.at",
                inputs[1:],
                None,
                written=np.asarray(unwrap(inputs[1])[0] if isinstance(inputs[1], tuple) else unwrap(inputs[1])).size
                * unwrap(inputs[0]).itemsize,
            )
            return None
        _record(self.transfers, ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}", inputs, r)
        return self.wrap(r)

    def __array_function__(self, func, types, args, kwargs):
        _no_host_arrays(func.__name__, args, kwargs)
        if func.__name__ in SIZE_FROM_DATA:
            self.transfers.append(("sync", 1))
        r = func(*unwrap(args), **unwrap(kwargs))
        _record(self.transfers, func.__name__, (args, kwargs), r)
        return self.wrap(r)


# results whose size depends on the data: CuPy waits for the GPU to know it (a device->host sync)
SIZE_FROM_DATA = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"}


def _no_host_arrays(what, args, kwargs):
    for v in list(_leaves(args)) + list(_leaves(kwargs)):
        if isinstance(v, np.ndarray) and v.ndim >= 1:
            raise TypeError(
                f"{what}: Unsupported type <class 'numpy.ndarray'> (a host array mixed with device "
                f"arrays; CuPy does not convert it implicitly)"
            )


def _leaves(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    else:
        yield x


def unwrap(x):
    if isinstance(x, DeviceArray):
        return x.a
    if isinstance(x, tuple):
        return tuple(unwrap(v) for v in x)
    if isinstance(x, list):
        return [unwrap(v) for v in x]
    if isinstance(x, dict):
        return {k: unwrap(v) for k, v in x.items()}
    return x


def wrap(r, transfers):
    """NumPy results as device arrays (scalars as 0-d, as CuPy's reductions give them)."""
    if isinstance(r, np.ndarray):
        return DeviceArray(r, transfers)
    if isinstance(r, np.generic):
        return DeviceArray(np.asarray(r), transfers)
    if isinstance(r, tuple):
        return tuple(wrap(v, transfers) for v in r)
    if isinstance(r, list):
        return [wrap(v, transfers) for v in r]
    return r


class StrictXp(types.SimpleNamespace):
    """``cupy`` as NumPy under CuPy's rules: functions take and give :class:`DeviceArray`; ``asarray``
    uploads a host array, ``asnumpy`` downloads (both logged in ``transfers``)."""


def strict_cupy(transfers, extra=None, module=np, name="cupy"):
    ns = StrictXp()
    for k in dir(module):
        if k.startswith("_"):
            continue
        v = getattr(module, k)
        if isinstance(v, types.ModuleType):
            if k in ("fft", "linalg", "random"):
                setattr(ns, k, strict_cupy(transfers, module=v, name=f"{name}.{k}"))
            continue
        if isinstance(v, (type, np.ufunc)) or not callable(v):
            setattr(ns, k, v)  # dtypes, classes, ufuncs (these dispatch on DeviceArray), constants
            continue
        setattr(ns, k, _strict_function(v, transfers))
    ns.__name__ = name
    ns.ndarray = DeviceArray

    def asarray(a, dtype=None, order=None):
        if isinstance(a, DeviceArray):
            r = np.asarray(a.a, dtype=dtype, order=order)
            if r is a.a:
                return a
            _record(transfers, "asarray(copy)", a, r)
            return DeviceArray(r, transfers)
        host = np.asarray(a, dtype=dtype, order=order)
        if host.ndim:
            transfers.append(("h2d", host.nbytes))
        return DeviceArray(np.array(host, copy=True, order=order or "K"), transfers)

    def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
        if not isinstance(a, DeviceArray):
            return np.asarray(a)
        host = a.get()
        if out is None:
            return host
        np.copyto(out, host)
        return out

    def on_device(name, a, r):
        if not np.may_share_memory(r, a.a):
            _record(transfers, name, a, r)
        return DeviceArray(r, transfers)

    ns.asarray, ns.asnumpy = asarray, asnumpy
    ns.array = lambda a, dtype=None, copy=True, order="K": (
        on_device("array", a, np.array(a.a, dtype=dtype, copy=copy, order=order))
        if isinstance(a, DeviceArray)
        else asarray(np.array(a, dtype=dtype, copy=True, order=order))
    )
    ns.ascontiguousarray = lambda a, dtype=None: (
        on_device("ascontiguousarray", a, np.ascontiguousarray(a.a, dtype=dtype))
        if isinstance(a, DeviceArray)
        else asarray(np.ascontiguousarray(a, dtype=dtype))
    )
    if extra is not None:
        for k, v in vars(extra).items():
            setattr(ns, k, v)
    return ns


def _strict_function(f, transfers):
    def call(*args, **kwargs):
        _no_host_arrays(getattr(f, "__name__", "function"), args, kwargs)
        if getattr(f, "__name__", "") in SIZE_FROM_DATA:
            transfers.append(("sync", 1))
        r = f(*unwrap(args), **unwrap(kwargs))
        if any(isinstance(v, DeviceArray) for v in _leaves((args, kwargs))) or isinstance(r, np.ndarray):
            _record(transfers, getattr(f, "__name__", "function"), (args, kwargs), r)
        return wrap(r, transfers)

    call.__name__ = getattr(f, "__name__", "function")
    return call
