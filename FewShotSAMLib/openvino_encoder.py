"""The image encoder through OpenVINO, in fp32 or bf16: CPU paths that `auto` measures (OpenVINO is what the MedSAM
Slicer plugin uses on CPU).

OpenVINO reads the encoder's ONNX export (onnx_encoder.py) and compiles it for this CPU with its own fused kernels.
The compiled network is kept in the embedding cache's `.encoders/` folder as one file (written atomically), keyed by
the weights, the OpenVINO version and the CPU it was compiled for, so that a later process loads it in under a
second instead of compiling again (2 s). Inference precision is pinned: fp32 for `--encoder openvino` (OpenVINO
would otherwise run bf16 on CPUs that have it, and that path's embeddings are meant to be fp32's: ~3e-6 relative),
bf16 for `--encoder openvino-bf16`, offered only on CPUs with bf16 instructions. On a Xeon with AMX it encoded 5.86
slices/s against 4.73 for the compiled bf16 encoder, needing no C++ compiler and building in ~5 s (with the ONNX
export) instead of ~30 s (benchmarks/results/speed-xeon-openvino-bf16.md); Dice as the compiled bf16 encoder's
(benchmarks/results/encoder-bf16-accuracy/).
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


OPENVINO_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def openvino_settings(threads: int, precision: str = "fp32") -> dict:
    """OpenVINO's CPU settings for one slice at a time on `threads` threads, with the inference precision pinned."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINTS[precision]}


def openvino_encoder_file(model, folder: Path, precision: str = "fp32") -> Path:
    import openvino

    name = model.weights_id.replace(":", "-")
    version = openvino.__version__.split("-")[0]
    arithmetic = "" if precision == "fp32" else f"-{precision}"  # fp32 files keep the name they always had
    return Path(folder) / f"{name}-{model.spec.input_size}px-openvino{version}{arithmetic}-cpu{cpu_fingerprint()}.blob"


def compiled_openvino_file(model, folder: Path, precision: str = "fp32") -> Path:
    """The OpenVINO-compiled encoder file in this precision, built from the ONNX export on first use (atomically,
    one process at a time)."""
    import openvino

    folder = Path(folder)
    onnx_path = exported_encoder_path(model, folder)
    path = openvino_encoder_file(model, folder, precision)
    with FileLock(folder / f".{path.name}.lock"):
        if path.is_file():
            return path

        def compile_to(temporary: Path) -> None:
            network = openvino.Core().compile_model(str(onnx_path), "CPU",
                                                    openvino_settings(torch.get_num_threads(), precision))
            stream = io.BytesIO()
            network.export_model(stream)
            temporary.write_bytes(stream.getvalue())

        try:
            write_atomically(path, compile_to)
        except Exception as error:  # OpenVINO raises RuntimeError with multi-line reports
            raise FewShotSAMError(f"could not compile the {model.spec.name} encoder with OpenVINO ({precision}) in "
                                  f"{folder}: {one_line(error, 300)}") from None
    return path


def open_openvino_encoder(model, folder: Path, precision: str = "fp32") -> "OpenVinoEncoder":
    """The model's OpenVINO encoder in this precision, ready to run. A file in the cache that OpenVINO cannot load
    (cut short, damaged, or from another OpenVINO build) is deleted and compiled again, once."""
    path = compiled_openvino_file(model, folder, precision)
    try:
        return OpenVinoEncoder(path, precision=precision)
    except Exception as error:
        damaged = one_line(error)
    remove_damaged_file(path, damaged)
    try:
        return OpenVinoEncoder(compiled_openvino_file(model, folder, precision), precision=precision)
    except FewShotSAMError:
        raise
    except Exception as error:
        raise FewShotSAMError(f"the OpenVINO encoder {path} cannot be loaded even after compiling it again "
                              f"({one_line(error)})") from None


class OpenVinoEncoder:
    """Runs a compiled OpenVINO encoder on normalised [B, 3, S, S] images, one slice per call (the exported graph's
    fixed shape)."""

    def __init__(self, path: Path, threads: int | None = None, precision: str = "fp32"):
        import openvino

        network = openvino.Core().import_model(Path(path).read_bytes(), "CPU",
                                               openvino_settings(threads or torch.get_num_threads(), precision))
        self.request = network.create_infer_request()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        # infer() returns views of the request's own output buffer: copy each before the next slice overwrites it
        outputs = [np.array(self.request.infer({0: array[index:index + 1]})[0]) for index in range(array.shape[0])]
        return torch.from_numpy(np.concatenate(outputs))
