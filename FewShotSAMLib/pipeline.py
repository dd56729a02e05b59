"""The three jobs, on files or in memory: propagate (adapt on a scan's own painted slices and segment it),
adapt (save a few-shot model from one or more labelled scans) and apply (segment new scans with a saved one)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapter import AdaptOptions, FewShotAdapter, adapt
from .embedding_cache import EmbeddingCache
from .encoding import EncodedVolume, encode_volume
from .errors import FewShotSAMError
from .fewshot import FewShotCollection, collect, labelled_slice_indices
from .models import SamModel, load_model
from .orientation import slice_axis, to_slices
from .progress import NO_PROGRESS, Progress
from .propagation import PropagationOptions, propagate_volume
from .volume import LabelVolume, Volume
from .volume_io import check_output_path, read_labels, read_volume, write_segmentation


@dataclass
class EngineOptions:
    model: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "auto"
    cache_dir: str | None = None
    axis: str = "auto"  # auto (closest to axial), axial, coronal, sagittal
    window: tuple[float, float] | None = None  # CT level, width
    preset: str | None = None  # CT window preset
    segments: list[int] | None = None  # label values to propagate (default: every painted one)
    labelled_slices: list[int] | None = None  # extra slices declared fully labelled (may be empty: negatives)
    encoder: str = "auto"  # how the encoder runs: auto, compiled, onnx, fp32, bf16 (see SamModel.encoder_path)
    adapt: AdaptOptions = field(default_factory=AdaptOptions)
    propagation: PropagationOptions = field(default_factory=PropagationOptions)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Engine:
    """A loaded model and its embedding cache, reused across calls (the Slicer worker and benchmarks keep one)."""

    def __init__(self, options: EngineOptions | None = None, model: SamModel | None = None):
        self.options = options or EngineOptions()
        self.model = model or load_model(self.options.model, self.options.checkpoint, self.options.device)
        self.cache = EmbeddingCache(self.options.cache_dir)

    def encode(self, volume: Volume, progress: Progress = NO_PROGRESS, only: list[int] | None = None) -> EncodedVolume:
        """Embeddings of every slice (or of the slices `only` lists) along the volume's slice axis."""
        return encode_volume(self.model, volume, self.slice_axis(volume), self.cache, self.options.window,
                             self.options.preset, progress=progress, encoder=self.options.encoder, only=only)

    def slice_axis(self, volume: Volume) -> int:
        return slice_axis(volume.geometry, self.options.axis)

    def propagate(self, volume: Volume, labels: LabelVolume, progress: Progress = NO_PROGRESS) -> LabelVolume:
        """Adapt on the painted slices of `labels` and segment the whole of `volume` (same grid), or only the
        slices of options.propagation.slice_range: then only those and the labelled slices are encoded."""
        selected = select_segments(labels, self.options.segments)
        label_slices = to_slices(labels.array, self.slice_axis(volume))
        labelled = labelled_slice_indices(label_slices, self.options.labelled_slices)
        if not labelled:
            raise FewShotSAMError("no labelled slice: paint at least one slice of a structure")
        encoded = self.encode(volume, progress, only=self.slices_to_encode(labelled, label_slices.shape[0]))
        collection = collect(encoded, labels.array, selected, extra_labelled=self.options.labelled_slices)
        seed_everything(self.options.adapt.seed)
        adapter = adapt(self.model, collection, self.options.adapt, progress)
        predicted = propagate_volume(self.model, adapter, encoded, labels.array, labelled, self.options.propagation,
                                     progress)
        return LabelVolume(predicted, labels.geometry, list(labels.segments))

    def slices_to_encode(self, labelled: list[int], n_slices: int) -> list[int] | None:
        """The labelled slices plus the slice range, when a range is set (None: every slice)."""
        if self.options.propagation.slice_range is None:
            return None
        first, last = self.options.propagation.slice_range
        return sorted(set(labelled) | set(range(max(0, first), min(n_slices - 1, last) + 1)))

    def adapt(self, scans: list[tuple[Volume, LabelVolume]], progress: Progress = NO_PROGRESS) -> FewShotAdapter:
        """A few-shot adapter from the labelled slices of one or more scans."""
        collection = None
        for number, (volume, labels) in enumerate(scans):
            selected = select_segments(labels, self.options.segments)
            if collection is not None:
                selected = merge_segments(collection, selected)
            encoded = self.encode(volume, progress)
            collection = collect(encoded, labels.array, selected, number, collection, self.options.labelled_slices)
        seed_everything(self.options.adapt.seed)
        return adapt(self.model, collection, self.options.adapt, progress)

    def apply(self, adapter: FewShotAdapter, volume: Volume, progress: Progress = NO_PROGRESS) -> LabelVolume:
        """Segment a scan with no labels of its own."""
        adapter.check_model(self.model)
        n_slices = volume.array.shape[self.slice_axis(volume)]
        encoded = self.encode(volume, progress, only=self.slices_to_encode([], n_slices))
        predicted = propagate_volume(self.model, adapter, encoded, None, [], self.options.propagation, progress)
        return LabelVolume(predicted, volume.geometry, list(adapter.segments))


def select_segments(labels: LabelVolume, wanted: list[int] | None):
    present = set(np.unique(labels.array).tolist()) - {0}
    if wanted is None:
        chosen = [segment for segment in labels.segments if segment.label_value in present]
        if not chosen:
            raise FewShotSAMError("the label map is empty: paint at least one slice of a structure")
        return chosen
    known = {segment.label_value: segment for segment in labels.segments}
    for value in wanted:
        if value not in present:
            raise FewShotSAMError(f"label value {value} is not painted anywhere in the labels "
                                  f"(painted values: {sorted(present) or 'none'})")
    return [known[value] for value in wanted]


def merge_segments(collection: FewShotCollection, selected):
    """A later scan must describe the same structures (by label value) as the first one."""
    extra = {segment.label_value for segment in selected} - set(collection.label_values)
    if extra:
        raise FewShotSAMError(f"label values {sorted(extra)} appear in a later scan but not in the first one; "
                              f"every scan must use the first scan's label values")
    # A structure absent from a later scan is fine: that scan's labelled slices are negatives for it.
    return collection.segments


# ----------------------------------------------------------------------------------------------------------------
# File-level jobs used by the command line


def read_pair(image_path, labels_path) -> tuple[Volume, LabelVolume]:
    volume = read_volume(image_path)
    labels = read_labels(labels_path, volume, reference_path=image_path)
    return volume, labels


def propagate_files(image_path, labels_path, out_path, options: EngineOptions | None = None,
                    overwrite: bool = False, progress: Progress = NO_PROGRESS, engine: Engine | None = None) -> Path:
    check_output_path(out_path, overwrite)
    progress.update("load", 0, 1, "reading the image and labels")
    volume, labels = read_pair(image_path, labels_path)
    select_segments(labels, (options or EngineOptions()).segments if engine is None else engine.options.segments)
    engine = engine or Engine(options)
    result = engine.propagate(volume, labels, progress)
    progress.update("write", 0, 1, f"writing {out_path}")
    return write_segmentation(out_path, result, overwrite)


def adapt_files(pairs: list[tuple[str, str]], out_path, options: EngineOptions | None = None,
                overwrite: bool = False, progress: Progress = NO_PROGRESS, engine: Engine | None = None) -> Path:
    out_path = Path(out_path)
    if out_path.suffix != ".fsam":
        raise FewShotSAMError(f"cannot write {out_path}: an adapted model file must end in .fsam")
    if out_path.exists() and not overwrite:
        raise FewShotSAMError(f"{out_path} exists; pass --overwrite to replace it")
    if not out_path.parent.is_dir():
        raise FewShotSAMError(f"cannot write {out_path}: folder {out_path.parent} does not exist")
    progress.update("load", 0, 1, "reading the images and labels")
    scans = [read_pair(image, labels) for image, labels in pairs]
    engine = engine or Engine(options)
    adapter = engine.adapt(scans, progress)
    progress.update("write", 0, 1, f"writing {out_path}")
    return adapter.save(out_path, overwrite)


def output_name(image_path, suffix: str = ".seg.nrrd") -> str:
    name = Path(image_path).name
    for ending in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    return f"{name}_fewshotsam{suffix}"


def apply_files(model_path, image_paths: list[str], out_dir, options: EngineOptions | None = None,
                overwrite: bool = False, suffix: str = ".seg.nrrd", progress: Progress = NO_PROGRESS,
                engine: Engine | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    adapter = FewShotAdapter.load(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [out_dir / output_name(image, suffix) for image in image_paths]
    for output in outputs:
        check_output_path(output, overwrite)
    engine = engine or Engine(options)
    adapter.check_model(engine.model, model_path)
    written = []
    for image, output in zip(image_paths, outputs):
        volume = read_volume(image)
        result = engine.apply(adapter, volume, progress)
        written.append(write_segmentation(output, result, overwrite))
    return written
