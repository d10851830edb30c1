# %% [markdown]
# # gpusmall tutorial: from a first look to a production run and its cube
#
# A notebook in jupytext's percent format: open it in Jupyter with jupytext (`jupytext --to notebook
# docs/tutorial.py`) or run it as a script (`python docs/tutorial.py`); CI runs it (tests/test_tutorial.py).
# It works in the current folder and needs no input: a simulated ePix10ka with 4 panels around the beam, a
# pump-probe delay scan, laser on/off shots, dropped X-ray shots and a beam-intensity monitor (`ipm/sum`).
#
# The steps are those of a beamtime set-up: an average image, an ROI, the beam centre and distance from the
# powder rings, a mask of hot pixels, then the production run with those parameters and the cube per delay step.

# %%
import matplotlib

matplotlib.use("Agg")  # (in Jupyter, leave this out: figures show inline)
import numpy as np  # noqa: E402

import gpusmall  # noqa: E402

EVENTS = 60
config = {
    "source": {"type": "sim", "events": EVENTS, "seed": 1,
               "simulate": {"scan": {"variable": "delay", "start": -1.0, "step": 1.0, "events_per_step": 20},
                            "laser_off_every": 2, "xray_off_every": 10}},
    "backend": "numpy", "batch_size": 20, "output": "tutorial.h5",
    "detectors": {"epix": {"type": "epix10ka", "shape": [4, 352, 384],
                           "common_mode": {"type": "median", "axes": ["rows", "cols"]}}},
}
run = gpusmall.open_run(config)
print(run)

# %% [markdown]
# ## 1. The average image
# `avimage` calibrates the first events as the run would (pedestal, gain, common mode, mask) and averages them.

# %%
av = run.avimage(events=EVENTS)
print("average image", av.mean.shape, "from", av.events, "events")
fig = run.plot_avimage(av=av, title="average, ADU")
fig.savefig("tutorial_avimage.png")

# %% [markdown]
# ## 2. An ROI
# In Jupyter, `gpusmall.RoiPicker(gpusmall.PanelView(av.mean))` shows panel / row / col under the cursor and turns
# drawn rectangles into bounds. Here the rectangle is given: columns 100-200, rows 50-150 of panel 1.

# %%
roi_bounds = gpusmall.bounds_from_rectangle(1, 100, 50, 200, 150)
print("roi bounds", roi_bounds)
gpusmall.roi_png(av.mean, "tutorial_roi.png", rois=[roi_bounds])

# %% [markdown]
# ## 3. Beam centre and distance
# The simulated sample has powder rings at q = 1.2, 2.0, 2.9 per Angstrom at 9.5 keV, 100 mm from the detector,
# the beam at (0, 0). The fit finds the rings in the average image, fits their common centre, and the distance
# from their radii.

# %%
good = np.isfinite(av.mean)
geometry = gpusmall.find_geometry(np.where(good, av.mean, 0), av.x_um, av.y_um, mask=good, energy_kev=9.5,
                                  ring_q=[1.2, 2.0, 2.9], max_rings=2)  # two rings reach this small detector
azav_params = geometry.azav_params()
print("centre (um)", np.round(geometry.center_um, 1), "distance (mm)", round(geometry.distance_mm, 2))

# %% [markdown]
# ## 4. A mask
# Hot pixels (the simulated Bragg spot: far above the robust spread of the average) and a drawn region (the
# first 8 rows of panel 0), saved as the `mask.user` file the config takes.

# %%
maps = gpusmall.make_mask(np.where(good, av.mean, 0), hot_k=50.0, noisy_k=None, dead_std_frac=None)
bad = maps["hot"] | ~good
bad[0, :8, :] = True
mask_file = gpusmall.save_user_mask("tutorial_mask.npy", bad)
print("masked pixels", int(bad.sum()), "->", mask_file)

# %% [markdown]
# ## 5. The production run
# The ROI, the azimuthal integration with the fitted geometry, the user mask, a sum over the dropped X-ray shots,
# and a cube: per delay step and laser state the full frames, the azav and the I0.

# %%
production = dict(config)
production["detectors"] = {"epix": {**config["detectors"]["epix"],
                                    "mask": {"user": mask_file},
                                    "functions": [{"type": "roi", "name": "roi0", "bounds": roi_bounds},
                                                  {"type": "azav", "bins": 100, **azav_params}],
                                    "sums": ["calib", "calib_dropped"]}}
production["cube"] = {"by": "scan/varStep", "split": ["laser_on", "laser_off"], "norm": "ipm/sum",
                      "detectors": {"epix": {"outputs": ["azav_azav"]}}}
path = gpusmall.open_run(production).run()
res = gpusmall.open_result(path)
df = res.to_dataframe(["epix/roi0_sum", "ipm/sum", "lightStatus/laser", "lightStatus/xray", "scan/delay"])
print(df.groupby(["scan/delay", "lightStatus/laser"])["epix/roi0_sum"].mean().unstack())

# %% [markdown]
# ## 6. The cube: laser on minus laser off, per delay
# The cube file beside the result holds per bin the event count and the sums; means are sums / counts. Normalised
# by I0, the laser-on frames get brighter after time zero (the simulated pump).

# %%
cube = gpusmall.open_cube(path.with_suffix(".cube.h5"))
per_i0 = cube["epix/azav_azav_sum"] / cube["ipm/sum_sum"]
diff = per_i0.sel(split="laser_on") - per_i0.sel(split="laser_off")  # (bin, q, phi)
pump_probe = diff.sum(dim=[d for d in diff.dims if d != "bin"])
print("pump-probe signal per delay step:", np.round(pump_probe.values, 1))

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots()
ax.plot(cube["bin"].values, pump_probe.values, "o-")
ax.set_xlabel("scan step (delay = step - 1 ps)")
ax.set_ylabel("azav, laser on - off, per I0 (ADU)")
fig.savefig("tutorial_cube.png")
