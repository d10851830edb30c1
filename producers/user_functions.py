"""Example user functions for gpusmall (see README, "Your own code in the event loop").

Each works on the run's backend through ``batch.xp`` (NumPy on a CPU, CuPy on a GPU), on a whole batch of
events at once, and returns arrays with a leading events axis.
"""


def photon_moments(batch, threshold=5.0):
    """Per event: pixels at or above ``threshold`` (ADU), their total and intensity-weighted (row, col).

    batch.frames: (events, panels, rows, cols) float32, bad pixels 0; panels are summed (a camera has one).
    """
    xp = batch.xp
    hit = batch.good & (batch.frames >= threshold)
    img = xp.where(hit, batch.frames, xp.float32(0)).sum(axis=1)  # (events, rows, cols)
    total = img.sum(axis=(1, 2), dtype=xp.float64)
    weight = xp.where(total > 0, total, xp.nan)  # no hit: NaN centre, without a division by zero
    rows = xp.arange(img.shape[1], dtype=xp.float64)
    cols = xp.arange(img.shape[2], dtype=xp.float64)
    return {"n": hit.sum(axis=(1, 2, 3)), "total": total,
            "com": xp.stack([(img.sum(axis=2) * rows).sum(axis=1) / weight,
                             (img.sum(axis=1) * cols).sum(axis=1) / weight], axis=1)}


def intensity_ratio(batches, a, b):
    """Per event: detector ``a``'s total over detector ``b``'s, and the two ROI sums side by side."""
    xp = batches[a].xp
    ta = batches[a].frames.sum(axis=(1, 2, 3), dtype=xp.float64)
    tb = batches[b].frames.sum(axis=(1, 2, 3), dtype=xp.float64)
    return {"ratio": ta / tb,
            "roi_sums": xp.stack([batches[a].outputs["roi0_sum"], batches[b].outputs["roi0_sum"]], axis=1)}
