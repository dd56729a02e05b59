"""Where the shared labelled scans lie, and what their absence means: one place for the benchmarks and both test
suites (tests/ and Testing/).

The scans live outside the repository, in the project's shared data folder: $FEWSHOTSAM_DATA, else
<repo>/../shared/data. A test that needs them skips with the reason on a machine without them, but fails under CI
(CI=true), where they are always present: a silently skipped real-data test would hide a regression.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV_VAR = "FEWSHOTSAM_DATA"


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def shared_data_candidates() -> list[Path]:
    """Where the shared data is looked for, in order: $FEWSHOTSAM_DATA, then <repo>/../shared/data."""
    candidates = []
    if os.environ.get(DATA_ENV_VAR):
        candidates.append(Path(os.environ[DATA_ENV_VAR]).expanduser())
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    return candidates


def default_data_dir() -> Path:
    """The benchmarks' default --data-dir: $FEWSHOTSAM_DATA when set, else <repo>/../shared/data."""
    return shared_data_candidates()[0]


def skip_or_fail(reason: str) -> None:
    """In a test: skip with the reason; under CI, where everything is installed and present, fail instead."""
    import pytest  # only tests call this; the benchmarks run without pytest

    if running_in_ci():
        pytest.fail(reason + " [CI=true: this test must run in CI]", pytrace=False)
    pytest.skip(reason)
