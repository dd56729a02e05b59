"""The three jobs, on files or in memory: propagate (adapt on a scan's own painted slices and segment it),
adapt (save a few-shot model from one or more labelled scans) and apply (segment new scans with a saved one)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .adapter import AdaptOptions, FewShotAdapter, adapt
from .body_frame import IMAGE_FRAME
from .confidence import ConfidenceRecorder
from .embedding_cache import EmbeddingCache
from .encoding import EncodedVolume, VolumeEncoding
from .errors import Cancelled, FewShotSAMError
from .fewshot import FewShotCollection, class_maps, collect, labelled_slice_indices
from .models import SamModel, load_model
from .orientation import in_plane_spacing, slice_axis, to_slices
from .preprocess import fixed_window
from .progress import NO_PROGRESS, ZOOM_STAGES, AsStage, Progress, WithinStage
from .propagation import PropagationOptions, Reach, finish_labels, predict_classes, propagate_volume
from .registration import positions_in_support, support_image
from .second_pass import STAGE as SECOND_PASS_STAGE
from .second_pass import SecondPassOptions, keep_moved_structures, self_train
from .small_structures import ShapeBlendOptions, blend_with_painted_shape
from .volume import LabelVolume, Volume
from .volume_io import check_output_path, read_labels, read_volume, write_segmentation
from .warm_start import RunRecord, WarmStart, load_record, plan, run_key, save_record, slice_checksums, warm_adapt
from .zoom import ZoomOptions, crop_pair, paste, zoom_boxes


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
    encoder: str = "auto"  # how the encoder runs: one of catalog.ENCODER_PATHS (see SamModel.encoder_path)
    adapt: AdaptOptions = field(default_factory=AdaptOptions)
    propagation: PropagationOptions = field(default_factory=PropagationOptions)
    small_structures: ShapeBlendOptions = field(default_factory=ShapeBlendOptions)
    zoom: ZoomOptions = field(default_factory=ZoomOptions)  # propagate: a second look at structures the grid blurs
    # apply only: tune on the query's own most confident slices and predict it again (second_pass.py)
    second_pass: SecondPassOptions = field(default_factory=SecondPassOptions)
    # adapt: keep a small copy of the (single) support scan in the adapter, a low-resolution image of the patient,
    # so it is asked for, not made by default; apply: register that copy to the query and read the image-frame
    # pixel prompts and footprints at the registered positions (registration.py); models without one apply as before
    register: bool = False
    # Start from the previous run on the same scan and options when only painted slices were added or changed
    # (warm_start.py); False: always adapt from scratch.
    warm_start: bool = True
    # propagate encodes every slice first instead of only the slices the structures reach (Engine.encode_reach);
    # the result is the same voxel for voxel, so this is for measuring what encoding on demand saves.
    encode_all_slices: bool = False


# Slices encoded at a time in each direction a structure goes on beyond the encoded ones: a batch for the encoder,
# and a structure's end is overshot by at most 3 slices (8 overshot CHAOS kidneys by 6 on each side).
REACH_BLOCK = 4


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
        encoding = self.open_encoding(volume, progress)
        try:
            return encoding.encode(only, progress)
        finally:
            encoding.release()

    def open_encoding(self, volume: Volume, progress: Progress = NO_PROGRESS) -> VolumeEncoding:
        return VolumeEncoding(self.model, volume, self.slice_axis(volume), self.cache, self.options.window,
                              self.options.preset, progress, encoder=self.options.encoder)

    def slice_axis(self, volume: Volume) -> int:
        return slice_axis(volume.geometry, self.options.axis)

    def propagate(self, volume: Volume, labels: LabelVolume, progress: Progress = NO_PROGRESS,
                  confidence: ConfidenceRecorder | None = None) -> LabelVolume:
        """Adapt on the painted slices of `labels` and segment the whole of `volume` (same grid), or only the
        slices of options.propagation.slice_range: then only those and the labelled slices are encoded. Without a
        range, only the labelled slices are encoded before adapting, then the slices the structures reach
        (encode_reach; options.encode_all_slices: every slice first).
        confidence: records how sure each slice is; its report() then says which slice to paint next."""
        check_inputs(self.options, volume, labels)
        selected = select_segments(labels, self.options.segments)
        label_slices = to_slices(labels.array, self.slice_axis(volume))
        labelled = labelled_slice_indices(label_slices, self.options.labelled_slices)
        if not labelled:
            raise FewShotSAMError("no labelled slice: paint at least one slice of a structure")
        encoding = self.open_encoding(volume, progress)
        try:
            first = labelled if self.encodes_on_demand() else self.slices_to_encode(labelled, label_slices.shape[0])
            encoded = encoding.encode(first, progress)
            encoding.release()  # its memory would sit beside the tuning's; encoding more reopens it (~0.1 s)
            record, warm, collection = self.adapt_on_painting(volume, labels, encoded, label_slices, labelled,
                                                              selected, progress)
            reach = None
            if self.encodes_on_demand():
                # A warm start predicts only its regions again: only they need their reach encoded.
                windows = [(0, encoded.n_slices - 1)] if warm is None else warm.regions
                encoded, reach = self.encode_reach(encoding, encoded, record.adapter, label_slices, labelled,
                                                   windows, progress)
        finally:
            encoding.release()
        propagation = self.options.propagation
        if confidence is None:  # the run record keeps it, so that a later warm start reports on every slice too
            confidence = ConfidenceRecorder()
        confidence.begin(encoded.n_slices, record.adapter.segments, labelled, encoded.axis)
        if warm is not None:
            confidence.carry_over(warm.record.confidence, warm.regions)
        record.classes = self.predict_classes(record.adapter, encoded, label_slices, labelled, propagation, warm,
                                              progress, confidence, reach)
        record.confidence = confidence.state()
        save_record(self.cache.runs_dir, record)
        predicted = finish_labels(record.classes, record.adapter.label_values, label_slices, labelled, propagation,
                                  encoded.axis)
        axis = encoded.axis
        predicted = self.zoom_small_structures(volume, labels, predicted, labelled, encoded, collection.label_values,
                                               progress)
        predicted = blend_with_painted_shape(predicted, labels.array, labelled, axis, collection.label_values,
                                             in_plane_spacing(volume.geometry, axis), self.options.small_structures,
                                             propagation.slice_range, image=volume.array)
        return LabelVolume(predicted, labels.geometry, list(labels.segments))

    def zoom_small_structures(self, volume: Volume, labels: LabelVolume, predicted: np.ndarray, labelled: list[int],
                              encoded: EncodedVolume, label_values: list[int], progress: Progress) -> np.ndarray:
        """The whole-slice result with each structure too small for the embedding grid segmented again on a crop
        around it (zoom.py): propagate on the crop, the painted slices all declared labelled there (a structure
        painted elsewhere on them is absent from them), no crop zoomed again and the small-structure blend left to
        the whole result."""
        axis = encoded.axis
        boxes = zoom_boxes(to_slices(labels.array, axis), to_slices(predicted, axis), label_values,
                           in_plane_spacing(volume.geometry, axis), encoded.embeddings.shape[-1], self.options.zoom)
        for part, box in enumerate(boxes):
            options = replace(self.options, segments=[box.value], labelled_slices=labelled,
                              zoom=replace(self.options.zoom, enabled=False),
                              small_structures=replace(self.options.small_structures, enabled=False))
            crop_volume, crop_labels = crop_pair(volume, labels, axis, box)
            within = WithinStage(progress, "zoom", ZOOM_STAGES, part, len(boxes))
            zoomed = Engine(options, self.model).propagate(crop_volume, crop_labels, within)
            predicted = paste(predicted, zoomed.array, axis, box)
        return predicted

    def adapt_on_painting(self, volume: Volume, labels: LabelVolume, encoded: EncodedVolume,
                          label_slices: np.ndarray, labelled: list[int], selected,
                          progress: Progress) -> tuple[RunRecord, WarmStart | None, FewShotCollection]:
        """propagate's adapter, from scratch or warm-started from the run record: the record (its classes still to
        be predicted), the warm start (None: a full run) and the collection of painted slices."""
        collection = collect(encoded, labels.array, selected, extra_labelled=self.options.labelled_slices)
        record = RunRecord(run_key(volume, encoded.axis, self.options, self.model.weights_id,
                                   [segment.label_value for segment in selected]),
                           slice_checksums(label_slices, labelled), slice_checksums(encoded.embeddings, labelled),
                           None, None)
        warm = None
        if self.options.warm_start:
            warm = plan(load_record(self.cache.runs_dir, record.key), record.painted, record.embedded, encoded.n_slices)
        seed_everything(self.options.adapt.seed)
        options = self.options.adapt.resolved(across_scans=False)
        if warm is None:
            record.adapter = adapt(self.model, collection, options, progress)
        else:
            record.adapter = warm_adapt(self.model, collection, warm, options, progress)
        return record, warm, collection

    def encodes_on_demand(self) -> bool:
        """Whether propagate encodes the labelled slices, then the slices the structures reach (a user's slice range
        says exactly what to encode)."""
        return not self.options.encode_all_slices and self.options.propagation.slice_range is None

    def encode_reach(self, encoding: VolumeEncoding, encoded: EncodedVolume, adapter: FewShotAdapter,
                     label_slices: np.ndarray, labelled: list[int], windows: list[tuple[int, int]],
                     progress: Progress) -> tuple[EncodedVolume, Reach]:
        """Encode, REACH_BLOCK slices at a time in each direction, the slices of `windows` that the structures can
        reach, until no kept cell lies next to an unencoded slice (propagation.Reach says why the result then
        equals a full encoding's, voxel for voxel). Returns the encoding and the Reach, whose pixel-prompt
        probabilities of the windows' slices predict_classes reuses."""
        at_most = sum(1 for first, last in windows for z in range(first, last + 1) if z not in encoding.done)
        reach = Reach(adapter, encoded, label_slices, labelled, self.options.propagation.batch_size)
        newly = 0
        while True:
            progress.check_cancel()
            block = set()
            for window in windows:
                for start, step in reach.unencoded(encoded, window):
                    block.update(next_unencoded(start, step, window, encoding.done))
            if not block:
                return encoded, reach
            within = AsStage(progress, "reach", newly, at_most, "encoding the slices the structures reach")
            encoded = encoding.encode(sorted(block), within)
            newly += len(block)

    def predict_classes(self, adapter: FewShotAdapter, encoded: EncodedVolume, label_slices: np.ndarray,
                        labelled: list[int], propagation: PropagationOptions, warm: WarmStart | None,
                        progress: Progress, confidence: ConfidenceRecorder, reach: Reach | None) -> np.ndarray:
        """Every slice's classes, or on a warm start the recorded ones with its regions predicted again.
        reach: encode_reach's, or None when the slices were encoded up front."""
        if warm is None:
            return predict_classes(self.model, adapter, encoded, label_slices, labelled, propagation, progress,
                                   confidence=confidence, reach=reach)
        classes = warm.record.classes.copy()
        for first, last in warm.regions:
            again = predict_classes(self.model, adapter, encoded, label_slices, labelled, propagation, progress,
                                    region=(first, last), confidence=confidence, reach=reach)
            classes[first:last + 1] = again[first:last + 1]
        return classes

    def slices_to_encode(self, labelled: list[int], n_slices: int) -> list[int] | None:
        """The labelled slices plus the slice range, when a range is set (None: every slice)."""
        if self.options.propagation.slice_range is None:
            return None
        first, last = self.options.propagation.slice_range
        return sorted(set(labelled) | set(range(max(0, first), min(n_slices - 1, last) + 1)))

    def adapt(self, scans: list[tuple[Volume, LabelVolume]], progress: Progress = NO_PROGRESS) -> FewShotAdapter:
        """A few-shot adapter from the labelled slices of one or more scans."""
        collection = None
        for volume, labels in scans:
            check_inputs(self.options, volume, labels)
        for number, (volume, labels) in enumerate(scans):
            selected = select_segments(labels, self.options.segments)
            if collection is not None:
                selected = merge_segments(collection, selected)
            # Only the labelled slices enter the collection, so only they are encoded (3 slices of a 300-slice CT,
            # not 300); none labelled: collect says so.
            labelled = labelled_slice_indices(to_slices(labels.array, self.slice_axis(volume)),
                                              self.options.labelled_slices)
            encoded = self.encode(volume, progress, only=labelled)
            collection = collect(encoded, labels.array, selected, number, collection, self.options.labelled_slices)
        seed_everything(self.options.adapt.seed)
        adapter = adapt(self.model, collection, self.options.adapt.resolved(across_scans=True), progress)
        adapter.support_modalities = [volume.modality for volume, _ in scans]
        # The positions of several scans' image frames are no one scan's to register.
        if self.options.register and len(scans) == 1:
            painted = [[z for (_, z), target in zip(collection.sources, collection.targets) if (target == c).any()]
                       for c in range(1, collection.n_classes)]
            adapter.support_image = support_image(encoded.slices, scans[0][0].geometry, encoded.axis, encoded.resize,
                                                  painted)
        return adapter

    def apply(self, adapter: FewShotAdapter, volume: Volume, progress: Progress = NO_PROGRESS,
              scan_name: str = "the scan") -> LabelVolume:
        """Segment a scan with no labels of its own (warns when it is unlike the model's support scans)."""
        adapter.check_model(self.model)
        check_inputs(self.options, volume)
        adapter.warn_if_unlike_support(volume.modality, scan_name)
        n_slices = volume.array.shape[self.slice_axis(volume)]
        encoded = self.encode(volume, progress, only=self.slices_to_encode([], n_slices))
        if self.options.register and adapter.position_frame == IMAGE_FRAME:
            encoded.registered_positions = positions_in_support(
                adapter.support_image, encoded.slices, volume.geometry, encoded.axis, encoded.resize,
                encoded.embeddings.shape[-1], progress, self.options.adapt.seed)
        recorder = ConfidenceRecorder() if self.options.second_pass.enabled else None
        predicted = propagate_volume(self.model, adapter, encoded, None, [], self.options.propagation, progress,
                                     recorder)
        if recorder is not None:
            predicted = self.second_pass(adapter, encoded, predicted, recorder, progress)
        return LabelVolume(predicted, volume.geometry, list(adapter.segments))

    def second_pass(self, adapter: FewShotAdapter, encoded: EncodedVolume, first: np.ndarray,
                    recorder: ConfidenceRecorder, progress: Progress) -> np.ndarray:
        """The query predicted again by the adapter tuned on its confident slices (second_pass.py), or the first
        result when no slice is confident enough."""
        within = WithinStage(progress, SECOND_PASS_STAGE, ("prompts", "tune", "propagate"))
        classes = class_maps(to_slices(first, encoded.axis), adapter.label_values)
        seed_everything(self.options.adapt.seed)
        tuned = self_train(self.model, adapter, encoded, classes, recorder, self.options.second_pass,
                           self.options.adapt.seed, within)
        if tuned is None:
            return first
        second = propagate_volume(self.model, tuned, encoded, None, [], self.options.propagation, within)
        return keep_moved_structures(first, second, adapter.label_values, self.options.second_pass.min_agreement)


def next_unencoded(start: int, step: int, window: tuple[int, int], done: set[int]) -> list[int]:
    """Up to REACH_BLOCK slices from `start` on in the direction of `step`, within the window, up to the next
    slice already encoded."""
    block, z = [], start
    while len(block) < REACH_BLOCK and window[0] <= z <= window[1] and z not in done:
        block.append(z)
        z += step
    return block


def check_inputs(options: EngineOptions, volume: Volume, labels: LabelVolume | None = None) -> None:
    """Every check of a scan, its labels and the options that needs no model: run before the model loads, so that
    a mistake costs a second, not the model's load time (and leaves no cache folder behind)."""
    array = volume.array
    if array.size and array.min() == array.max():
        raise FewShotSAMError(f"the image is blank (every voxel is {array.flat[0]:g}): there is nothing to segment")
    fixed_window(volume, options.window, options.preset)  # a bad window or preset raises here
    n_slices = array.shape[slice_axis(volume.geometry, options.axis)]
    slice_range = options.propagation.slice_range
    if slice_range is not None:
        first, last = slice_range
        if first > last:
            raise FewShotSAMError(f"--slice-range {first}-{last} is reversed; give FIRST-LAST with FIRST <= LAST")
        if first < 0 or last >= n_slices:
            raise FewShotSAMError(f"--slice-range {first}-{last} is outside the scan, which has {n_slices} slices "
                                  f"along its slice axis (0-{n_slices - 1})")
    for index in options.labelled_slices or []:
        if not 0 <= index < n_slices:
            raise FewShotSAMError(f"--labelled-slices: slice {index} is outside the scan's slices 0-{n_slices - 1}")
    if labels is not None:
        select_segments(labels, options.segments)


def refuse_output_onto_input(output, inputs) -> None:
    """Even with --overwrite, an output must never replace one of the run's own input files."""
    for source in inputs:
        same_name = os.path.abspath(output) == os.path.abspath(source)
        if same_name or (Path(output).exists() and Path(source).exists() and os.path.samefile(output, source)):
            raise FewShotSAMError(f"cannot write {output}: it is the input {source}; choose another output name")


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
                    overwrite: bool = False, progress: Progress = NO_PROGRESS, engine: Engine | None = None,
                    confidence: ConfidenceRecorder | None = None) -> Path:
    refuse_output_onto_input(out_path, [image_path, labels_path])
    check_output_path(out_path, overwrite)
    progress.update("load", 0, 1, "reading the image and labels")
    volume, labels = read_pair(image_path, labels_path)
    check_inputs(_options_of(engine, options), volume, labels)
    engine = engine or Engine(options)
    result = engine.propagate(volume, labels, progress, confidence)
    progress.update("write", 0, 1, f"writing {out_path}")
    return write_segmentation(out_path, result, overwrite)


def adapt_files(pairs: list[tuple[str, str]], out_path, options: EngineOptions | None = None,
                overwrite: bool = False, progress: Progress = NO_PROGRESS, engine: Engine | None = None) -> Path:
    out_path = Path(out_path)
    if out_path.suffix != ".fsam":
        raise FewShotSAMError(f"cannot write {out_path}: an adapted model file must end in .fsam")
    refuse_output_onto_input(out_path, [path for pair in pairs for path in pair])
    check_output_path(out_path, overwrite, suffixes=(".fsam",))  # folder exists and is writable: checked first
    progress.update("load", 0, 1, "reading the images and labels")
    scans = [read_pair(image, labels) for image, labels in pairs]
    for volume, labels in scans:
        check_inputs(_options_of(engine, options), volume, labels)
    engine = engine or Engine(options)
    adapter = engine.adapt(scans, progress)
    progress.update("write", 0, 1, f"writing {out_path}")
    return adapter.save(out_path, overwrite)


def _options_of(engine: Engine | None, options: EngineOptions | None) -> EngineOptions:
    return engine.options if engine is not None else options or EngineOptions()


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
    """Segment each image with a saved model. Everything that can be checked without the model (the model file,
    every image, the options, every output name) is checked before anything is written or the model loads."""
    out_dir = Path(out_dir)
    adapter = FewShotAdapter.load(model_path)
    outputs = [out_dir / output_name(image, suffix) for image in image_paths]
    _check_distinct_outputs(image_paths, outputs)
    for output in outputs:
        refuse_output_onto_input(output, [model_path, *image_paths])
    progress.update("load", 0, 1, "checking the images")
    for image in image_paths:
        # Read once to check, then again when its turn comes: holding them all would need every scan in memory.
        check_inputs(_options_of(engine, options), read_volume(image))
    _make_output_folder(out_dir)
    for output in outputs:
        check_output_path(output, overwrite)
    engine = engine or Engine(options)
    adapter.check_model(engine.model, model_path)
    written = []
    for image, output in zip(image_paths, outputs):
        try:
            volume = read_volume(image)
            result = engine.apply(adapter, volume, progress, scan_name=f"image {image}")
            written.append(write_segmentation(output, result, overwrite))
        except FewShotSAMError as error:
            if not written:
                raise
            done = ", ".join(str(path) for path in written)
            if isinstance(error, Cancelled):
                raise Cancelled(f"cancelled by the user after writing {done}") from None
            raise FewShotSAMError(f"{error} (already written: {done})") from None
    return written


def _check_distinct_outputs(image_paths, outputs) -> None:
    seen = {}
    for image, output in zip(image_paths, outputs):
        if output in seen:
            raise FewShotSAMError(f"images {seen[output]} and {image} would both be written to {output}; "
                                  f"rename one of them")
        seen[output] = image


def _make_output_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FewShotSAMError(f"--out-dir {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FewShotSAMError(f"cannot create the output folder {out_dir}: {error.strerror}") from None
