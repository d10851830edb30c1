"""``python -m cuda_cpu`` (from tests/): compile every ``kernels/*.cu`` for the CPU into the on-disk cache.

conftest.py starts this in the background when a session collects tests that use the CPU runtime, so that
on a machine without the cache (a fresh CI runner) g++ runs on a core the tests leave idle instead of
inside the first test that launches each kernel. A failure here is silent: the test that needs the kernel
compiles it again (each source is compiled by one process at a time) and reports g++'s errors.
"""

from __future__ import annotations

import sys

from gpusmall.backend import kernel_dirs

from . import build_file, compiler

if __name__ == "__main__":
    if compiler() is None:
        sys.exit(0)
    seen = set()
    for d in kernel_dirs():
        for path in sorted(d.glob("*.cu")):
            if path.name in seen:
                continue
            seen.add(path.name)
            try:
                build_file(path)
            except Exception as e:  # noqa: BLE001 - the test that needs it reports it
                print(f"cuda_cpu prebuild: {path.name}: {e}", file=sys.stderr)
