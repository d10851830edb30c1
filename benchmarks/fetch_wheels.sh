#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks into .whl/ (git-ignored), for benchmarks/gpu_session.sh.
#
#   bash benchmarks/fetch_wheels.sh        # from the repository root, on a machine with network access
#
# The device machine (Python 3.12, x86-64) has numpy, scipy, h5py, matplotlib, pillow, lxml, filelock,
# packaging and typing-extensions but no pydantic and no pyFAI. `--no-deps` with an explicit list: letting pip
# resolve pyFAI's dependencies would also fetch numpy, scipy, h5py, matplotlib (shadowing the machine's builds)
# and hdf5plugin (46 MB, over the 64 MiB that travels; pyFAI, fabio and silx import without it).
# Versions are the ones the CPU test suite runs with here (2026-11-25); change them together.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  typing-extensions==4.15.0
  pyFAI==2026.9.0 fabio==2026.6.0 silx==3.1.3 numexpr==2.14.2
)
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${PKGS[@]}"
# one version of each package: two wheels of one name stop the whole install there
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "fetch_wheels: more than one wheel of: $dups (remove the old ones from .whl/)" >&2; exit 1; fi
du -sh .whl
