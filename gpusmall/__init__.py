"""gpusmall: GPU-batched event-by-event reduction of X-ray area detector data ('small data').

The Python API (docs/API.md; nothing heavy is imported until it is used)::

    import gpusmall
    run = gpusmall.open_run("config.yaml")     # Run: config, avimage(), plot_avimage(), run()
    res = gpusmall.open_result(run.run())      # Result: keys(), to_dataframe(), to_xarray(), sums(), cube()
    cube = gpusmall.open_cube("run.cube.h5")   # xarray Dataset

Beamtime set-up helpers (on an average image and the detector's x, y in um): ``find_geometry`` / ``fit_center``
(beam centre and distance from rings; ``write_poni``), ``make_mask`` / ``save_user_mask`` / ``show_mask`` (hot, dead
and noisy pixels, drawn regions, the ``mask.user`` file), ``RoiPicker`` / ``roi_png`` / ``bounds_from_rectangle``
(ROI bounds in config syntax).
"""

__version__ = "0.1.0"

from .api import Result, Run, open_cube, open_result, open_run  # noqa: E402  (light: imports on use)

_TOOLS = {
    "find_geometry": "centre",
    "fit_center": "centre",
    "write_poni": "centre",
    "make_mask": "maskmaker",
    "save_user_mask": "maskmaker",
    "show_mask": "maskmaker",
    "RoiPicker": "roi_picker",
    "PanelView": "roi_picker",
    "roi_png": "roi_picker",
    "bounds_from_rectangle": "roi_picker",
}


def __getattr__(name):
    """The beamtime helpers of :data:`_TOOLS`, imported on first use (``gpusmall.analysis.<module>``)."""
    if name in _TOOLS:
        import importlib

        return getattr(importlib.import_module(f".analysis.{_TOOLS[name]}", __name__), name)
    raise AttributeError(f"module 'gpusmall' has no attribute {name!r}")


__all__ = ["Run", "Result", "open_run", "open_result", "open_cube", "__version__", *_TOOLS]
