"""pytest setup for the Slicer-side tests in Testing/: make the repository root importable.

The baselines live in ``benchmarks/baselines`` (outside the ``FewShotSAMLib`` package, which must not import
slicer / vtk), so tests here import them as ``benchmarks.baselines...`` from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
