"""A second pass on a scan with no labels of its own: self-training on the query's most confident slices.

An adapter made on another patient's scan finds the structures of a new scan only roughly: intensities, shapes
and positions differ between patients. After the first prediction, the slices on which the decoder and the pixel
prompts agree best (confidence.py) are very likely right. They become pseudo-labelled slices of the query itself:
the adapter is tuned on from its own weights on them (as a warm start does after the user paints a slice,
warm_start.py) and the query is predicted again with what it learned about this patient.

The .fsam file holds no support slices, so the tuning starts from the adapter's weights instead of mixing the
support slices back in; the pseudo labels come from that adapter, so they pull it towards the query, not away from
what it knew. A pseudo-labelled slice is chosen for one structure; the other structures on it keep their predicted
pixels only where they are confident there too, and are ignored (neither structure nor background) where not.

Confident is not always right: on a scan whose liver is far darker than the support's (CHAOS 15), the first pass
finds half of it, and tuning on that half teaches the rest to be background until the liver is gone. A structure
whose second result barely overlaps its first therefore keeps the first (keep_moved_structures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .adapter import FewShotAdapter, tune_on
from .confidence import ConfidenceRecorder, slice_confidences
from .encoding import EncodedVolume
from .fewshot import IGNORE, FewShotCollection, class_maps_to_model_space
from .models import SamModel
from .progress import Progress
from .prompts import structure_footprints, structure_tokens

STAGE = "second pass"


@dataclass
class SecondPassOptions:
    enabled: bool = True
    slices_per_structure: int = 3  # pseudo-labelled slices per structure, one from each part of its core
    # A structure's slice qualifies when both predictors agree on at least this share of its area there; a
    # structure with no such slice gets no pseudo label (its pixels are ignored in the tuning).
    min_confidence: float = 0.8
    # Candidates lie in the structure's core: cross-sections of at least this share of its largest one (its ends
    # are small, and a few wrong pixels there are a large share).
    core_area: float = 0.5
    prompt_steps: int = 50  # pixel-classifier steps from the adapter's weights (0: keep its classifier)
    decoder_steps: int = 8  # decoder steps from the adapter's tuned decoder
    # Choose each structure's component by where the query's pseudo labels lie (True) or where the support scans
    # were painted (False, the adapter's footprints).
    query_footprints: bool = True
    # A structure whose second-pass result overlaps its first-pass result less than this (Dice) keeps the first:
    # the second pass refines a structure; when it moves it elsewhere, its pseudo labels taught it something wrong.
    min_agreement: float = 0.5


def choose_pseudo_slices(classes: np.ndarray, confidence: np.ndarray,
                         options: SecondPassOptions) -> dict[int, set[int]]:
    """{slice: structures trusted on it} from class indices [n, rows, cols] (along the slice axis) and
    [n, structures] confidences: for each structure, the most confident slice of each of
    options.slices_per_structure equal parts of its core, if it reaches options.min_confidence."""
    n_structures = confidence.shape[1]
    areas = np.stack([(classes == s + 1).sum(axis=(1, 2)) for s in range(n_structures)], axis=1)
    chosen: dict[int, set[int]] = {}
    for s in range(n_structures):
        if areas[:, s].max() == 0:
            continue
        core = np.flatnonzero(areas[:, s] >= options.core_area * areas[:, s].max())
        for part in np.array_split(core, max(1, options.slices_per_structure)):
            if part.size == 0:
                continue
            best = part[np.argmax(confidence[part, s])]
            if confidence[best, s] >= options.min_confidence:
                chosen.setdefault(int(best), set()).add(s)
    for z, trusted in chosen.items():  # the other structures on a chosen slice count where they are confident too
        trusted.update(s for s in range(n_structures) if areas[z, s] and confidence[z, s] >= options.min_confidence)
    return chosen


def pseudo_collection(adapter: FewShotAdapter, encoded: EncodedVolume, classes: np.ndarray,
                      chosen: dict[int, set[int]]) -> FewShotCollection:
    """The chosen slices of the query as a few-shot collection; untrusted structures' pixels are IGNORE."""
    slices = sorted(chosen)
    targets = class_maps_to_model_space(classes[slices], adapter.n_classes, encoded.resize)
    for index, z in enumerate(slices):
        for s in range(adapter.n_classes - 1):
            if s not in chosen[z]:
                targets[index][targets[index] == s + 1] = IGNORE
    collection = FewShotCollection(segments=list(adapter.segments))
    embeddings = encoded.float32_embeddings(slices)
    collection.add(embeddings, targets, [(0, z) for z in slices], encoded.body_boxes(slices),
                   encoded.positions_for(adapter.position_frame, slices))
    return collection


def self_train(model: SamModel, adapter: FewShotAdapter, encoded: EncodedVolume, classes: np.ndarray,
               recorder: ConfidenceRecorder, options: SecondPassOptions, seed: int,
               progress: Progress) -> FewShotAdapter | None:
    """The adapter tuned on from its weights on the query's confident slices, or None when no slice qualifies.

    classes: the first pass's class indices [n, rows, cols] along encoded.axis (after its clean-up)."""
    chosen = choose_pseudo_slices(classes, slice_confidences(recorder.disagreement, recorder.union), options)
    if not chosen:
        return None
    progress.update(STAGE, 0, 1, f"second pass: tuning on {len(chosen)} confident slices of this scan")
    collection = pseudo_collection(adapter, encoded, classes, chosen)
    # A structure trusted on no pseudo-labelled slice keeps what the support scans taught about it.
    present = torch.tensor([bool((collection.targets == s + 1).any()) for s in range(adapter.n_classes - 1)])
    tokens = torch.where(present[:, None], structure_tokens(collection), adapter.tokens)
    classifier, decoder_state = tune_on(model, adapter, collection, tokens, options.prompt_steps,
                                        options.decoder_steps, seed, progress)
    footprints = adapter.footprints
    if options.query_footprints or footprints is None:
        footprints = structure_footprints(collection, frame=adapter.position_frame)
        if adapter.footprints is not None:
            footprints = torch.where(present[:, None, None], footprints, adapter.footprints)
    return FewShotAdapter(list(adapter.segments), classifier, tokens, decoder_state, adapter.model_id,
                          adapter.options, collection.embeddings.shape[0], list(adapter.support_modalities),
                          footprints, adapter.support_image)


def keep_moved_structures(first: np.ndarray, second: np.ndarray, label_values: list[int],
                          min_agreement: float) -> np.ndarray:
    """The second result, except that each structure whose Dice with its first result is below min_agreement is
    taken from the first result (where the second left those voxels to no other structure)."""
    result = second.copy()
    for value in label_values:
        before, after = first == value, second == value
        total = int(before.sum()) + int(after.sum())
        agreement = 2 * int((before & after).sum()) / total if total else 1.0
        if agreement < min_agreement:
            result[after] = 0
            result[before & (result == 0)] = value
    return result
