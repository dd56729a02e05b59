"""The image encoder through ONNX Runtime: the default on CPU for LiteMedSAM.

Eager PyTorch spends most of LiteMedSAM's encoder time outside matrix products: in GELU, batch norm, casts and
layout copies, one small kernel after another. ONNX Runtime fuses those, and runs the same fp32 arithmetic
(embeddings differ from PyTorch's by ~1e-6 relative, as much as a change of thread count does), so it is about 2x
faster than eager fp32 on one core with no loss at all, where bf16 autocast gains less and moves the embeddings
by several percent (benchmarks/speed has the figures).

The encoder is exported to ONNX once per model weights, into the embedding cache's `.encoders/` folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from .atomic_write import write_atomically
from .errors import FewShotSAMError, one_line

OPSET = 17


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def exported_encoder_path(model, folder: Path) -> Path:
    """The model's encoder as an ONNX file in `folder`, exported on first use (atomically, one process at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = model.weights_id.replace(":", "-")
    path = folder / f"{name}-{model.spec.input_size}px-opset{OPSET}.onnx"
    with FileLock(folder / f".{path.name}.lock"):
        if path.is_file():
            return path
        example = torch.zeros(1, 3, model.spec.input_size, model.spec.input_size)

        def export_to(temporary: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
                torch.onnx.export(model.image_encoder.cpu().eval(), (example,), str(temporary), input_names=["image"],
                                  output_names=["embedding"], opset_version=OPSET, dynamo=False)

        try:
            write_atomically(path, export_to)
        except Exception as error:
            raise FewShotSAMError(f"could not export the {model.spec.name} encoder to ONNX in {folder}: "
                                  f"{type(error).__name__}: {error}") from None
    return path


def open_onnx_encoder(model, folder: Path) -> "OnnxEncoder":
    """The model's exported encoder, ready to run. A file in the cache that ONNX Runtime cannot open (cut short by
    a full disk or a crash, or damaged) is deleted and exported again, once."""
    path = exported_encoder_path(model, folder)
    try:
        return OnnxEncoder(path)
    except Exception as error:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        damaged = one_line(error)
    remove_damaged_file(path, damaged)
    try:
        return OnnxEncoder(exported_encoder_path(model, folder))
    except Exception as error:
        raise FewShotSAMError(f"the ONNX encoder {path} cannot be opened even after exporting it again "
                              f"({one_line(error)})") from None


def remove_damaged_file(path: Path, reason: str) -> None:
    """Delete a built encoder that cannot be loaded, under its build lock, so that the next use builds it again."""
    warnings.warn(f"the encoder {path.name} in the cache is damaged ({reason}); building it again", stacklevel=3)
    with FileLock(path.parent / f".{path.name}.lock"):
        path.unlink(missing_ok=True)


class OnnxEncoder:
    """Runs an exported encoder on normalised [B, 3, S, S] images, one slice per call (batching gains nothing in
    ONNX Runtime on CPU, and one slice keeps the exported graph's fixed shape)."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Worker threads sleep instead of spinning between operators: spinning threads steal the core from the
        # other work of a busy laptop (measured 1.35x faster here with another process running, same when idle).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        outputs = [self.session.run(None, {"image": array[index:index + 1]})[0] for index in range(array.shape[0])]
        return torch.from_numpy(np.concatenate(outputs))
