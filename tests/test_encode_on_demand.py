"""Encoding on demand (Engine.encode_reach): propagate encodes the painted slices, then only the slices the
structures can reach, and its result equals, voxel for voxel, a run that encodes every slice first. Real
LiteMedSAM weights (ONNX Runtime), a real CHAOS scan whose kidneys span part of it."""

from __future__ import annotations

import numpy as np
import pytest

from FewShotSAMLib.adapter import AdaptOptions
from FewShotSAMLib.embedding_cache import EmbeddingCache
from FewShotSAMLib.errors import Cancelled
from FewShotSAMLib.pipeline import REACH_BLOCK, Engine, EngineOptions, next_unencoded
from FewShotSAMLib.progress import RUN_STAGES, Progress
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import LabelVolume, Segment
from FewShotSAMLib.volume_io import read_labels, read_volume

KIDNEYS = [Segment("right kidney", 2, (0.73, 0.4, 0.33)), Segment("left kidney", 3, (0.96, 0.78, 0.35))]
CASE = 1  # 37 slices; the kidneys lie on slices 12-29
# The claim holds for any tuning: a few steps keep each run short on two cores.
QUICK_ADAPT = AdaptOptions(decoder_steps=4, prompt_steps=50)


class Events:
    """A Progress that keeps every event (and can cancel once a stage is reached)."""

    def __init__(self, cancel_at: str | None = None):
        self.events, self.cancel_at = [], cancel_at
        self.progress = Progress(self.events.append, cancel=self.cancelled, stages=RUN_STAGES)

    def cancelled(self) -> bool:
        return self.cancel_at is not None and any(event.stage == self.cancel_at for event in self.events)

    def stages(self) -> set[str]:
        return {event.stage for event in self.events}


@pytest.fixture(scope="module")
def kidneys(chaos_scan):
    """The scan, its reference and the kidneys painted on 3 slices each (6 slices, 14-27)."""
    image_path, label_path = chaos_scan(CASE)
    volume = read_volume(image_path)
    reference = read_labels(label_path, volume).array
    painted = few_shot_labels(reference, 0, 3, [2, 3])
    return volume, reference, painted


@pytest.fixture(scope="module")
def on_demand_run(tmp_path_factory, engine_cache_dir, kidneys):
    """An engine with an embedding cache of its own (so that the runs compared share one encoder's embeddings, and
    what was encoded can be counted; the built encoders are shared with the session's cache), and its first run:
    on demand, on an empty cache."""
    cache_dir = tmp_path_factory.mktemp("on-demand-cache")
    shared_encoders = EmbeddingCache(engine_cache_dir).encoders_dir
    shared_encoders.mkdir(parents=True, exist_ok=True)
    EmbeddingCache(cache_dir).encoders_dir.symlink_to(shared_encoders, target_is_directory=True)
    engine = Engine(EngineOptions(cache_dir=str(cache_dir), device="cpu", warm_start=False, encoder="onnx",
                                  adapt=QUICK_ADAPT))
    volume, _, painted = kidneys
    events = Events()
    result = engine.propagate(volume, LabelVolume(painted, volume.geometry, KIDNEYS), events.progress).array
    (entry,) = engine.cache.entries()
    return engine, result, entry.n_done, events


def test_on_demand_equals_encoding_every_slice_and_encodes_fewer(on_demand_run, kidneys):
    engine, on_demand, encoded, events = on_demand_run
    volume, reference, painted = kidneys
    n_slices = volume.array.shape[0]
    kidney_slices = np.flatnonzero(np.isin(reference, [2, 3]).any(axis=(1, 2)))
    # Measured: 22 of 37 slices (the kidneys' 18 and the overshoot of the last blocks); with one painted slice a
    # kidney, 31 (the pixel prompts then find a kidney on slices 1-11 too).
    assert len(kidney_slices) <= encoded < n_slices
    assert "reach" in events.stages()
    fractions = [event.fraction for event in events.events]
    assert fractions == sorted(fractions), "overall progress must never go backwards"

    engine.options.encode_all_slices = True
    try:
        every_slice = engine.propagate(volume, LabelVolume(painted, volume.geometry, KIDNEYS)).array
    finally:
        engine.options.encode_all_slices = False
    (entry,) = engine.cache.entries()
    assert entry.n_done == n_slices
    assert np.array_equal(on_demand, every_slice)
    assert on_demand[kidney_slices].any(), "the comparison must be of a real segmentation"


def test_a_warm_rerun_after_painting_outside_the_extent_still_equals_encoding_every_slice(on_demand_run, kidneys):
    """The new slice lies beyond every painted one, so the warm start predicts again from the last painted slice to
    the scan's end, and encodes what the structures reach there."""
    engine, _, _, _ = on_demand_run
    volume, reference, painted = kidneys
    labelled = np.flatnonzero(painted.any(axis=(1, 2)))
    left_kidney = np.flatnonzero((reference == 3).any(axis=(1, 2)))
    new_slice = int(left_kidney[-1])
    assert new_slice > labelled.max()
    more = painted.copy()
    more[new_slice] = np.where(np.isin(reference[new_slice], [2, 3]), reference[new_slice], 0)
    first, then = (LabelVolume(labels, volume.geometry, KIDNEYS) for labels in (painted, more))

    def warm_run(encode_all_slices: bool):
        engine.options.encode_all_slices, engine.options.warm_start = encode_all_slices, True
        try:
            engine.propagate(volume, first)  # the run before the new slice (or the same painting: its record)
            events = Events()
            result = engine.propagate(volume, then, events.progress).array
        finally:
            engine.options.encode_all_slices, engine.options.warm_start = False, False
        assert any("starting from the previous run" in event.message for event in events.events)
        return result

    on_demand = warm_run(False)
    assert np.array_equal(on_demand, warm_run(True))
    assert on_demand[labelled.max() + 1:new_slice].any(), "the warm start's region must have been predicted"


def test_cancel_stops_between_the_pieces_of_encoding(on_demand_run, kidneys):
    engine, _, _, _ = on_demand_run
    volume, _, painted = kidneys
    events = Events(cancel_at="reach")
    engine.options.adapt = AdaptOptions(decoder_steps=0, prompt_steps=10)  # only the encoding is tested here
    try:
        with pytest.raises(Cancelled):
            engine.propagate(volume, LabelVolume(painted, volume.geometry, KIDNEYS), events.progress)
    finally:
        engine.options.adapt = QUICK_ADAPT
    assert "reach" in events.stages() and "propagate" not in events.stages()


def test_blocks_stop_at_the_window_and_at_encoded_slices():
    assert next_unencoded(10, 1, (0, 30), set()) == list(range(10, 10 + REACH_BLOCK))
    assert next_unencoded(10, -1, (0, 30), {8}) == [10, 9]
    assert next_unencoded(29, 1, (0, 30), set()) == [29, 30]
    assert next_unencoded(5, -1, (4, 30), set()) == [5, 4]
