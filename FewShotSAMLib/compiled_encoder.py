"""The image encoder compiled ahead of time for this computer's CPU: the fastest CPU path where it can be built.

PyTorch's AOTInductor turns the encoder, run in bf16 (autocast: matrix products and convolutions in bf16,
normalisations and softmax in fp32), into one native library. Two settings make it fast, and both are needed:
freezing (the weights become constants) and compiling without autograd; together they let inductor store the
weights pre-packed in oneDNN's blocked layout and fuse the activations into the matrix products. LiteMedSAM's
encoder then runs at 4.4x eager PyTorch fp32 on a 2-core bf16 CPU, against 2x for ONNX Runtime
(benchmarks/speed has the figures; without freezing and no-grad it was 3x). The embeddings move by about 6%
relative, as much as bf16 autocast moves them: abdominal organs keep their Dice (within 0.0004 on CHAOS), tiny
structures lose about 0.01 (hippocampus crops; benchmarks/accuracy), and `--encoder onnx` keeps fp32.

The library is built once per (weights, torch version, CPU instruction set) into the embedding cache's
`.encoders/` folder: about 20-40 s, after which a process loads it in milliseconds. Building needs a C++ compiler
(inductor writes C++); where there is none, or the build fails, a `.failed` note beside it records why and the
"auto" encoder path uses ONNX Runtime instead, without trying again.

The same build in fp32 (`--encoder compiled-fp32`: frozen weights, no autocast) needs no bf16 instructions; it is
one of the paths `auto` measures on CPUs without bf16 (encoder_probe.py).
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from .atomic_write import write_atomically, write_text_atomically
from .errors import FewShotSAMError, one_line


class _Bf16Encoder(nn.Module):
    """The encoder under bf16 autocast, returning fp32: what gets compiled."""

    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.image_encoder(images).float()


PRECISIONS = ("bf16", "fp32")


def why_not_compilable(precision: str = "bf16") -> str | None:
    """None where this machine can build a compiled encoder in this precision; else the reason it cannot."""
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        return f"torch {torch.__version__} has no AOTInductor packaging (needs torch 2.6 or later)"
    if precision == "bf16" and not cpu_has_bf16():
        return "this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
    if _cpp_compiler() is None:
        return "no C++ compiler found (set CXX, or install g++ or clang++)"
    return None


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpp_compiler() -> str | None:
    names = [os.environ.get("CXX", "")] + (["cl"] if platform.system() == "Windows" else ["g++", "c++", "clang++"])
    return next((shutil.which(name) for name in names if name and shutil.which(name)), None)


def compiled_encoder_file(model, folder: Path, precision: str = "bf16") -> Path:
    """Where the model's compiled encoder lives: one file per weights, precision, torch version and CPU instruction
    set."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    name = model.weights_id.replace(":", "-")
    torch_version = torch.__version__.replace("+", "-")
    return Path(folder) / f"{name}-{model.spec.input_size}px-{precision}-torch{torch_version}-{capability}.pt2"


def failure_note(path: Path) -> Path:
    return path.with_suffix(".failed")


def build_compiled_encoder(model, folder: Path, precision: str = "bf16") -> Path:
    """The compiled encoder file, built on first use (atomically, one process at a time).

    Raises FewShotSAMError when it cannot be built; the reason is kept in a `.failed` note so that later calls
    fail at once instead of compiling again."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = compiled_encoder_file(model, folder, precision)
    with FileLock(folder / f".{path.name}.lock"):
        if path.is_file():
            return path
        if failure_note(path).is_file():
            raise FewShotSAMError(f"the compiled encoder could not be built earlier: "
                                  f"{failure_note(path).read_text().strip()} (delete {failure_note(path)} to retry)")
        reason = why_not_compilable(precision)
        if reason is None:
            reason = _compile_into(model, path, precision)
        if reason is not None:
            write_text_atomically(failure_note(path), reason + "\n")
            raise FewShotSAMError(f"could not compile the {model.spec.name} encoder in {folder}: {reason}")
    return path


def _compile_into(model, path: Path, precision: str) -> str | None:
    """Compile the encoder into `path`; None on success, else what went wrong."""
    size = model.spec.input_size
    example = torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    encoder = model.image_encoder.cpu()
    program_module = _Bf16Encoder(encoder) if precision == "bf16" else encoder

    def compile_to(temporary: Path) -> None:
        # No autograd, and frozen weights: without both inductor keeps plain matrix products (measured 3x, not 5x).
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            program = torch.export.export(program_module.eval(), (example,))
            torch._inductor.aoti_compile_and_package(program, package_path=str(temporary))

    try:
        write_atomically(path, compile_to)
        return None
    except Exception as error:  # compilers fail in many ways; the note and the fallback handle them all
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"


def open_compiled_encoder(model, folder: Path, precision: str = "bf16") -> "CompiledEncoder":
    """The model's compiled encoder, ready to run. A package in the cache that cannot be loaded (cut short by a full
    disk or a crash, or damaged) is deleted and built again, once."""
    from .onnx_encoder import remove_damaged_file

    path = build_compiled_encoder(model, folder, precision)
    try:
        return CompiledEncoder(path)
    except Exception as error:  # torch raises RuntimeError or zipfile errors, depending on the damage
        damaged = one_line(error)
    remove_damaged_file(path, damaged)
    try:
        return CompiledEncoder(build_compiled_encoder(model, folder, precision))
    except FewShotSAMError:
        raise
    except Exception as error:
        raise FewShotSAMError(f"the compiled encoder {path} cannot be loaded even after building it again "
                              f"({one_line(error)})") from None


class CompiledEncoder:
    """Runs a compiled encoder on normalised [B, 3, S, S] images, one slice per call (its compiled shape; one
    slice at a time was also measured faster than batches of 8, which spill the CPU's caches)."""

    def __init__(self, path: Path):
        self.runner = torch._inductor.aoti_load_package(str(path))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs = [self.runner(images[index:index + 1].contiguous(memory_format=torch.channels_last))
                   for index in range(images.shape[0])]
        return torch.cat(outputs)
