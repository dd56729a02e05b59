"""The extension loads under the Pythons of the Slicer releases people run: 5.8 (Python 3.9) and 5.10 (Python 3.12).

Three checks, from cheapest to strongest:

- vermin (static): no construct or standard-library API newer than Python 3.9 in FewShotSAM/ or FewShotSAMLib/;
- an AST check: a file without ``from __future__ import annotations`` has no ``X | Y`` annotation (Python 3.9
  evaluates those when the ``def`` runs, and the import fails; vermin does not look into annotations by default);
- each file byte-compiled, and each module imported (Testing/import_probe.py), by the real 3.9 and 3.12
  interpreters of this machine (pyenv), skipped when an interpreter is absent.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slicer_extension_support import MODULE_DIR, REPO_ROOT

SLICER_PYTHONS = {"3.9": "Slicer 5.6 / 5.8", "3.12": "Slicer 5.10"}
SOURCES = sorted(p for folder in (MODULE_DIR, REPO_ROOT / "FewShotSAMLib") for p in folder.rglob("*.py")
                 if "__pycache__" not in p.parts)


def interpreter(version: str) -> str | None:
    """A python<version> executable: under pyenv's versions folder, else on PATH (pyenv's shims excluded)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = sorted(root.glob(f"{version}.*/bin/python"), reverse=True) if root.is_dir() else []
    if candidates:
        return str(candidates[0])
    found = shutil.which(f"python{version}")
    return found if found and "shims" not in Path(found).parts else None


def has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names) for node in tree.body)


def evaluated_union_annotations(path: Path) -> list[int]:
    """Lines where an ``X | Y`` annotation is evaluated at definition time (no postponed annotations)."""
    tree = ast.parse(path.read_text(), str(path))
    if has_future_annotations(tree):
        return []
    lines = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            annotations = [a.annotation for a in arguments if a.annotation is not None]
            annotations += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in annotations:
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)):
                lines.append(node.lineno)
    return lines


def test_sources_found():
    names = {p.name for p in SOURCES}
    assert {"FewShotSAM.py", "SegmentEditorEffect.py", "logic.py", "cli.py"} <= names


def test_no_union_annotation_is_evaluated_at_import():
    found = {str(p.relative_to(REPO_ROOT)): lines for p in SOURCES if (lines := evaluated_union_annotations(p))}
    assert not found, f"`X | Y` annotations evaluated at import (fails on Python 3.9 / Slicer 5.8): {found}"


def test_the_union_check_catches_the_original_fault(tmp_path):
    """The check above flags exactly what broke Slicer 5.8: errors.py's `returnCode: int | None = None`."""
    faulty = tmp_path / "errors.py"
    faulty.write_text("class WorkerFailed(Exception):\n"
                      "    def __init__(self, message: str, returnCode: int | None = None):\n"
                      "        super().__init__(message)\n")
    assert evaluated_union_annotations(faulty) == [2]
    faulty.write_text("from __future__ import annotations\n" + faulty.read_text())
    assert evaluated_union_annotations(faulty) == []


def test_vermin_minimum_python_is_3_9():
    vermin = pytest.importorskip("vermin", reason="vermin is in the test extra: pip install -e '.[test]'")
    del vermin
    completed = subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
                                "--no-tips", "--no-color", "--target=3.9-", "--violations", "--quiet",
                                str(MODULE_DIR), str(REPO_ROOT / "FewShotSAMLib")],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.parametrize("version", sorted(SLICER_PYTHONS))
def test_every_file_compiles_and_imports_under_slicers_python(version, tmp_path):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} interpreter found (PATH or pyenv); it is the Python of "
                    f"{SLICER_PYTHONS[version]}")
    script = ("import py_compile, sys\n"
              "for path in sys.argv[1:]:\n"
              "    py_compile.compile(path, cfile=path + '.pyc', doraise=True)\n")
    copies = []
    for source in SOURCES:  # compile copies, so that no .pyc lands in the repository
        copy = tmp_path / source.relative_to(REPO_ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(source.read_bytes())
        copies.append(str(copy))
    compiled = subprocess.run([python, "-c", script, *copies], capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, f"Python {version} cannot compile: {compiled.stderr}"
    probe = subprocess.run([python, "-I", str(REPO_ROOT / "Testing" / "import_probe.py"), str(REPO_ROOT)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    failures = [line for line in probe.stdout.splitlines() if line.startswith("FAIL")]
    assert probe.returncode == 0 and not failures, (f"Python {version} ({SLICER_PYTHONS[version]}) cannot import:\n"
                                                    + "\n".join(failures) + probe.stderr)
    imported = {line.split()[1] for line in probe.stdout.splitlines() if line.startswith("ok ")}
    assert {"FewShotSAM", "SegmentEditorFewShotSAMLib.SegmentEditorEffect", "FewShotSAMSlicerLib.logic",
            "FewShotSAMLib.cli"} <= imported

