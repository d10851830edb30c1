"""Event sources: simulated runs, HDF5 files, psana (LCLS-II XTC2)."""

from __future__ import annotations

from .base import DetectorSource, RawBatch, Source


def open_source(cfg) -> Source:
    """The source a validated :class:`~gpusmall.producer.config.RunConfig` names."""
    s = cfg.source
    dets = {
        name: {
            "type": d.type,
            "shape": d.panel_shape(),
            "pixel_um": d.pixel_um,
            "dataset": d.dataset,
            "source_name": d.source_name,
            "constants": d.constants,
            "shape_given": d.shape is not None,
        }
        for name, d in cfg.detectors.items()
    }
    if s.type == "sim":
        from .sim import SimSource

        return SimSource(
            s.events,
            dets,
            seed=s.seed,
            damage_every=getattr(s, "damage_every", 0),
            threads=getattr(s, "threads", None),
            simulate=s.simulate,
        )
    if s.type == "hdf5":
        from .hdf5 import Hdf5Source

        return Hdf5Source(
            s.path,
            dets,
            events=s.events,
            timestamp=s.timestamp,
            follow=s.follow,
            follow_timeout_s=s.follow_timeout_s,
            timestamp_required="timestamp" in s.model_fields_set,
            context=cfg.context.values,
        )
    if s.type == "psana":
        from .psana import PsanaSource  # imports psana only here

        return PsanaSource(s, dets, context=cfg.context)
    raise ValueError(f"unknown source type {s.type!r}")


__all__ = ["DetectorSource", "RawBatch", "Source", "open_source"]
