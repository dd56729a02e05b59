"""Turn a volume into cached per-slice image embeddings (the frozen encoder's only job)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .body_frame import body_boxes_on_grid
from .embedding_cache import EmbeddingCache, cache_key
from .models import SamModel
from .orientation import in_plane_spacing, to_slices
from .preprocess import ResizeInfo, apply_normalisation, choose_normalisation, resize_stack_longest_side
from .progress import NO_PROGRESS, Progress
from .volume import Volume


@dataclass
class EncodedVolume:
    """A volume seen as a stack of model-ready slices along `axis`, with the embeddings of every slice."""

    volume: Volume
    axis: int
    slices: np.ndarray  # normalised intensities [n, rows, cols] in 0..1 (a view along the slice axis)
    embeddings: np.ndarray  # [n, C, H, W] float16 (memory-mapped from the cache)
    resize: ResizeInfo
    pixel_spacing: tuple[float, float]
    encoded: list[int] | None = None  # the slices whose embeddings exist (None: all); the others read as zeros
    # Body boxes on the embedding grid, computed from the slices when first asked for (body_frame.py)
    _body_boxes: dict = field(default_factory=dict, repr=False)

    @property
    def n_slices(self) -> int:
        return self.slices.shape[0]

    def body_boxes(self, indices) -> torch.Tensor:
        """[len, 4] each slice's body box in embedding-grid cells (body_frame.body_boxes_on_grid)."""
        missing = [int(z) for z in indices if int(z) not in self._body_boxes]
        if missing:
            boxes = body_boxes_on_grid(self.slices[missing], self.resize, self.embeddings.shape[-1])
            self._body_boxes.update(zip(missing, boxes))
        return torch.stack([self._body_boxes[int(z)] for z in indices]) if len(indices) else torch.zeros((0, 4))

    def model_images(self, indices) -> torch.Tensor:
        """[len, 3, S, S] model-input images for some slices (recomputed: cheap next to encoding)."""
        images, _ = resize_stack_longest_side(self.slices[list(indices)], self.resize.target, self.pixel_spacing)
        return images


def encode_volume(model: SamModel, volume: Volume, axis: int, cache: EmbeddingCache, window=None, preset=None,
                  progress: Progress = NO_PROGRESS, batch_size: int = 8, encoder: str = "auto",
                  only: list[int] | None = None) -> EncodedVolume:
    """encoder: how the encoder runs, one of catalog.ENCODER_PATHS (see SamModel.encoder_path).
    only: encode just these slice indices (None: all); cached slices are never encoded again."""
    if model.will_compile_encoder(encoder, cache.encoders_dir):
        progress.update("encode", 0, 1, "building and measuring the encoder for this computer (once)")
    path = model.prepare_encoder(encoder, cache.encoders_dir)
    normalisation = choose_normalisation(volume, window=window, preset=preset)
    slices = to_slices(apply_normalisation(volume.array, normalisation), axis)
    pixel_spacing = in_plane_spacing(volume.geometry, axis)
    target = model.spec.input_size
    _, resize = resize_stack_longest_side(slices[:1], target, pixel_spacing)
    # The arithmetic is part of the key: bf16 embeddings differ from fp32 ones by a few percent, and the compiled
    # encoder's from autocast's by its own rounding. ONNX Runtime and PyTorch fp32 differ by ~1e-6 relative (as much
    # as two thread counts do), below the cache's fp16 storage, so they share fp32 entries.
    arithmetic = {"bf16": "bf16", "compiled": "bf16-compiled"}.get(path, "fp32")
    preprocessing = f"{normalisation.key()};size={target};{arithmetic}"
    key = cache_key(volume.array, axis, preprocessing, model.weights_id)

    def compute(indices):
        images, _ = resize_stack_longest_side(slices[list(indices)], target, pixel_spacing)
        return model.encode(images, path, encoders_folder=cache.encoders_dir)

    wanted = sorted(set(only)) if only is not None else list(range(slices.shape[0]))
    entry = cache.open_entry(key, slices.shape[0], model.spec.embedding_shape, model.weights_id)
    verified = entry.get_or_compute(  # encodes what is missing, checks every wanted slice's checksum
        wanted, compute,
        progress=lambda done, total: progress.update("encode", done, total, f"encoding slice {done}/{total}"),
        cancel=lambda: progress.cancel is not None and progress.cancel(), batch_size=batch_size,
    )
    # Encoding is done for this volume: the encoder's working memory would otherwise sit beside the propagation's
    # (a 512x512x300 CT run peaked at 3.99 GiB with it kept, 3.27 GiB without).
    model.release_encoder_sessions()
    # A partial encoding is indexed by slice like a full one: the slices not wanted read as zeros.
    embeddings = verified if only is None else entry.embeddings()
    return EncodedVolume(volume, axis, slices, embeddings, resize, pixel_spacing, None if only is None else wanted)
