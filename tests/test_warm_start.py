"""Warm start of a re-run (warm_start.py): when the recorded run is reused, and that it falls back to a full run on
any other change. The engine tests run the real model on a real CHAOS scan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from FewShotSAMLib.metrics import dice
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.slice_selection import few_shot_labels, one_more_slice
from FewShotSAMLib.volume import Geometry, LabelVolume, Segment, Volume
from FewShotSAMLib.volume_io import read_labels, read_volume
from FewShotSAMLib.warm_start import RunRecord, load_record, plan, record_path, run_key

ORGANS = [Segment("liver", 1), Segment("right kidney", 2), Segment("left kidney", 3), Segment("spleen", 4)]
WARM_MESSAGE = "starting from the previous run"


def record_of(painted: dict[int, str], embedded: dict[int, str] | None = None) -> RunRecord:
    return RunRecord("key", painted, embedded if embedded is not None else dict(painted), None, None)


def test_the_same_painting_reuses_everything():
    warm = plan(record_of({3: "a", 9: "b"}), {3: "a", 9: "b"}, {3: "a", 9: "b"}, 20)
    assert warm.changed == [] and warm.regions == []


def test_an_added_slice_is_predicted_again_between_its_painted_neighbours():
    warm = plan(record_of({3: "a", 9: "b"}), {3: "a", 6: "c", 9: "b"}, {3: "a", 6: "c", 9: "b"}, 20)
    assert warm.changed == [6] and warm.regions == [(3, 9)]


def test_an_added_slice_beyond_the_painting_reaches_the_end_of_the_scan():
    warm = plan(record_of({3: "a", 9: "b"}), {3: "a", 9: "b", 14: "c"}, {3: "a", 9: "b", 14: "c"}, 20)
    assert warm.changed == [14] and warm.regions == [(9, 19)]


def test_a_repainted_slice_is_changed_and_its_gaps_on_both_sides_predicted_again():
    warm = plan(record_of({3: "a", 9: "b", 15: "c"}), {3: "a", 9: "B", 15: "c"}, {3: "a", 9: "b", 15: "c"}, 20)
    assert warm.changed == [9] and warm.regions == [(3, 15)]


def test_an_erased_slice_needs_a_full_run():
    assert plan(record_of({3: "a", 9: "b"}), {3: "a"}, {3: "a"}, 20) is None


def test_other_embeddings_or_no_record_need_a_full_run():
    assert plan(record_of({3: "a"}, {3: "x"}), {3: "a", 5: "b"}, {3: "y", 5: "z"}, 20) is None
    assert plan(None, {3: "a"}, {3: "a"}, 20) is None


def test_the_run_key_follows_voxels_geometry_options_and_structures_but_not_the_cache_folder(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume = Volume(array, Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), shape=array.shape))
    options = EngineOptions(cache_dir=str(tmp_path))
    key = run_key(volume, 0, options, "model", [1, 2])
    assert run_key(volume, 0, dataclasses.replace(options, cache_dir="elsewhere", warm_start=False), "model",
                   [1, 2]) == key
    finishing = EngineOptions(cache_dir=str(tmp_path))  # steps after the recorded classes
    finishing.zoom.enabled = finishing.small_structures.enabled = False
    assert run_key(volume, 0, finishing, "model", [1, 2]) == key
    changed_option = EngineOptions(cache_dir=str(tmp_path))
    changed_option.propagation.decoder_weight = 0.4
    edited = array.copy()
    edited[2, 2, 2] += 1
    moved = Volume(array, dataclasses.replace(volume.geometry, origin=(1.0, 0.0, 0.0)))
    others = [run_key(volume, 0, changed_option, "model", [1, 2]), run_key(volume, 1, options, "model", [1, 2]),
              run_key(Volume(edited, volume.geometry), 0, options, "model", [1, 2]),
              run_key(moved, 0, options, "model", [1, 2]), run_key(volume, 0, options, "other model", [1, 2]),
              run_key(volume, 0, options, "model", [1])]
    assert len({key, *others}) == 1 + len(others)


def test_a_damaged_record_is_ignored(tmp_path):
    (tmp_path / "abc.pt").write_bytes(b"not a record")
    assert load_record(tmp_path, "abc") is None
    assert load_record(tmp_path, "missing") is None


# ----------------------------------------------------------------------------------------------------------------
# The engine on a real scan


@pytest.fixture(scope="module")
def case2(chaos_scan):
    image_path, label_path = chaos_scan(2)
    volume = read_volume(image_path)
    return volume, read_labels(label_path, volume).array


def run(engine: Engine, volume, painted: np.ndarray) -> tuple[np.ndarray, list[str]]:
    messages = []
    result = engine.propagate(volume, LabelVolume(painted, volume.geometry, ORGANS),
                              Progress(lambda event: messages.append(event.message)))
    return result.array, messages


def warm_started(messages: list[str]) -> bool:
    return any(WARM_MESSAGE in message for message in messages)


def test_warm_starts_follow_the_painting_and_fall_back_to_full_runs(engine_cache_dir, case2):
    volume, reference = case2
    engine = Engine(EngineOptions(cache_dir=str(engine_cache_dir), device="cpu"))  # embeddings shared with others
    key = run_key(volume, 0, engine.options, engine.model.weights_id, [1, 2, 3, 4])
    record_path(engine.cache.runs_dir, key).unlink(missing_ok=True)  # another test's run on this scan
    painted = few_shot_labels(reference, 0, 1, [1, 2, 3, 4])
    _, messages = run(engine, volume, painted)
    assert not warm_started(messages)
    recorded = load_record(engine.cache.runs_dir, key)

    # One more painted slice: tuned on, predicted again only between its painted neighbours.
    more, added = one_more_slice(painted, reference, 0)
    warm, messages = run(engine, volume, more)
    assert warm_started(messages)
    assert np.array_equal(warm[added], reference[added])
    labelled = sorted(recorded.painted)
    below = max(z for z in labelled if z < added)
    above = min(z for z in labelled if z > added)
    after = load_record(engine.cache.runs_dir, key)
    outside = [z for z in range(volume.array.shape[0]) if not below <= z <= above]
    assert np.array_equal(after.classes[outside], recorded.classes[outside])
    assert not np.array_equal(after.classes[below:above + 1], recorded.classes[below:above + 1])
    cold_engine = Engine(dataclasses.replace(engine.options, warm_start=False), model=engine.model)
    scratch, messages = run(cold_engine, volume, more)
    assert not warm_started(messages)
    for value in (1, 2, 3, 4):
        warm_dice, scratch_dice = dice(warm == value, reference == value), dice(scratch == value, reference == value)
        assert abs(warm_dice - scratch_dice) < 0.03, f"structure {value}: warm {warm_dice:.3f}, {scratch_dice:.3f}"

    # The same painting again: the recorded result.
    again, messages = run(engine, volume, more)
    assert warm_started(messages) and np.array_equal(again, scratch)

    # A repainted slice (half of its painting wiped) warm starts; an erased slice does not.
    edited = more.copy()
    edited[added, : edited.shape[1] // 2] = 0
    assert edited[added].any() and not np.array_equal(edited[added], more[added])
    _, messages = run(engine, volume, edited)
    assert warm_started(messages)
    erased = edited.copy()
    erased[labelled[0]] = 0
    _, messages = run(engine, volume, erased)
    assert not warm_started(messages)

    # Another option: a full run.
    engine.options.propagation.decoder_weight = 0.4
    _, messages = run(engine, volume, erased)
    assert not warm_started(messages)

