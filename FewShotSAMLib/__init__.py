"""FewShotSAM: paint a structure on a few slices of a 3D scan, get it segmented through the whole scan.

The public face of the engine, for use from Python::

    from FewShotSAMLib import ConfidenceRecorder, Engine, EngineOptions, read_volume, read_labels, write_segmentation

    engine = Engine(EngineOptions(model="litemedsam"))
    image = read_volume("scan.nrrd")
    painted = read_labels("painted.seg.nrrd", image)
    recorder = ConfidenceRecorder()  # optional: where the result is least sure, which slice to paint next
    write_segmentation("result.seg.nrrd", engine.propagate(image, painted, confidence=recorder))
    print(recorder.report().text())

Names are loaded on first use (module ``__getattr__``, PEP 562): importing the package, its catalogue or its
readers and writers does not import PyTorch, so the Slicer module and the command line's option parsing start
fast; ``Engine`` and the adapter bring PyTorch in when they are first touched.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "Engine": "pipeline",
    "EngineOptions": "pipeline",
    "propagate_files": "pipeline",
    "adapt_files": "pipeline",
    "apply_files": "pipeline",
    "FewShotAdapter": "adapter",
    "AdaptOptions": "adapter",
    "PropagationOptions": "propagation",
    "ConfidenceRecorder": "confidence",
    "load_model": "models",
    "read_volume": "volume_io",
    "read_labels": "volume_io",
    "write_segmentation": "volume_io",
    "write_volume": "volume_io",
    "Volume": "volume",
    "LabelVolume": "volume",
    "Segment": "volume",
    "Geometry": "volume",
    "FewShotSAMError": "errors",
    "Cancelled": "errors",
    "Progress": "progress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
