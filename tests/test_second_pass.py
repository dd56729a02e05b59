"""Apply's second pass (FewShotSAMLib/second_pass.py): self-training on the query's own confident slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FewShotSAMLib.adapter import AdaptOptions, FewShotAdapter
from FewShotSAMLib.body_frame import IMAGE_FRAME
from FewShotSAMLib.errors import Cancelled
from FewShotSAMLib.metrics import dice_inside_reference_extent
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.registration import STAGE as REGISTER_STAGE
from FewShotSAMLib.second_pass import STAGE, SecondPassOptions, choose_pseudo_slices
from FewShotSAMLib.slice_selection import fractions_of_extent
from FewShotSAMLib.volume import LabelVolume, Segment
from FewShotSAMLib.volume_io import read_labels, read_volume

ORGANS = [Segment("liver", 1, (0.87, 0.51, 0.4)), Segment("right kidney", 2, (0.73, 0.4, 0.33)),
          Segment("left kidney", 3, (0.96, 0.78, 0.35)), Segment("spleen", 4, (0.62, 0.42, 0.64))]
# test_engine.py's pair (both scans encoded once per test session). Scan 15's liver and spleen are far darker than
# in the other CHAOS scans: the first pass finds half the liver, and self-training on it loses the liver entirely
# unless the second pass keeps a structure it moves (second_pass.keep_moved_structures).
SUPPORT, QUERY = 2, 15
# Measured on CHAOS 2 -> 15 (protocol 2's support slices), Dice in extent without / with the second pass: left
# kidney 0.907 / 0.927 (ONNX Runtime here, OpenVINO alike); liver 0.527 / 0.527, and 0.001 without the guard
# (OpenVINO, scratch run). The floors leave room for another encoder path's rounding.
KIDNEY_GAIN_FLOOR = 0.005
LIVER_LOSS_CEILING = 0.02
# Registered apply without the second pass, Dice in extent: measured liver 0.522, right kidney 0.871, left kidney
# 0.914 (ONNX Runtime; the image frame gives 0.527 and 0.907 for liver and left kidney); floors 0.05 below. No
# floor for the spleen: scan 15's is lost from every support scan, registered or not (0.001).
REGISTERED_FLOOR = {1: 0.47, 2: 0.82, 3: 0.86}


def test_pseudo_slices_are_the_most_confident_of_each_part_of_the_core():
    classes = np.zeros((9, 4, 4), dtype=np.uint8)
    classes[1:8, :2] = 1  # structure 0 on slices 1-7; slice 1 is a small end, outside its core
    classes[1] = 0
    classes[1, 0, 0] = 1
    classes[4:6, 3] = 2  # structure 1 on slices 4-5, never confident enough
    confidence = np.zeros((9, 2))
    confidence[1:8, 0] = [0.99, 0.85, 0.9, 0.7, 0.95, 0.75, 0.9]
    confidence[4:6, 1] = [0.5, 0.6]
    chosen = choose_pseudo_slices(classes, confidence, SecondPassOptions(slices_per_structure=3))
    # Core: slices 2-7 in three parts (2-3, 4-5, 6-7); slice 1 (the most confident) is an end, not core.
    # Structure 1 is trusted nowhere: ignored on the chosen slices, not taught as background.
    assert chosen == {3: {0}, 5: {0}, 7: {0}}


def test_a_structure_unsure_everywhere_gets_no_pseudo_slice():
    classes = np.ones((5, 4, 4), dtype=np.uint8)
    chosen = choose_pseudo_slices(classes, np.full((5, 1), 0.3), SecondPassOptions())
    assert chosen == {}


def support_labels(reference: np.ndarray) -> np.ndarray:
    """Protocol 2's support: per organ, its slices at 1/6, 1/2, 5/6 of its extent, fully labelled."""
    chosen = set()
    for organ in ORGANS:
        chosen.update(fractions_of_extent(reference == organ.label_value, 0, (1 / 6, 1 / 2, 5 / 6)))
    painted = np.zeros_like(reference)
    painted[sorted(chosen)] = reference[sorted(chosen)]
    return painted


@pytest.fixture(scope="module")
def support_and_query(chaos_scan, engine_cache_dir):
    """An adapter from the support scan, the query scan with its reference, and an engine."""
    # In the image frame, as measured above: in the body frame the first pass already finds this pair's left
    # kidney (0.926, tests/test_body_frame.py), which leaves the second pass nothing to show on it.
    # register=True at adapt only: the adapter keeps a support copy (for the registered apply below); every apply
    # here runs without registering unless a test asks for it.
    engine = Engine(EngineOptions(cache_dir=str(engine_cache_dir), device="cpu", warm_start=False, encoder="onnx",
                                  adapt=AdaptOptions(position_frame=IMAGE_FRAME), register=True))
    image, labels = chaos_scan(SUPPORT)
    volume = read_volume(image)
    reference = read_labels(labels, volume).array
    adapter = engine.adapt([(volume, LabelVolume(support_labels(reference), volume.geometry, ORGANS))])
    engine.options.register = False
    query_image, query_labels = chaos_scan(QUERY)
    query = read_volume(query_image)
    return engine, adapter, query, read_labels(query_labels, query).array


def extent_dice(result: np.ndarray, reference: np.ndarray) -> dict[int, float]:
    return {organ.label_value: dice_inside_reference_extent(result == organ.label_value,
                                                            reference == organ.label_value, 0) for organ in ORGANS}


def test_second_pass_improves_a_kidney_and_keeps_the_liver_it_would_lose(support_and_query):
    engine, adapter, query, reference = support_and_query
    engine.options.second_pass = SecondPassOptions(enabled=False)
    try:
        first = engine.apply(adapter, query).array
    finally:
        engine.options.second_pass = SecondPassOptions()
    events = []
    second = engine.apply(adapter, query, Progress(events.append)).array
    before, after = (extent_dice(result, reference) for result in (first, second))
    assert after[3] >= before[3] + KIDNEY_GAIN_FLOOR, f"left kidney {before[3]:.3f} -> {after[3]:.3f}"
    assert after[1] >= before[1] - LIVER_LOSS_CEILING, f"liver {before[1]:.3f} -> {after[1]:.3f}"
    stages = [event.stage for event in events]
    assert STAGE in stages and stages.index(STAGE) > stages.index("propagate")
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions), "overall progress must never go backwards"


def test_second_pass_can_be_cancelled(support_and_query):
    engine, adapter, query, _ = support_and_query
    seen = []

    def cancel():
        return STAGE in seen

    with pytest.raises(Cancelled):
        engine.apply(adapter, query, Progress(lambda event: seen.append(event.stage), cancel))
    assert STAGE in seen


def test_apply_command_line_turns_the_second_pass_off():
    from FewShotSAMLib.cli import build_parser, engine_options

    parser = build_parser()
    default = parser.parse_args(["apply", "model.fsam", "scan.nrrd", "--out-dir", "out"])
    off = parser.parse_args(["apply", "model.fsam", "scan.nrrd", "--out-dir", "out", "--no-second-pass"])
    assert engine_options(default).second_pass.enabled
    assert not engine_options(off).second_pass.enabled
    propagate = parser.parse_args(["propagate", "scan.nrrd", "--labels", "l.nrrd", "--out", "o.nrrd"])
    assert engine_options(propagate).second_pass.enabled  # unused by propagate, which has no second pass


def test_a_registered_apply_says_so_and_keeps_the_organs(support_and_query, tmp_path):
    """Registering the support scan (registration.py) on this pair: apply reports the registration and keeps the
    organs the image frame finds (an option, not the default: benchmarks/results/protocol2_registered.md); the
    support copy survives a save, and a file saved before it existed loads without one."""
    engine, adapter, query, reference = support_and_query
    assert adapter.support_image is not None, "adapt with register=True keeps a copy of the support scan"
    saved = FewShotAdapter.load(adapter.save(tmp_path / "now.fsam"))
    assert np.array_equal(saved.support_image.image, adapter.support_image.image)
    payload = adapter.payload()
    del payload["support_image"]  # what FewShotSAM wrote before registration
    torch.save(payload, tmp_path / "before.fsam")
    assert FewShotAdapter.load(tmp_path / "before.fsam").support_image is None
    engine.options.register, engine.options.second_pass = True, SecondPassOptions(enabled=False)
    try:
        events = []
        result = engine.apply(adapter, query, Progress(events.append)).array
    finally:
        engine.options.register, engine.options.second_pass = False, SecondPassOptions()
    said = [event.message for event in events if event.stage == REGISTER_STAGE]
    assert said and said[-1].startswith("registered the support scan"), said
    scores = extent_dice(result, reference)
    for value, floor in REGISTERED_FLOOR.items():
        assert scores[value] >= floor, (value, scores)
