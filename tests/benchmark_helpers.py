"""Shared by the tests that run a benchmark's quick mode in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.shared_data import skip_or_fail

REPO_ROOT = Path(__file__).resolve().parents[1]
# The accuracy benchmark defaults to one torch thread (so that runs side by side do not share cores); a test runs it
# alone, so it takes every core this process may use: the scans it encodes are the session cache's first.
ALL_THREADS = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def require_module(name: str, message: str) -> None:
    if importlib.util.find_spec(name) is None:
        skip_or_fail(message)


def require_chaos_cases(data_dir: Path, cases) -> None:
    for case in cases:
        for kind in ("image", "label"):
            path = data_dir / "chaos_t2_mri" / f"{kind}_{case}.nii.gz"
            if not path.exists():
                skip_or_fail(f"{path} is missing")


def run_benchmark(module: str, arguments: list[str]) -> subprocess.CompletedProcess:
    """`python -m <module> <arguments>` from the repository root; fails the test with its stderr if it fails.

    No time-out of its own: a benchmark's speed depends on the encoder path this CPU runs (a 900 s limit set on a
    Zen 4 with the compiled bf16 encoder was exceeded on a Zen 3 running ONNX Runtime); CI's limit bounds it."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run([sys.executable, "-m", module, *arguments], cwd=REPO_ROOT, capture_output=True,
                               encoding="utf-8", errors="replace", env=env)
    assert completed.returncode == 0, f"{module} failed ({completed.returncode}):\n{completed.stderr[-4000:]}"
    return completed
