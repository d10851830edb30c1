"""Does the run fit? Host (and device) memory estimated at set-up, refused before any event is read.

A batch size, a detector shape or a padded output length too large for the machine would otherwise pass
validation and end the run later in an out-of-memory kill, with nothing named. Two checks:

- :func:`check_frames_fit` before the source is opened (sim and hdf5 sources, shapes from the config):
  the per-pixel constants and the raw host buffers of every detector;
- :func:`check_run_fits` once the pipelines are set up: raw buffers, calibrated frames and one batch
  of every function's outputs (measured on one event, see ``DetectorPipeline.event_output_nbytes``).

Both raise :class:`~gpusmall.errors.InputError` naming the key to change (``batch_size``,
``detectors.<det>.shape``, the function with the largest output). The estimates are deliberately rough
(a factor for temporaries): they refuse what cannot fit, not what is tight.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError

N_HOST_BUFFERS = 4  # raw host buffers per detector (the run loop's reader ring, producer.run.N_BUFFERS)
N_RESULT_BATCHES = 4  # batches of results alive at once: reducing, on the way back, queued, writing
FRAME_BYTES_PER_PIXEL = 4 * 4 + 2  # calibrated float32 frames and their temporaries, the good mask
CONSTANT_BYTES_PER_GAIN = 8  # pedestal and gain, float32, per gain range
CONSTANT_BYTES_PER_PIXEL = 40  # noise, status, x, y, z, masks, bin maps
USABLE_FRACTION = 0.9


def available_host_bytes() -> int:
    """Memory this process may still take: ``MemAvailable`` of /proc/meminfo, else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def available_device_bytes(backend) -> int | None:
    """Free memory on the backend's GPU, or None (NumPy, or not known)."""
    if not backend.is_gpu:
        return None
    try:
        return int(backend.xp.cuda.runtime.memGetInfo()[0])
    except Exception:  # noqa: BLE001 - a stand-in or a driver without the call: no device check
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _refuse(key: str, need: int, have: int, where: str, what: str, hint: str) -> None:
    raise InputError(f"{key}: {what} needs about {gib(need)} of {where} memory, {gib(have)} is available; {hint}")


def check_frames_fit(cfg, batch_size: int, available: int | None = None) -> None:
    """Before the source is opened: one detector's constants and its raw host buffers must fit.

    ``cfg`` is a validated RunConfig; ``available`` (bytes) defaults to :func:`available_host_bytes`."""
    from ..detectors import get_model

    have = int((available_host_bytes() if available is None else available) * USABLE_FRACTION)
    total, largest = 0, None
    for name, det in cfg.detectors.items():
        shape = det.panel_shape()
        if shape is None:  # psana: the source knows it; checked after set-up
            continue
        pixels = int(np.prod(shape, dtype=object))
        model = get_model(det.type)
        constants = pixels * (CONSTANT_BYTES_PER_GAIN * model.n_gains + CONSTANT_BYTES_PER_PIXEL)
        if constants > have:
            _refuse(
                f"detectors.{name}.shape",
                constants,
                have,
                "host",
                f"a {det.type} of shape {list(shape)} ({pixels:,} pixels)",
                "check the shape",
            )
        raw = N_HOST_BUFFERS * batch_size * pixels * 2
        total += constants + raw
        if largest is None or raw > largest[1]:
            largest = (name, raw)
    if total > have:
        _refuse(
            "batch_size",
            total,
            have,
            "host",
            f"a batch of {batch_size} events (detector {largest[0]}'s raw "  # type: ignore[index]
            f"buffers: {gib(largest[1])})",  # type: ignore[index]
            "lower batch_size",
        )


def check_run_fits(pipelines: dict, batch_size: int, backend, available: int | None = None) -> None:
    """After set-up: raw buffers, calibrated frames and a batch of outputs of every detector must fit.

    ``pipelines``: name -> DetectorPipeline (set up). Host memory always; the GPU's too on CuPy."""
    have = int((available_host_bytes() if available is None else available) * USABLE_FRACTION)
    device_have = available_device_bytes(backend)
    host = device = 0
    biggest = ("batch_size", 0, "")
    for name, pl in pipelines.items():
        pixels = int(np.prod(pl.shape))
        raw_event = pixels * np.dtype(pl.raw_dtype).itemsize
        frames_event = pixels * FRAME_BYTES_PER_PIXEL
        outputs = pl.event_output_nbytes()  # function path -> bytes per event
        out_event = sum(outputs.values())
        host += batch_size * (N_HOST_BUFFERS * raw_event + N_RESULT_BATCHES * out_event)
        if backend.is_gpu:
            device += batch_size * (2 * raw_event + frames_event + 2 * out_event)
        else:
            host += batch_size * frames_event
        for path, nbytes in outputs.items():
            if nbytes * batch_size * N_RESULT_BATCHES > biggest[1]:
                biggest = (path, nbytes * batch_size * N_RESULT_BATCHES, name)
    hint = "lower batch_size"
    key = "batch_size"
    if biggest[1] > host / 2:  # one function's outputs dominate: name it
        key = biggest[0]
        hint = f"its outputs take {gib(biggest[1])}; make them smaller (e.g. max_droplets, bins) or lower batch_size"
    if host > have:
        _refuse(key, host, have, "host", f"a batch of {batch_size} events", hint)
    if device_have is not None and device > device_have * USABLE_FRACTION:
        _refuse(
            "batch_size",
            device,
            int(device_have * USABLE_FRACTION),
            "GPU",
            f"a batch of {batch_size} events",
            "lower batch_size",
        )
