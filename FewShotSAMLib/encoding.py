"""Turn a volume into cached per-slice image embeddings (the frozen encoder's only job)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .body_frame import IMAGE_FRAME, body_boxes_on_grid
from .embedding_cache import CacheEntry, EmbeddingCache, ReversedEntry, cache_key
from .models import SamModel
from .orientation import in_plane_spacing, to_slices
from .preprocess import (
    ResizeInfo,
    apply_normalisation,
    choose_normalisation,
    resize_stack_longest_side,
    resized_shape_for,
)
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
    # [n, H, W, 2] where each cell lies in an image-frame adapter's support scan (registration.py; set by
    # Engine.apply), or None: every cell at its own image-frame position
    registered_positions: torch.Tensor | None = None
    # Body boxes on the embedding grid, computed from the slices when first asked for (body_frame.py)
    _body_boxes: dict = field(default_factory=dict, repr=False)

    @property
    def n_slices(self) -> int:
        return self.slices.shape[0]

    def float32_embeddings(self, indices: list[int]) -> torch.Tensor:
        """[len, C, H, W] the embeddings of these slices as float32. torch widens the cached float16 with the CPU's
        conversion instructions, ~5x faster than numpy's astype (16 CHAOS slices: 0.02 against 0.11 s; a warm CHAOS
        run converts every slice 3-4 times), and to the same values."""
        return torch.from_numpy(np.asarray(self.embeddings[list(indices)])).float()

    def body_boxes(self, indices) -> torch.Tensor:
        """[len, 4] each slice's body box in embedding-grid cells (body_frame.body_boxes_on_grid)."""
        missing = [int(z) for z in indices if int(z) not in self._body_boxes]
        if missing:
            boxes = body_boxes_on_grid(self.slices[missing], self.resize, self.embeddings.shape[-1])
            self._body_boxes.update(zip(missing, boxes))
        return torch.stack([self._body_boxes[int(z)] for z in indices]) if len(indices) else torch.zeros((0, 4))

    def positions_for(self, adapter_frame: str, indices) -> torch.Tensor | None:
        """The registered positions of some slices for an adapter in `adapter_frame`, or None (its own positions):
        only image-frame positions are registered, body-frame ones come from each slice's body box."""
        if self.registered_positions is None or adapter_frame != IMAGE_FRAME:
            return None
        return self.registered_positions[list(indices)]

    def model_images(self, indices) -> torch.Tensor:
        """[len, 3, S, S] model-input images for some slices (recomputed: cheap next to encoding)."""
        images, _ = resize_stack_longest_side(self.slices[list(indices)], self.resize.target, self.pixel_spacing)
        return images


class VolumeEncoding:
    """One volume's encoding, open for more slices: the normalised slices, the cache entry and the encoder are
    prepared once, so that encoding on demand (a few slices at a time, Engine.propagate) repeats none of it.
    encoder: how the encoder runs, one of catalog.ENCODER_PATHS (see SamModel.encoder_path)."""

    def __init__(self, model: SamModel, volume: Volume, axis: int, cache: EmbeddingCache, window=None, preset=None,
                 progress: Progress = NO_PROGRESS, batch_size: int = 8, encoder: str = "auto"):
        self.model, self.volume, self.axis, self.cache, self.batch_size = model, volume, axis, cache, batch_size
        self.requested, self.progress = encoder, progress
        normalisation = choose_normalisation(volume, window=window, preset=preset)
        self.slices = to_slices(apply_normalisation(volume.array, normalisation), axis)
        self.pixel_spacing = in_plane_spacing(volume.geometry, axis)
        self.target = model.spec.input_size
        _, self.resize = resize_stack_longest_side(self.slices[:1], self.target, self.pixel_spacing)
        self.preprocessing = f"{normalisation.key()};size={self.target}{pixel_shape_tag(self.resize)}"
        # The encoder opens only when a slice is missing from the cache (opening OpenVINO's costs ~0.2 s, a third of
        # a warm re-run's spare time): until then the path it would run (read from auto's probe record) keys the
        # cache. auto's probe runs now if it never ran on this machine (a built path is built when it opens).
        if encoder == "auto":
            self.announce_build()
        self.path, self.opened = model.encoder_path(encoder, cache.encoders_dir), False
        self.entry = self.open_entry()
        self.done: set[int] = set()  # slices encoded (or found in the cache) through this object

    def open_entry(self) -> CacheEntry | ReversedEntry:
        """The cache entry for this volume under self.path's arithmetic: bf16 embeddings differ from fp32 ones by a
        few percent, and the compiled encoder's from autocast's by its own rounding. ONNX Runtime, OpenVINO and
        PyTorch fp32 differ by ~1e-6 relative (as much as two thread counts do), below the cache's fp16 storage,
        so they share fp32 entries. Without an entry of its own, the volume uses the entry of the same scan with its
        slices in reverse order, where there is one (ReversedEntry)."""
        description = f"{self.preprocessing};{arithmetic_of(self.path)}"
        key = cache_key(self.volume.array, self.axis, description, self.model.weights_id)
        if not self.cache.has_entry(key):
            # Hashed only on a miss: a warm run, whose entry exists, pays nothing for this.
            flipped = cache_key(np.flip(self.volume.array, self.axis), self.axis, description, self.model.weights_id)
            if flipped != key and self.cache.has_entry(flipped):
                return ReversedEntry(self.open_cache_entry(flipped))
        return self.open_cache_entry(key)

    def open_cache_entry(self, key: str) -> CacheEntry:
        return self.cache.open_entry(key, self.slices.shape[0], self.model.spec.embedding_shape,
                                     self.model.weights_id)

    def announce_build(self) -> None:
        if self.model.will_compile_encoder(self.requested, self.cache.encoders_dir):
            self.progress.update("encode", 0, 1, "building and measuring the encoder for this computer (once)")

    def open_encoder(self) -> None:
        """Build or load the encoder now that a slice needs it. Under auto, a path that fails to open falls back to
        the next fastest (models.prepare_encoder); one of other arithmetic raises OtherArithmetic for encode()."""
        self.announce_build()
        path = self.model.prepare_encoder(self.requested, self.cache.encoders_dir)
        self.opened = True
        if arithmetic_of(path) != arithmetic_of(self.path):
            self.path = path
            raise OtherArithmetic
        self.path = path

    def encode(self, only: list[int] | None, progress: Progress = NO_PROGRESS) -> EncodedVolume:
        """The volume with `only` (None: every slice) and every slice this object encoded before; cached slices
        are never encoded again."""

        def compute(indices):
            if not self.opened:
                self.open_encoder()
            images, _ = resize_stack_longest_side(self.slices[list(indices)], self.target, self.pixel_spacing)
            return self.model.encode(images, self.path, encoders_folder=self.cache.encoders_dir)

        wanted = sorted(set(only)) if only is not None else list(range(self.slices.shape[0]))
        try:
            verified = self.entry.get_or_compute(  # encodes what is missing, checks every wanted slice's checksum
                wanted, compute,
                progress=lambda done, total: progress.update("encode", done, total, f"encoding slice {done}/{total}"),
                cancel=lambda: progress.cancel is not None and progress.cancel(), batch_size=self.batch_size,
            )
        except OtherArithmetic:
            # The planned encoder failed to open and its fallback computes other embeddings: every slice this object
            # handed out is taken again from the fallback's own cache entry, so that no result mixes the two.
            self.entry = self.open_entry()
            again = None if only is None else sorted(set(wanted) | self.done)
            self.done = set()
            return self.encode(again, progress)
        self.done.update(wanted)
        # A partial encoding is indexed by slice like a full one: the slices not encoded read as zeros.
        embeddings, encoded = (verified, None) if only is None else (self.entry.embeddings(), sorted(self.done))
        return EncodedVolume(self.volume, self.axis, self.slices, embeddings, self.resize, self.pixel_spacing, encoded)

    def release(self) -> None:
        """Encoding is done for this volume: the encoder's working memory would otherwise sit beside the
        propagation's (a 512x512x300 CT run peaked at 3.99 GiB with it kept, 3.27 GiB without)."""
        self.model.release_encoder_sessions()
        self.opened = False


def pixel_shape_tag(resize: ResizeInfo) -> str:
    """The cache key's note of a slice resampled to square pixels: the same voxels with another in-plane spacing
    ratio make other model images. Square-pixel slices need none (their keys stay what they were)."""
    if resize.resized_shape == resized_shape_for(resize.original_shape, resize.target):
        return ""
    rows, cols = resize.resized_shape
    return f";pixels={rows}x{cols}"


class OtherArithmetic(Exception):
    """The encoder that opened is not the one the cache entry was keyed for, and computes other embeddings."""


def arithmetic_of(path: str) -> str:
    """The embeddings' arithmetic for an encoder path (part of the cache key)."""
    return {"bf16": "bf16", "compiled": "bf16-compiled", "openvino-bf16": "bf16-openvino"}.get(path, "fp32")
