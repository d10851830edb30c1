#!/usr/bin/env bash
# One device call: the whole test suite on CuPy, the benchmarks, and a short look at the kernels.
#
#   (here, once, with network)  bash benchmarks/fetch_wheels.sh      -> .whl/ (pydantic, pyFAI, ...; git-ignored)
#   (device tool)               run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# From the repository root, with $OUT an output folder (default ./gpu_out). Every step runs under a timeout cut
# from one budget (GPU_SESSION_BUDGET_S, default 530 s), so the call ends inside the device's 10-minute limit
# even when a step hangs; a step that finds too little time left is skipped and says so. Files in $OUT (7):
#   session.log      everything printed, with the step summary at the end
#   junit.xml        the test suite (GPUSMALL_BACKEND=cupy): any skipped CuPy test is listed as a failure of the session
#   bench_cupy.json  benchmarks/bench_calib.py + bench_funcs.py + bench_cube.py on CuPy (pytest-benchmark JSON)
#   bench_numpy.json the same on NumPy, same machine (last step; SKIP_NUMPY_BENCH=1 skips it)
#   pipeline.json    benchmarks/bench_pipeline.py (demo config) on CuPy, batches of 16 and 64
#   profile.txt      benchmarks/profile_kernels.py: GPU time, GB/s vs a device copy, registers/spills per kernel
#   summary.md       benchmarks/bench_to_md.py of the JSON files: the rows for BENCHMARKS.md
# Knobs (environment): GPU_SESSION_BACKEND (cupy; numpy runs the plumbing on a CPU machine), GPU_SESSION_TESTS
# (tests), GPU_SESSION_XDIST (4 workers; 0 = off), GPUSMALL_BENCH_EVENTS (64), GPUSMALL_BENCH_PANELS (16),
# PIPELINE_EVENTS (128), PIPELINE_BATCHES ("16 64"), GPU_SANITIZE (1: compute-sanitizer memcheck + racecheck on
# the small CuPy tests), GPU_PROFILE (1), SKIP_NUMPY_BENCH (0).
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/session.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

BACKEND=${GPU_SESSION_BACKEND:-cupy}
BUDGET=${GPU_SESSION_BUDGET_S:-530}
TESTS=${GPU_SESSION_TESTS:-tests}
XDIST=${GPU_SESSION_XDIST:-4}
EVENTS=${GPUSMALL_BENCH_EVENTS:-64}
export GPUSMALL_BENCH_EVENTS=$EVENTS GPUSMALL_BENCH_PANELS=${GPUSMALL_BENCH_PANELS:-16}
export PYTHONUNBUFFERED=1 HDF5_USE_FILE_LOCKING=FALSE MPLBACKEND=Agg
PY=${PYTHON:-python3}
export OUT BACKEND TESTS XDIST PY
START=$SECONDS
SUMMARY=()

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME MAX_SECONDS MIN_SECONDS command...: run under min(MAX, budget left - 10 s); skip under MIN seconds
step() {
  local name=$1 max=$2 min=$3; shift 3
  local t; t=$(( $(left) - 10 )); (( t > max )) && t=$max
  if (( t < min )); then
    echo "== $name: SKIPPED, ${t}s of the budget left (needs ${min}s)"
    SUMMARY+=("$name: skipped (budget)"); return 0
  fi
  echo; echo "== $name (limit ${t}s, $(date -u +%H:%M:%S) UTC, $((SECONDS - START))s into the session)"
  local t0=$SECONDS rc
  # through bash -c: timeout runs programs, and the steps are shell functions (exported below)
  timeout -k 10 "$t" bash -c '"$@"' step "$@"; rc=$?
  (( rc == 124 || rc == 137 )) && echo "== $name: TIMED OUT after ${t}s"
  echo "== $name: rc=$rc in $((SECONDS - t0))s"
  SUMMARY+=("$name: rc=$rc, $((SECONDS - t0))s")
  return 0
}

echo "== gpu_session: backend $BACKEND, budget ${BUDGET}s, OUT=$OUT, $(date -u)"

# (a) wheels the machine lacks (pydantic, pyFAI, ...): .whl/ is carried by the device call
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    || echo "== wheels: pip install FAILED"
else
  echo "== wheels: no .whl/*.whl here (run benchmarks/fetch_wheels.sh and carry .whl)"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# (b) machine, versions
echo; echo "== machine"
command -v nvidia-smi > /dev/null && nvidia-smi || echo "(no nvidia-smi)"
git log -1 --format='commit %H %cd' 2>/dev/null || echo "commit: (no .git here)"
$PY - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for m in ("numpy", "scipy", "h5py", "cupy", "pydantic", "pyFAI", "pytest", "pytest_benchmark", "xdist", "mpi4py"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:18s} {getattr(mod, '__version__', getattr(mod, 'version', '?'))}  {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"{m:18s} MISSING ({type(exc).__name__}: {exc})")
try:
    import cupy
    rt = cupy.cuda.runtime
    print("CUDA runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion(), "nvrtc", cupy.cuda.nvrtc.getVersion())
    print("device", rt.getDeviceProperties(0)["name"], f"{cupy.cuda.Device(0).mem_info[1] / 2**30:.0f} GiB")
except Exception as exc:
    print("cupy device info:", type(exc).__name__, exc)
from gpusmall.backend import gpu_status
print("gpusmall gpu_status:", gpu_status())
EOF
if ! $PY -c "import pydantic, gpusmall.producer.config" 2> /dev/null; then
  echo "== FATAL: gpusmall cannot import (pydantic missing? carry .whl): nothing else can run"
  exit 2
fi

# (c) the test suite on the backend; junit into $OUT; a skipped CuPy test fails the session
run_tests() {
  local extra=()
  if [ "$XDIST" != 0 ] && $PY -c "import xdist" 2> /dev/null; then extra+=(-n "$XDIST"); fi
  if $PY -c "import pytest_timeout" 2> /dev/null; then extra+=(--timeout 240); fi
  GPUSMALL_BACKEND=$BACKEND $PY -m pytest -q -rs -p no:cacheprovider "${extra[@]}" --junitxml="$OUT/junit.xml" $TESTS
}
export -f run_tests
step "tests ($BACKEND)" 270 60 run_tests
$PY - "$OUT/junit.xml" <<'EOF'
import re, sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as exc:
    print(f"== junit: no report ({exc})"); sys.exit(0)
cases = list(root.iter("testcase"))
failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
skipped = [c for c in cases if c.find("skipped") is not None]
cupy_skips = [c for c in skipped if re.search(r"\[(.*-)?cupy(-.*)?\]", c.get("name", ""))
              or (c.find("skipped").get("message") or "").startswith("CuPy backend")]
print(f"== junit: {len(cases)} tests, {len(failed)} failed, {len(skipped)} skipped ({len(cupy_skips)} CuPy skips)")
for c in failed:
    el = c.find("failure") if c.find("failure") is not None else c.find("error")
    print(f"   FAILED {c.get('classname')}::{c.get('name')}: {(el.get('message') or '')[:300]}")
reasons = {}
for c in skipped:
    reasons.setdefault((c.find("skipped").get("message") or "")[:200], []).append(c.get("name"))
for why, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
    print(f"   skipped x{len(names)}: {why}   e.g. {names[0]}")
if cupy_skips:
    print("== junit: CuPy TESTS WERE SKIPPED on a GPU run:", ", ".join(c.get("name") for c in cupy_skips[:20]))
EOF

# (d) benchmarks: calibration and functions on the backend, the whole pipeline
bench() {  # bench BACKEND JSON
  GPUSMALL_BACKEND=$1 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_calib.py benchmarks/bench_funcs.py benchmarks/bench_cube.py \
    $([ "$1" = cupy ] && echo benchmarks/bench_writer.py) \
    --benchmark-only --benchmark-json="$2" --benchmark-columns=min,mean,median,rounds
}
export -f bench
step "benchmarks ($BACKEND)" 150 30 bench "$BACKEND" "$OUT/bench_$BACKEND.json"

pipeline() {
  rm -f "$OUT/pipeline.json"
  for b in ${PIPELINE_BATCHES:-16 64}; do
    $PY benchmarks/bench_pipeline.py --backend "$BACKEND" --events "${PIPELINE_EVENTS:-128}" --batch "$b" \
      --json "$OUT/pipeline.json" || return
  done
}
export -f pipeline
step "pipeline ($BACKEND)" 100 20 pipeline

# (e) compute-sanitizer on the small CuPy tests (the kernels have never run: out-of-bounds and shared-memory races)
sanitize() {  # sanitize TOOL pytest-args...
  local cs; cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -1)
  [ -n "$cs" ] || { echo "compute-sanitizer not found"; return 3; }
  local tool=$1; shift
  # no memory pool: every CuPy array is its own cudaMalloc, so an overrun past an array is seen
  GPUSMALL_CUPY_NO_POOL=1 GPUSMALL_BACKEND=cupy "$cs" --tool "$tool" --error-exitcode 99 --print-limit 20 \
    $PY -m pytest -q -x -p no:cacheprovider "$@"
}
export -f sanitize
if [ "$BACKEND" = cupy ] && [ "${GPU_SANITIZE:-1}" = 1 ]; then
  step "memcheck" 90 30 sanitize memcheck tests/test_calibration.py tests/test_common_mode.py tests/test_azav.py \
    -k "cupy and (matches_spec or median or min_pixels or max_correction or even_count or real_detector or histogram)"
  step "racecheck" 60 30 sanitize racecheck tests/test_common_mode.py \
    -k "cupy and (median or min_pixels or max_correction or even_count or real_detector) and not full_batch"
fi

# profile: GPU time per kernel, GB/s against a device copy, registers / local memory
if [ "$BACKEND" = cupy ] && [ "${GPU_PROFILE:-1}" = 1 ]; then
  step "profile" 60 20 $PY benchmarks/profile_kernels.py --events "$EVENTS" --out "$OUT/profile.txt"
fi

# NumPy on the same machine, for the ratios (optional, last)
if [ "$BACKEND" = cupy ] && [ "${SKIP_NUMPY_BENCH:-0}" != 1 ]; then
  step "benchmarks (numpy)" 150 40 bench numpy "$OUT/bench_numpy.json"
fi

echo; echo "== summary.md"
files=(); for f in "$OUT"/bench_cupy.json "$OUT"/bench_numpy.json; do [ -f "$f" ] && files+=("$f"); done
pipe=(); [ -f "$OUT/pipeline.json" ] && pipe=(--pipeline "$OUT/pipeline.json")
timeout 30 $PY benchmarks/bench_to_md.py "${files[@]}" "${pipe[@]}" -o "$OUT/summary.md" > /dev/null \
  && cat "$OUT/summary.md" || echo "(no benchmark results)"
[ -f "$OUT/profile.txt" ] && { echo; cat "$OUT/profile.txt"; }

echo; echo "== steps ($((SECONDS - START))s of ${BUDGET}s)"
for s in "${SUMMARY[@]}"; do echo "   $s"; done
grep -E "^== junit" "$LOG" | tail -3
sleep 1  # let tee write the last lines to session.log
