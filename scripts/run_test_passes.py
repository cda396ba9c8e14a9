"""Runs the test suite once per Keras backend, the passes side by side.

    python scripts/run_test_passes.py                  # what `make test` runs
    python scripts/run_test_passes.py --backends torch -- -k pipeline

Keras fixes its backend at import, so each backend is a pytest process of
its own. The suite's time goes mostly to XLA compiling (JAX, TensorFlow) and
to single-threaded Python, which leave cores idle, so the passes run
concurrently and share the machine. Each pass writes its output to a log;
the logs are printed in backend order once all passes end, with each pass's
wall time. Exits non-zero if any pass fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ("jax", "tensorflow", "torch")


def thread_limits(backend: str, threads: str) -> dict[str, str]:
    """Environment that sizes a pass's compute thread pools to its share of
    the cores. Pools sized to the whole machine spin while the other passes
    hold the cores: three such passes on two cores spent a third of their CPU
    time in the kernel and were on course for about 30 minutes, against 37
    one after another."""
    limits = {
        "OMP_NUM_THREADS": threads,  # torch's intra-op pool
        "MKL_NUM_THREADS": threads,
        "TF_NUM_INTRAOP_THREADS": threads,
        "TF_NUM_INTEROP_THREADS": threads,
    }
    if backend == "jax" and threads == "1":
        # XLA's CPU runtime: run each op on the calling thread.
        limits["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    return limits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument(
        "pytest_args", nargs="*", help="passed to every pass's pytest (after --)"
    )
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="declip-test-passes-"))
    threads = str(max(1, (os.cpu_count() or 1) // len(args.backends)))
    passes = {}
    for backend in args.backends:
        # Separate temporary roots: passes must not clean up each other's.
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "--durations=15",  # where a slow pass spends its time, in its log
            f"--basetemp={scratch / backend}",
        ]
        log = (scratch / f"{backend}.log").open("w")
        env = {
            **os.environ,
            **thread_limits(backend, threads),
            "KERAS_BACKEND": backend,
        }
        process = subprocess.Popen(
            [*command, *args.pytest_args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        passes[backend] = (process, log)
    start, walls = time.perf_counter(), {}
    while len(walls) < len(passes):
        for backend, (process, log) in passes.items():
            if backend not in walls and process.poll() is not None:
                walls[backend] = time.perf_counter() - start
                log.close()
        time.sleep(1)
    failed = [backend for backend, (process, _) in passes.items() if process.returncode]
    for backend in passes:
        print(f"=== KERAS_BACKEND={backend} ({walls[backend]:.0f} s)", flush=True)
        print((scratch / f"{backend}.log").read_text(), flush=True)
    for backend in passes:
        state = "FAILED" if backend in failed else "passed"
        print(f"{backend}: {state} in {walls[backend]:.0f} s")
    if failed:
        print(f"The failed passes' logs and temporary files: {scratch}")
        return 1
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
