"""The image encoder through OpenVINO, in fp32: one of the CPU paths that `auto` measures (what the MedSAM Slicer
plugin uses on CPU).

OpenVINO reads the encoder's ONNX export (onnx_encoder.py) and compiles it for this CPU with its own fused kernels.
The compiled network is kept in the embedding cache's `.encoders/` folder as one file (written atomically), keyed by
the weights, the OpenVINO version and the CPU it was compiled for, so that a later process loads it in under a
second instead of compiling again (2 s). Inference precision is pinned to fp32: OpenVINO would otherwise run bf16
on CPUs that have it, and the embeddings of this path are meant to be fp32's (they differ by ~3e-6 relative).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from .atomic_write import write_atomically
from .encoder_probe import cpu_fingerprint
from .errors import FewShotSAMError, one_line
from .onnx_encoder import exported_encoder_path, remove_damaged_file


def openvino_available() -> bool:
    try:
        import onnx  # noqa: F401  (the ONNX export it compiles from needs it)
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _settings(threads: int) -> dict:
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}


def openvino_encoder_file(model, folder: Path) -> Path:
    import openvino

    name = model.weights_id.replace(":", "-")
    version = openvino.__version__.split("-")[0]
    return Path(folder) / f"{name}-{model.spec.input_size}px-openvino{version}-cpu{cpu_fingerprint()}.blob"


def compiled_openvino_file(model, folder: Path) -> Path:
    """The OpenVINO-compiled encoder file, built from the ONNX export on first use (atomically, one process at a
    time)."""
    import openvino

    folder = Path(folder)
    onnx_path = exported_encoder_path(model, folder)
    path = openvino_encoder_file(model, folder)
    with FileLock(folder / f".{path.name}.lock"):
        if path.is_file():
            return path

        def compile_to(temporary: Path) -> None:
            network = openvino.Core().compile_model(str(onnx_path), "CPU", _settings(torch.get_num_threads()))
            stream = io.BytesIO()
            network.export_model(stream)
            temporary.write_bytes(stream.getvalue())

        try:
            write_atomically(path, compile_to)
        except Exception as error:  # OpenVINO raises RuntimeError with multi-line reports
            raise FewShotSAMError(f"could not compile the {model.spec.name} encoder with OpenVINO in {folder}: "
                                  f"{one_line(error, 300)}") from None
    return path


def open_openvino_encoder(model, folder: Path) -> "OpenVinoEncoder":
    """The model's OpenVINO encoder, ready to run. A file in the cache that OpenVINO cannot load (cut short, damaged,
    or from another OpenVINO build) is deleted and compiled again, once."""
    path = compiled_openvino_file(model, folder)
    try:
        return OpenVinoEncoder(path)
    except Exception as error:
        damaged = one_line(error)
    remove_damaged_file(path, damaged)
    try:
        return OpenVinoEncoder(compiled_openvino_file(model, folder))
    except FewShotSAMError:
        raise
    except Exception as error:
        raise FewShotSAMError(f"the OpenVINO encoder {path} cannot be loaded even after compiling it again "
                              f"({one_line(error)})") from None


class OpenVinoEncoder:
    """Runs a compiled OpenVINO encoder on normalised [B, 3, S, S] images, one slice per call (the exported graph's
    fixed shape)."""

    def __init__(self, path: Path, threads: int | None = None):
        import openvino

        network = openvino.Core().import_model(Path(path).read_bytes(), "CPU",
                                               _settings(threads or torch.get_num_threads()))
        self.request = network.create_infer_request()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        # infer() returns views of the request's own output buffer: copy each before the next slice overwrites it
        outputs = [np.array(self.request.infer({0: array[index:index + 1]})[0]) for index in range(array.shape[0])]
        return torch.from_numpy(np.concatenate(outputs))
