"""Warm start of a re-run after the user paints one more slice (or repaints one): the interactive loop.

Each propagate leaves a run record on disk, in the embedding cache's runs folder (so that a new worker process,
as the Slicer module starts for each run, finds it): the tuned adapter (pixel classifier, structure tokens, tuned
decoder) and the predicted class map before the 3D clean-up. Its name is a key over everything a run depends on
except the painting: the scan's voxels and geometry, the slice axis, the model, every option and the structures
propagated. Inside, the record holds a checksum of each labelled slice's labels and of its embeddings.

The next run with the same key compares its painting with the record's:
- the same painting: the recorded adapter and class map are the result (only the clean-up runs again);
- slices added or repainted, every other labelled slice unchanged: tune on from the recorded adapter for a few
  steps, the decoder on the changed slices only, and predict again only the slices between the unchanged labelled
  slices on either side of each changed one. Outside those gaps the recorded classes stay: a painted slice is a wall
  for the connected components of propagation.structure_cells (they cross it only through painted cells, which are
  kept anyway), so the new painting can only change what lies between it and its painted neighbours;
- anything else (a slice erased, other embeddings, a record that does not read): a full run, as without a record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .adapter import FewShotAdapter, tune_on
from .atomic_write import write_atomically
from .fewshot import FewShotCollection
from .models import SamModel
from .progress import NO_PROGRESS, Progress
from .prompts import structure_footprints, structure_tokens

FORMAT_VERSION = 2  # 2: the record keeps the confidence state
KEEP_RECORDS = 16  # most recent records kept (a CHAOS record is ~20 MB, mostly the tuned decoder)
# Warm tuning. The pixel classifier goes on from its recorded weights over every labelled cell; the decoder tunes
# on the changed slices' structures from the recorded decoder. 2 decoder steps, not 4: on 12 CHAOS scans x 2 and 3
# painted slices + one more, each case's Dice moved by -0.0007 to +0.0012 and the re-run took 0.60 s less (median,
# Zen 3; benchmarks/speed/warm_steps.py). Halving the classifier's 50 steps cost one case 0.0036 Dice (a scratch
# check): not done.
WARM_PROMPT_STEPS = 50
WARM_DECODER_STEPS = 2


@dataclass
class RunRecord:
    key: str
    painted: dict[int, str]  # labelled slice -> checksum of its labels
    embedded: dict[int, str]  # labelled slice -> checksum of its embeddings
    adapter: FewShotAdapter | None  # None until the run has adapted
    classes: np.ndarray | None  # [n, rows, cols] uint8 class map along the slice axis, before the clean-up
    # [2, n, structures]: the run's ConfidenceRecorder.state(), so a warm start can report on every slice
    confidence: np.ndarray | None = None


@dataclass
class WarmStart:
    record: RunRecord
    changed: list[int]  # labelled slices added or repainted since the record (empty: the same painting)
    regions: list[tuple[int, int]]  # slice ranges (inclusive) to predict again


def run_key(volume, axis: int, options, model_id: str, label_values: list[int]) -> str:
    """sha256 over what a run's result depends on, except the painting (options: the EngineOptions)."""
    settings = dataclasses.asdict(options)
    # Declared slices are part of the painting; where the cache lies, whether to warm start, apply's second pass and
    # registration (adapt and apply only), and whether to encode every slice first change no result of propagate;
    # the zoom and the small-structure blend work on the finished labels, after the classes a record keeps.
    for irrelevant in ("cache_dir", "labelled_slices", "checkpoint", "warm_start", "second_pass", "register",
                       "encode_all_slices", "zoom", "small_structures"):
        settings.pop(irrelevant, None)
    geometry = volume.geometry
    description = {
        "format": FORMAT_VERSION, "axis": axis, "model": model_id, "structures": list(label_values),
        "options": settings, "dtype": volume.array.dtype.str, "shape": list(volume.array.shape),
        "spacing": [float(x) for x in geometry.spacing], "origin": [float(x) for x in geometry.origin],
        "direction": [float(x) for x in np.asarray(geometry.direction).ravel()],
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(volume.array).data)
    return digest.hexdigest()


def slice_checksums(stack: np.ndarray, indices: list[int]) -> dict[int, str]:
    return {int(z): hashlib.sha256(np.ascontiguousarray(stack[z]).data).hexdigest() for z in indices}


def record_path(runs_dir: Path, key: str) -> Path:
    return Path(runs_dir) / f"{key}.pt"


def load_record(runs_dir: Path, key: str) -> RunRecord | None:
    """The run record for `key`, or None when there is none or it does not read (then a full run replaces it)."""
    path = record_path(runs_dir, key)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT_VERSION or payload.get("key") != key:
            return None
        return RunRecord(key, {int(z): str(c) for z, c in payload["painted"].items()},
                         {int(z): str(c) for z, c in payload["embedded"].items()},
                         FewShotAdapter.from_payload(payload["adapter"]), payload["classes"].numpy(),
                         payload["confidence"].numpy())
    except Exception:  # noqa: BLE001 - a damaged or foreign file only costs the warm start
        return None


def save_record(runs_dir: Path, record: RunRecord) -> None:
    """Write the record atomically, then drop the oldest records beyond KEEP_RECORDS. A full disk or a read-only
    cache only costs the next run its warm start."""
    path = record_path(runs_dir, record.key)
    payload = {
        "format": FORMAT_VERSION, "key": record.key,
        "painted": {str(z): c for z, c in record.painted.items()},
        "embedded": {str(z): c for z, c in record.embedded.items()},
        "adapter": record.adapter.payload(),
        "classes": torch.from_numpy(np.ascontiguousarray(record.classes)),
        "confidence": torch.from_numpy(np.ascontiguousarray(record.confidence)),
    }
    with contextlib.suppress(OSError, RuntimeError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: torch.save(payload, temporary))
        records = sorted(path.parent.glob("*.pt"), key=lambda file: file.stat().st_mtime, reverse=True)
        for old in records[KEEP_RECORDS:]:
            old.unlink(missing_ok=True)


def plan(record: RunRecord | None, painted: dict[int, str], embedded: dict[int, str],
         n_slices: int) -> WarmStart | None:
    """How this run can start from the record, or None for a full run (see the module doc)."""
    if record is None or not set(record.painted) <= set(painted):
        return None  # no record, or a labelled slice was erased
    if any(record.embedded.get(z) != checksum for z, checksum in embedded.items() if z in record.painted):
        return None  # the recorded run saw other embeddings (another encoder's arithmetic)
    changed = sorted(z for z, checksum in painted.items() if record.painted.get(z) != checksum)
    unchanged = sorted(set(painted) - set(changed))
    regions = []
    for z in changed:
        below = [u for u in unchanged if u < z]
        above = [u for u in unchanged if u > z]
        first, last = (below[-1] if below else 0), (above[0] if above else n_slices - 1)
        if regions and first <= regions[-1][1]:
            regions[-1] = (regions[-1][0], max(regions[-1][1], last))
        else:
            regions.append((first, last))
    return WarmStart(record, changed, regions)


def warm_adapt(model: SamModel, collection: FewShotCollection, warm: WarmStart, options,
               progress: Progress = NO_PROGRESS) -> FewShotAdapter:
    """The recorded adapter tuned on for a few steps with the changed slices (options: the AdaptOptions)."""
    previous = warm.record.adapter
    if not warm.changed:
        progress.update("prompts", 1, 1, "starting from the previous run: the same painting, the same result")
        return previous
    progress.update("prompts", 0, 1, f"starting from the previous run: {len(warm.changed)} slice(s) painted since")
    changed = set(warm.changed)
    focus = [index for index, (_, z) in enumerate(collection.sources) if z in changed]
    tokens = structure_tokens(collection)
    classifier, decoder_state = tune_on(model, previous, collection, tokens,
                                        min(options.prompt_steps, WARM_PROMPT_STEPS),
                                        min(options.decoder_steps, WARM_DECODER_STEPS), options.seed, progress, focus)
    return FewShotAdapter(list(collection.segments), classifier, tokens, decoder_state, model.weights_id, options,
                          collection.embeddings.shape[0],
                          footprints=structure_footprints(collection, frame=classifier.frame))
