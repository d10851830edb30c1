"""Benchmark JSON files -> the markdown table rows of BENCHMARKS.md.

    python benchmarks/bench_to_md.py bench_cupy.json [bench_numpy.json] [--pipeline pipeline.json] [-o summary.md]

Inputs: ``pytest --benchmark-json`` files of ``benchmarks/bench_calib.py`` / ``bench_funcs.py`` / ``bench_writer.py``
(the backend of
each file is read from the file name (``*cupy*``, ``*numpy*``) or its ``GPUSMALL_BACKEND`` record, else its
order), and the ``--json`` list that ``benchmarks/bench_pipeline.py`` appends to (with the per-event NumPy
reference of ``benchmarks/reference_pipeline.py`` and the ratio pinned->file / reference where it was run).
Output, per file: the calibration rows (s / batch, events/s, GB/s, ratio vs the per-event reference, and vs the
device-to-device copy where there is one), the function rows (events/s; ratio of the CPU-side pairs gpusmall vs
pyFAI / scipy), and, with a CuPy and a NumPy file, one table of CuPy vs NumPy per benchmark. Missing benchmarks are
left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CALIB = [("test_calib", "raw -> calibrated (gain decode, pedestal, gain, mask)"),
         ("test_calib_cm", "raw -> calibrated + median rows+cols common mode"),
         ("test_per_event_masked", "per-event NumPy, masked-array medians as psana does them (reference)"),
         ("test_d2d_copy", "device-to-device copy of the same bytes (bandwidth ceiling)")]
FUNCS = [("test_azav_epix10k2m[csr]", "azav (csr), 500 bins"),
         ("test_azav_epix10k2m[histogram]", "azav (atomic histogram), 500 bins"),
         ("test_droplet_photons_epix10k2m", "droplet + photons"),
         ("test_photon_count_epix10k2m", "photon_count (hist_max 5)"),
         ("test_acf_epix10k2m", "acf (window 41, all 16 panels)"),
         ("test_roi_projection_epix10k2m", "roi (whole detector, thres_adu 20) + projection"),
         ("test_rebin_epix10k2m", "rebin to 22 x 24 per panel"),
         ("test_sums_epix10k2m", "run sums: calib, square, max, nhits_thresADU80")]
PAIRS = [("test_azav_numpy_flat_frame", "test_pyfai_integrate1d_csr_flat_frame",
          "azav, one flat ePix10k2M frame, 500 bins", "pyFAI `integrate1d` CSR, no splitting", "ms/frame"),
         ("test_droplet_photons_704x768[sparse]", "test_scipy_droplets_704x768[sparse]",
          "droplet + photons, 704 x 768, sparse (~100 droplets)", "scipy.ndimage label + sum_labels + center_of_mass",
          "ms/frame"),
         ("test_droplet_photons_704x768[dense]", "test_scipy_droplets_704x768[dense]",
          "droplet + photons, 704 x 768, dense (20k photons)", "same scipy path", "ms/frame")]

WRITER = [("test_append_demo_batch[gpusmall]", "ResultWriter.append (whole chunks written directly)"),
          ("test_append_demo_batch[plain-h5py]", "plain h5py: resize + slice assignment (reference)")] + [
    (f"test_writer_thread_beside_busy_main_thread[{ms}]",
     f"writer thread (BackgroundAppender) beside {ms} ms of main-thread Python per batch") for ms in (0, 3, 9)] + [
    ("test_writer_thread_beside_busy_main_thread[9-switch-5ms]",
     "same, 9 ms, Python's default 5 ms thread switch interval (before)")]

# CPU code whatever the backend (references, NumPy-only paths): not in the CuPy vs NumPy table
CPU_ONLY = {"test_per_event_masked", "test_append_demo_batch[gpusmall]", "test_append_demo_batch[plain-h5py]", "test_azav_numpy_flat_frame", "test_pyfai_integrate1d_csr_flat_frame",
            "test_scipy_droplets_704x768[sparse]", "test_scipy_droplets_704x768[dense]"}


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    benches = {b["name"]: b for b in data.get("benchmarks", [])}
    backend = next((b["extra_info"].get("backend") for b in benches.values() if b.get("extra_info", {}).get("backend")),
                   None)
    name = path.name.lower()
    backend = "cupy" if "cupy" in name else "numpy" if "numpy" in name else backend or "?"
    return {"path": path, "backend": backend, "benches": benches, "date": data.get("datetime", "?"),
            "commit": (data.get("commit_info") or {}).get("id") or "?",
            "machine": (data.get("machine_info") or {}).get("cpu", {}).get("brand_raw", "?")}


def mean_s(b) -> float:
    return b["stats"]["mean"]


def ev_s(b):
    e = b.get("extra_info", {})
    return e.get("events_per_s") or (e.get("events") / mean_s(b) if e.get("events") else None)


def per_frame_ms(b, frames: int) -> float:
    e = b.get("extra_info", {})
    return e.get("ms_per_frame") or 1000 * mean_s(b) / frames


def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def calib_rows(f) -> list[str]:
    b = f["benches"]
    if not any(k in b for k, _ in CALIB):
        return []
    out = [f"### Calibration ({f['backend']}, `{f['path'].name}`)", "",
           "| case | s / batch | events/s | GB/s (raw in + float32 out) |", "| --- | --- | --- | --- |"]
    for key, label in CALIB:
        if key in b:
            e = b[key]["extra_info"]
            out.append(f"| {label} | {fmt(mean_s(b[key]))} | {fmt(e.get('events_per_s'))} | {fmt(e.get('GB_per_s'))} |")
    ref = b.get("test_per_event_masked")
    notes = []
    for key in ("test_calib", "test_calib_cm"):
        if key in b and ref:
            notes.append(f"{key} vs per-event reference: **{mean_s(ref) / mean_s(b[key]):.1f}x**")
        if key in b and "test_d2d_copy" in b:
            frac = b[key]["extra_info"]["GB_per_s"] / b["test_d2d_copy"]["extra_info"]["GB_per_s"]
            notes.append(f"{key}: {frac:.0%} of the device-to-device copy rate")
    return out + ([""] + ["- " + n for n in notes] if notes else []) + [""]


def funcs_rows(f) -> list[str]:
    b = f["benches"]
    out = []
    rows = [(label, b[key]) for key, label in FUNCS if key in b]
    if rows:
        ev = rows[0][1].get("extra_info", {}).get("events", "?")
        out += [f"### Reduction functions ({f['backend']}, ePix10k2M batch of {ev})", "",
                "| function | s / batch | events/s |", "| --- | --- | --- |"]
        out += [f"| {label} | {fmt(mean_s(x))} | {fmt(ev_s(x))} |" for label, x in rows] + [""]
    pairs = [(p, b[p[0]], b[p[1]]) for p in PAIRS if p[0] in b and p[1] in b]
    if pairs:
        out += [f"### gpusmall vs reference, same run ({f['backend']})", "",
                "| benchmark | gpusmall | reference, same run | ratio |", "| --- | --- | --- | --- |"]
        for (_, _, label, ref_label, unit), mine, ref in pairs:
            frames = 1 if "flat" in label else 16
            a, r = per_frame_ms(mine, frames), per_frame_ms(ref, frames)
            out.append(f"| {label} | {fmt(a)} {unit} | {ref_label}: {fmt(r)} {unit} | **{r / a:.1f}x** |")
        out.append("")
    return out


def writer_rows(f) -> list[str]:
    b = f["benches"]
    rows = [(label, b[key]) for key, label in WRITER if key in b]
    if not rows:
        return []
    info = rows[0][1].get("extra_info", {})
    out = [f"### HDF5 appends of the demo set's results (batch of 64, {fmt(info.get('bytes_per_event', 0) / 1e3)} kB "
           f"per event, to {info.get('folder', '?')})", "",
           "| writer | ms / batch | events/s | GB/s |", "| --- | --- | --- | --- |"]
    for label, x in rows:
        e = x.get("extra_info", {})
        ms = e.get("ms_per_batch", x["stats"]["median"] * 1e3)
        out.append(f"| {label} | {fmt(ms)} | {fmt(e.get('events_per_s', 0))} | "
                   f"{fmt(e.get('gb_per_s', 0))} |")
    return out + [""]


def compare_rows(cupy, numpy) -> list[str]:
    keys = [k for k in cupy["benches"] if k in numpy["benches"] and k not in CPU_ONLY]
    if not keys:
        return []
    out = ["### CuPy vs NumPy, same machine", "",
           "| benchmark | NumPy s | CuPy s | CuPy events/s | speed-up |", "| --- | --- | --- | --- | --- |"]
    for k in keys:
        c, n = cupy["benches"][k], numpy["benches"][k]
        out.append(f"| {k} | {fmt(mean_s(n))} | {fmt(mean_s(c))} | {fmt(ev_s(c))} | **{mean_s(n) / mean_s(c):.1f}x** |")
    return out + [""]


def pipeline_rows(path: Path) -> list[str]:
    runs = json.loads(path.read_text())
    out = [f"### Whole pipeline (`benchmarks/bench_pipeline.py`, {path.name})", "",
           "| backend | config | batch | events | end to end events/s | GB/s raw | pinned->file events/s "
           "| compute only events/s | GB/s raw "
           "| no-overlap events/s | device-only events/s | H2D GB/s | pinned / pageable GB/s | results D2H s "
           "| per-event NumPy ref events/s | pinned->file / ref |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        c = r["compute_only"]
        pin = (f"{fmt(c['pinned_gb_per_s'])} / {fmt(c['pageable_gb_per_s'])}" if "pinned_gb_per_s" in c else "-")
        ref, to_file = c.get("reference_events_per_s"), c.get("to_file_events_per_s")
        ratio = f"**{to_file / ref:.1f}x**" if ref and to_file else "-"
        out.append(f"| {r['backend']} | {r['config']} | {r['batch']} | {r['events']} | {fmt(r['end_to_end']['events_per_s'])} "
                   f"| {fmt(r['end_to_end']['gb_per_s'])} | {fmt(c.get('to_file_events_per_s'))} "
                   f"| {fmt(c['events_per_s'])} | {fmt(c['gb_per_s'])} "
                   f"| {fmt(c.get('serial_events_per_s'))} | {fmt(c.get('device_events_per_s'))} "
                   f"| {fmt(c.get('h2d_gb_per_s'))} | {pin} | {fmt(c.get('d2h_s'))} | {fmt(ref)} | {ratio} |")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="pytest-benchmark JSON files")
    ap.add_argument("--pipeline", type=Path, action="append", default=[], help="bench_pipeline.py --json file")
    ap.add_argument("-o", "--output", type=Path, help="write the markdown here too")
    args = ap.parse_args(argv)
    files = [load(p) for p in args.files if p.is_file()]
    lines = []
    for f in files:
        lines += [f"<!-- {f['path'].name}: {f['backend']}, {f['date']}, commit {f['commit'][:10]}, {f['machine']} -->", ""]
        lines += calib_rows(f) + funcs_rows(f) + writer_rows(f)
    by = {f["backend"]: f for f in files}
    if "cupy" in by and "numpy" in by:
        lines += compare_rows(by["cupy"], by["numpy"])
    for p in args.pipeline:
        if p.is_file():
            lines += pipeline_rows(p)
    if not lines:
        print("bench_to_md: no benchmark results found", file=sys.stderr)
        return 1
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
