"""azav's centre/distance geometry: the sign of psana's z, detector tilts tx/ty, smalldata_tools' Pplane.

References are direct transcriptions of the formulas (smalldata_tools' azimuthalBinning, in our words) and
psana's own frame conversion."""

import numpy as np
import pytest

from gpusmall.funcs.azav import beam_direction, correction, geometry_center


def grid(n=21, pitch=100.0):
    y, x = np.meshgrid((np.arange(n) - n // 2) * pitch, (np.arange(n) - n // 2) * pitch, indexing="ij")
    return x, y


def test_a_pixel_with_larger_psana_z_is_closer_to_the_sample():
    """Two panels 2 mm apart in z: the one at larger z (psana: z against the beam) is nearer the sample."""
    x, y = grid()
    z = np.stack([np.full_like(x, 1000.0), np.full_like(x, -1000.0)])  # mean(z) = 0
    x2, y2 = np.stack([x, x]), np.stack([y, y])
    tth, _, cosi, r_um = geometry_center(x2, y2, z, [0.0, 0.0], 100.0)
    r = np.hypot(x2, y2)
    np.testing.assert_allclose(tth[0], np.arctan2(r[0], 99_000.0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tth[1], np.arctan2(r[1], 101_000.0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r_um, r, atol=1e-9)
    np.testing.assert_allclose(cosi, np.cos(tth), atol=1e-12)  # no tilt: incidence = 2theta


def test_psana_frame_z_is_against_the_beam():
    """psana's own lab-frame conversion (z along the beam = -z of its default frame) gives our distances."""
    geometry = pytest.importorskip("psana.pscalib.geometry.GeometryAccess")
    rng = np.random.default_rng(1)
    x, y, z = rng.normal(0, 2e4, (3, 4, 8, 8))
    _, _, z_lab = geometry.GeometryAccess.coords_psana_to_lab_frame(None, x, y, z)
    depth_lab = 100_000.0 + (z_lab - z_lab.mean())  # sample-to-pixel along the beam, lab frame
    tth, *_ = geometry_center(x, y, z, [0.0, 0.0], 100.0)
    np.testing.assert_allclose(tth, np.arctan2(np.hypot(x, y), depth_lab), rtol=1e-12)


def smalldata_tilted(x, y, xcen, ycen, dist_um, tx, ty):
    """2theta and the direction cosine of smalldata_tools' tilted geometry (its beam direction (A, B, -C),
    its sample at (a, b, -c)), for a flat detector at z = 0."""
    tx, ty = np.radians(tx), np.radians(ty)
    A, B, C = -np.sin(ty) * np.cos(tx), -np.sin(tx), -np.cos(ty) * np.cos(tx)
    a, b, c = xcen + dist_um * np.tan(ty), ycen - dist_um * np.tan(tx), dist_um
    r = np.sqrt((x - a) ** 2 + (y - b) ** 2 + c**2)
    return np.arccos((A * (x - a) + B * (y - b) - C * c) / r)


@pytest.mark.parametrize("ty", [-7.0, 3.0, 20.0])
def test_ty_tilt_equals_smalldata_tools(ty):
    x, y = grid(31, 500.0)
    z = np.zeros_like(x)
    tth, *_ = geometry_center(x, y, z, [1200.0, -800.0], 80.0, tx=0.0, ty=ty)
    np.testing.assert_allclose(tth, smalldata_tilted(x, y, 1200.0, -800.0, 80_000.0, 0.0, ty), atol=1e-12)


@pytest.mark.parametrize("tx, ty", [(5.0, 0.0), (0.0, 5.0), (10.0, -12.0), (-30.0, 25.0)])
def test_tilted_beam_crosses_the_detector_at_the_centre(tx, ty):
    cx, cy = 300.0, -200.0
    x = np.array([cx, cx + 1000.0])
    y = np.array([cy, cy])
    tth, phi, cosi, r_um = geometry_center(x, y, np.zeros(2), [cx, cy], 50.0, tx=tx, ty=ty)
    assert tth[0] == pytest.approx(0.0, abs=1e-7) and r_um[0] == pytest.approx(0.0, abs=1e-3)
    d = beam_direction(tx, ty)
    assert cosi[0] == pytest.approx(d[2], abs=1e-12)  # the beam's own incidence angle on the detector
    # the second pixel: 2theta is the angle between the beam and the pixel vector from the sample
    sample = np.array([cx, cy, 0.0]) - 50_000.0 / d[2] * d
    v = np.array([x[1], y[1], 0.0]) - sample
    assert tth[1] == pytest.approx(np.arccos(v @ d / np.linalg.norm(v)), abs=1e-12)
    assert r_um[1] == pytest.approx(np.linalg.norm(v - (v @ d) * d), rel=1e-12)


def test_no_tilt_phi_is_atan2_and_tilts_keep_rings_round():
    x, y = grid()
    tth, phi, _, _ = geometry_center(x, y, np.zeros_like(x), [0.0, 0.0], 100.0)
    np.testing.assert_allclose(phi, np.arctan2(y, x), atol=1e-12)
    # pixels on a circle around the beam axis of a tilted detector all have one 2theta
    d = beam_direction(8.0, -5.0)
    sample = -100_000.0 / d[2] * d
    e1 = np.cross(d, [0, 1.0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)
    ang = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    ray = np.cos(np.radians(6)) * d + np.sin(np.radians(6)) * (np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2)
    t = -sample[2] / ray[:, 2]  # where each ray at 6 degrees from the beam meets the plane z = 0
    hit = sample + t[:, None] * ray
    tth, *_ = geometry_center(hit[:, 0], hit[:, 1], np.zeros(12), [0.0, 0.0], 100.0, tx=8.0, ty=-5.0)
    np.testing.assert_allclose(np.degrees(tth), 6.0, atol=1e-9)


@pytest.mark.parametrize("pplane", [0.0, 0.25, 1.0])
def test_pplane_maps_to_polarization(pplane):
    """smalldata_tools: (1 - Pp)(1 - (sin phi_sd sin 2th)^2) + Pp (1 - (cos phi_sd sin 2th)^2), phi_sd from +y
    towards +x; equals our P with polarization = 1 - 2 Pp."""
    x, y = grid()
    tth, phi, cosi, _ = geometry_center(x, y, np.zeros_like(x), [0.0, 0.0], 30.0)
    rho = np.hypot(x, y)
    with np.errstate(invalid="ignore"):
        sin_sd, cos_sd = np.where(rho > 0, x / rho, 0.0), np.where(rho > 0, y / rho, 1.0)
    s2 = np.sin(tth) ** 2
    theirs = (1 - pplane) * (1 - sin_sd**2 * s2) + pplane * (1 - cos_sd**2 * s2)
    ours = correction(tth, phi, cosi, polarization=1 - 2 * pplane, solid_angle=False)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_tilts_are_config_keys_of_the_centre_geometry_only(tmp_path):
    from gpusmall.errors import ConfigError
    from gpusmall.producer.config import validate_config

    azav = {"type": "azav", "center_um": [0.0, 0.0], "distance_mm": 100.0, "energy_kev": 9.5, "bins": 10}

    def cfg(**extra):
        return {
            "source": {"type": "sim", "events": 2},
            "output": str(tmp_path / "o.h5"),
            "detectors": {"cam": {"type": "camera", "shape": [16, 16], "functions": [dict(azav, **extra)]}},
        }

    validate_config(cfg(tx=2.5, ty=-1.0))
    with pytest.raises(ConfigError, match=r"functions\[0\]\.tx"):
        validate_config(cfg(tx=90.0))
    poni = {k: v for k, v in azav.items() if k not in ("center_um", "distance_mm")} | {"poni": "x.poni", "ty": 1.0}
    with pytest.raises(ConfigError, match="a PONI file has its own rotations"):
        validate_config({**cfg(), "detectors": {"cam": {"type": "camera", "shape": [16, 16], "functions": [poni]}}})
