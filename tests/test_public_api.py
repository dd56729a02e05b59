"""The package's public face: the engine's main names importable from FewShotSAMLib, without PyTorch until needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import FewShotSAMLib

REPO_ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    """Names of the modules a fresh interpreter has imported after running `code` (this checkout on its path)."""
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                               cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    return set(completed.stdout.split())


def test_importing_the_package_and_its_catalogue_does_not_import_torch():
    loaded = _modules_after("import FewShotSAMLib\nimport FewShotSAMLib.catalog\nFewShotSAMLib.catalog.MODELS")
    assert "FewShotSAMLib" in loaded
    assert "torch" not in loaded


def test_the_readers_and_writers_and_option_parsing_stay_torch_free():
    loaded = _modules_after("from FewShotSAMLib import read_volume, read_labels, write_segmentation, Volume\n"
                            "from FewShotSAMLib.cli import build_parser\nbuild_parser().parse_args(['cache', 'info'])")
    assert "torch" not in loaded


def test_every_public_name_resolves_to_its_defining_module():
    for name in FewShotSAMLib.__all__:
        value = getattr(FewShotSAMLib, name)
        assert getattr(value, "__name__", name) == name
        assert value.__module__.startswith("FewShotSAMLib."), (name, value.__module__)
    from FewShotSAMLib.pipeline import Engine

    assert FewShotSAMLib.Engine is Engine


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'engine'"):
        FewShotSAMLib.engine  # noqa: B018


def test_the_core_path_does_not_import_the_evaluation_code():
    """metrics.py and slice_selection.py serve the demo, benchmarks and tests only (see their docstrings)."""
    loaded = _modules_after("import FewShotSAMLib.pipeline, FewShotSAMLib.cli")
    assert "FewShotSAMLib.propagation" in loaded
    assert not {"FewShotSAMLib.metrics", "FewShotSAMLib.slice_selection"} & loaded
