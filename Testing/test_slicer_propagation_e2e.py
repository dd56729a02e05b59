"""End to end: a real MRML scene (slicer-core), the real worker process, the real LiteMedSAM weights.

A CHAOS T2 MRI (case 2) with its manual labels. A segmentation gets 4 named, coloured segments, each painted on 3
slices with its own reference label (liver and spleen on the same 3 slices, the two kidneys on 3 others), plus an
unpainted segment. "Adapt & Propagate" runs through FewShotSAMSlicerLogic exactly as the module and the Segment
Editor effect run it: ``<python> -m FewShotSAMLib propagate ... --progress json`` in its own process group, with the
Python and the process factory injected (the venv's Python here, PythonSlicer in Slicer).

Propagation is expensive on a 2-core machine (~2-3 min a run, with or without cached embeddings), so the main run
happens once per module (fixture ``propagated``), later runs propagate one group of segments only, and every run
shares one embedding-cache folder (which the second-run test checks is reused, not refilled).
Without the data or a working engine CLI the tests skip with the reason; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer_extension_support as support

slicer = support.import_slicer()

from FewShotSAMSlicerLib import logic as fsLogic  # noqa: E402
from FewShotSAMSlicerLib import mrml_conversion as mc  # noqa: E402
from FewShotSAMSlicerLib import painted_slices as ps  # noqa: E402
from FewShotSAMSlicerLib import worker as wk  # noqa: E402
from FewShotSAMSlicerLib.errors import FewShotSAMSlicerError  # noqa: E402

# Dice against the manual reference after propagating 3 painted slices per organ (LiteMedSAM, CPU, seed 0): the
# values measured on this case (see the comments) minus a margin for platform and library differences.
DICE_FLOOR = {
    "liver": 0.79,  # measured 0.844
    "right kidney": 0.88,  # measured 0.936
    "left kidney": 0.87,  # measured 0.920
    "spleen": 0.89,  # measured 0.942
}
SAME_RESULT_DICE = 0.98  # oblique / flipped: same voxels and painting as the main run, so (nearly) the same result
# Case 3, no painting there. Measured liver/spleen 0.716/0.885 when this test runs alone and 0.824/0.789 inside the
# full suite (0.894/0.858 before the windowed decoder, 16 tuning steps and the ONNX Runtime encoder; the protocol-2
# mean over 12 scans did not move: 0.783 vs 0.782). On a 2-core Xeon with AMX, where `auto` picks the compiled bf16
# encoder: 0.801/0.678 alone and spleen 0.542 inside the full suite (the same with and without the standby process;
# with OpenVINO fp32 on that machine the 0.70 floor held). Cross-scan transfer is the engine's known weak point
# (README), so the floors catch a failed transfer (Dice near 0), not small moves.
APPLY_DICE_FLOOR = {"liver": 0.65, "spleen": 0.50}
RUN_TIMEOUT_S = 1800
VALUE = {organ: value for value, organ, _ in support.ORGANS}


def cache_entries(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


@pytest.fixture(scope="module")
def engine():
    problem = support.engine_cli_problem(sys.executable)
    if problem:
        support.skip_or_fail(problem)


@pytest.fixture(scope="module")
def cache_dir(cache_with_shared_encoders):
    return cache_with_shared_encoders("fewshotsam-cache")


@pytest.fixture(scope="module")
def standbys():
    """Engine processes started ahead of each job, as in Slicer (the module's default), closed with the module."""
    factory = wk.StandbyProcessFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def make_logic(cache_dir, tmp_path_factory, standbys):
    temporary = tmp_path_factory.mktemp("fewshotsam-temp")
    # A standby serves only jobs with its environment; pytest changes PYTEST_CURRENT_TEST for every test, which
    # Slicer never does, so the workers get this one copy.
    environment = dict(os.environ)

    def make(cache=None):
        return fsLogic.FewShotSAMSlicerLogic(pythonExecutable=sys.executable, processFactory=standbys,
                                             cacheDirectory=str(cache or cache_dir), temporaryDirectory=str(temporary),
                                             environment=environment)
    make.temporary = temporary
    return make


@pytest.fixture(scope="module")
def chaos():
    folder = support.chaos_dir()
    scene = support.new_scene()
    volume = support.load_volume(scene, folder / f"image_{support.CHAOS_CASE}.nii.gz", "CHAOS T2 case 2")
    label = support.load_volume(scene, folder / f"label_{support.CHAOS_CASE}.nii.gz", "reference", labelmap=True)
    reference = mc.volumeArray(label).astype(np.uint8)
    liver_spleen = support.shared_slices(reference, (VALUE["liver"], VALUE["spleen"]))
    kidneys = support.shared_slices(reference, (VALUE["right kidney"], VALUE["left kidney"]))
    slices_for = {"liver": liver_spleen, "spleen": liver_spleen, "right kidney": kidneys, "left kidney": kidneys}
    return scene, volume, reference, slices_for


def run_propagation(logic, volume, segmentation, **options):
    reports = []
    started = time.monotonic()
    job = logic.startPropagation(volume, segmentation, device="cpu",
                                 progressCallback=lambda f, m: reports.append((f, m)), **options)
    job.wait(RUN_TIMEOUT_S)
    assert job.status == fsLogic.SUCCEEDED, f"{job.status}: {job.errorMessage}\n{job.errorDetails}"
    return job, reports, time.monotonic() - started


def organ_dice(segmentation, ids, volume, reference, organs=None) -> dict[str, float]:
    return {organ: support.dice(mc.segmentMask(segmentation, ids[organ], volume), reference == VALUE[organ])
            for organ in (organs or VALUE)}


@pytest.fixture(scope="module")
def propagated(engine, chaos, make_logic, cache_dir):
    scene, volume, reference, slices_for = chaos
    segmentation, ids, painted = support.add_painted_segmentation(scene, volume, reference, "painted",
                                                                  slices_for=slices_for)
    before = {"arrays": support.segment_arrays(segmentation, volume), "meta": support.segment_metadata(segmentation)}
    logic = make_logic()
    job, reports, seconds = run_propagation(logic, volume, segmentation)
    dices = organ_dice(segmentation, ids, volume, reference)
    print(f"\n[FewShotSAM e2e] main propagation ({len(job.commands)} worker runs) {seconds:.1f} s; Dice "
          + ", ".join(f"{o} {d:.3f}" for o, d in dices.items()))
    return dict(scene=scene, volume=volume, reference=reference, segmentation=segmentation, ids=ids, painted=painted,
                before=before, job=job, reports=reports, seconds=seconds, dice=dices, logic=logic,
                result={i: mc.segmentMask(segmentation, i, volume) for i in ids.values()},
                cacheEntries=cache_entries(cache_dir))


# ---- the main run --------------------------------------------------------------------------------------------
def test_segments_are_filled_through_the_volume(propagated):
    for organ, value in propagated["dice"].items():
        assert value >= DICE_FLOOR[organ], f"{organ}: Dice {value:.3f} < {DICE_FLOOR[organ]}"
    reference = propagated["reference"]
    for organ, value in VALUE.items():
        result = propagated["result"][propagated["ids"][organ]]
        expected_slices = set(ps.nonEmptySlices(reference == value, 0))
        filled = set(ps.nonEmptySlices(result, 0))
        # filled through the organ (its thin first/last slices may stay empty; Dice above measures the quality)
        assert len(filled & expected_slices) >= 0.7 * len(expected_slices), organ
        assert len(filled) > len(propagated["painted"][organ])


def test_segments_painted_on_different_slices_run_separately(propagated):
    ids = propagated["ids"]
    assert propagated["job"].groups == [[ids["liver"], ids["spleen"]], [ids["right kidney"], ids["left kidney"]]]
    assert len(propagated["job"].commands) == 2
    assert all(c[:4] == [sys.executable, "-m", "FewShotSAMLib", "propagate"] for c in propagated["job"].commands)
    # the first group's worker ended before the second started: the second ran in the standby started then
    assert propagated["job"].runs[1].process.startedAhead


def test_painted_slices_are_unchanged(propagated):
    for organ, indices in propagated["painted"].items():
        segment_id = propagated["ids"][organ]
        after, before = propagated["result"][segment_id], propagated["before"]["arrays"][segment_id]
        for index in indices:
            np.testing.assert_array_equal(after[index], before[index], err_msg=f"{organ} slice {index}")


def test_names_colours_ids_and_unpainted_segment_are_kept(propagated):
    assert support.segment_metadata(propagated["segmentation"]) == propagated["before"]["meta"]
    notes = propagated["ids"]["notes"]
    assert not propagated["result"][notes].any()
    assert propagated["job"].result["skipped"] == [notes]
    segmentation = propagated["segmentation"].GetSegmentation()
    assert ps.readRecord(segmentation.GetSegment(notes)) is None
    record = ps.readRecord(segmentation.GetSegment(propagated["ids"]["liver"]))
    assert record.axis == 0 and list(record.painted) == propagated["painted"]["liver"]


def test_progress_is_reported_and_files_are_cleaned(propagated, make_logic):
    reports = propagated["reports"]
    fractions = [f for f, _ in reports]
    assert len(reports) >= 5 and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions) and all(m for _, m in reports)
    assert any(m.startswith("[2/2 right kidney, left kidney]") for _, m in reports)
    assert all(any(p.isDone for p in run.progressReports) for run in propagated["job"].runs)
    assert "--cache-dir" in propagated["job"].command and "json" in propagated["job"].command
    assert os.listdir(make_logic.temporary) == []


def test_each_propagated_segment_gets_a_slice_to_paint_next(propagated):
    suggested = {s.segmentId: s for s in propagated["job"].result["suggestions"]}
    for organ in VALUE:
        suggestion = suggested[propagated["ids"][organ]]
        assert suggestion.axis == 0 and suggestion.segmentName == organ
        assert min(abs(suggestion.sliceIndex - z) for z in propagated["painted"][organ]) >= 2, organ
        assert 0 <= suggestion.confidence <= 1


def test_export_of_the_result(propagated, tmp_path):
    import slicerio

    volume, segmentation, ids = propagated["volume"], propagated["segmentation"], propagated["ids"]
    organs = [ids[o] for o in VALUE]
    seg_path, label_path = tmp_path / "result.seg.nrrd", tmp_path / "result.nrrd"
    propagated["logic"].exportSegmentation(segmentation, volume, str(seg_path), str(label_path), segmentIds=organs)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    assert labels.shape == mc.volumeShape(volume)
    for organ, value in VALUE.items():
        # overlapping voxels go to the later segment, so compare with a little tolerance
        assert support.dice(labels == value, propagated["result"][ids[organ]]) > 0.98, organ
    data = slicerio.read_segmentation(str(seg_path))
    assert [(s["name"], s["labelValue"]) for s in data["segments"]] == [(o, v) for o, v in VALUE.items()]
    np.testing.assert_array_equal(np.transpose(data["voxels"], (2, 1, 0)), labels)
    with pytest.raises(FewShotSAMSlicerError, match="already exists"):
        propagated["logic"].exportSegmentation(segmentation, volume, str(seg_path))


# ---- one more painted slice: embeddings come from the cache ----------------------------------------------------
def test_second_run_after_painting_one_more_slice_reuses_the_cache(propagated, cache_dir):
    volume, segmentation, ids = propagated["volume"], propagated["segmentation"], propagated["ids"]
    reference, liver = propagated["reference"], ids["liver"]
    current = mc.segmentMask(segmentation, liver, volume)
    others = {i: mc.segmentMask(segmentation, i, volume) for i in ids.values() if i != liver}
    # the user corrects the worst propagated liver slice by painting it as in the reference
    candidates = [i for i in ps.nonEmptySlices(reference == 1, 0) if i not in propagated["painted"]["liver"]]
    extra = max(candidates, key=lambda i: np.logical_xor(current[i], reference[i] == 1).sum())
    corrected = current.copy()
    corrected[extra] = reference[extra] == 1
    mc.setSegmentMask(segmentation, liver, corrected, volume)
    expected_painted = sorted(propagated["painted"]["liver"] + [extra])
    assert propagated["logic"].paintedInput(volume, segmentation, [liver]).painted[liver] == expected_painted

    job, _, seconds = run_propagation(propagated["logic"], volume, segmentation, segmentIds=[liver])
    assert job.runs[0].process.startedAhead  # prepared when the previous job's worker ended
    encode = [p for p in job.runs[0].progressReports if p.stage == "encode"]
    print(f"\n[FewShotSAM e2e] liver again after painting slice {extra}: {seconds:.1f} s")
    after = mc.segmentMask(segmentation, liver, volume)
    np.testing.assert_array_equal(after[extra], reference[extra] == 1)
    assert job.result["painted"][liver] == expected_painted
    for segment_id, mask in others.items():  # only the chosen segment was propagated
        np.testing.assert_array_equal(mc.segmentMask(segmentation, segment_id, volume), mask)
    assert cache_entries(cache_dir) == propagated["cacheEntries"], "the volume was encoded again"
    assert encode and all(p.done == p.total for p in encode[-1:])
    assert organ_dice(segmentation, ids, volume, reference, ["liver"])["liver"] >= propagated["dice"]["liver"] - 0.02


# ---- other geometries: the same voxels under another IJK-to-RAS -------------------------------------------------
def reoriented_case(chaos, name: str, direction_change: np.ndarray):
    scene, volume, reference, slices_for = chaos
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(volume.GetImageData())
    matrix = mc.ijkToRas(volume)
    matrix[:3, :3] = direction_change @ matrix[:3, :3]
    matrix[:3, 3] = (12.0, -30.0, 45.0)
    node.SetIJKToRASMatrix(mc.arrayToMatrix(matrix))
    assert mc.sliceAxis(matrix, "auto") == 0
    segmentation, ids, painted = support.add_painted_segmentation(scene, node, reference, f"{name} segmentation",
                                                                  slices_for=slices_for)
    return node, segmentation, ids, painted


@pytest.mark.parametrize("name, change", [
    ("oblique", support.rotation((1.0, 1.0, 0.3), 30.0)),
    ("flipped", np.diag([-1.0, 1.0, -1.0])),  # mirrored left-right and head-foot (negative determinant)
])
def test_oblique_and_flipped_volumes_land_in_the_right_voxels(propagated, chaos, make_logic, name, change):
    volume, segmentation, ids, painted = reoriented_case(chaos, name, change)
    reference = chaos[2]
    group = [ids["liver"], ids["spleen"]]  # one worker run
    run_propagation(make_logic(), volume, segmentation, segmentIds=group)
    dices = organ_dice(segmentation, ids, volume, reference, ["liver", "spleen"])
    same = {o: support.dice(mc.segmentMask(segmentation, ids[o], volume), propagated["result"][propagated["ids"][o]])
            for o in ("liver", "spleen")}
    print(f"\n[FewShotSAM e2e] {name}: Dice vs reference "
          + ", ".join(f"{o} {d:.3f}" for o, d in dices.items())
          + "; vs main run " + ", ".join(f"{o} {d:.3f}" for o, d in same.items()))
    for organ in ("liver", "spleen"):
        assert dices[organ] >= DICE_FLOOR[organ], f"{name} {organ}: {dices[organ]:.3f}"
        assert same[organ] >= SAME_RESULT_DICE, f"{name} {organ} differs from the main run: {same[organ]:.3f}"
        mask = mc.segmentMask(segmentation, ids[organ], volume)
        for index in painted[organ]:
            np.testing.assert_array_equal(mask[index], reference[index] == VALUE[organ])


# ---- adapted model: save, then apply to another patient ---------------------------------------------------------
def test_save_adapted_model_and_apply_to_another_volume(propagated, make_logic, tmp_path):
    scene, volume, segmentation, ids = (propagated[k] for k in ("scene", "volume", "segmentation", "ids"))
    logic = make_logic()
    model_path = tmp_path / "liver-spleen.fsam"
    job = logic.startAdapt(volume, segmentation, str(model_path), segmentIds=[ids["liver"], ids["spleen"]],
                           device="cpu")
    assert job.wait(RUN_TIMEOUT_S) == fsLogic.SUCCEEDED, job.errorMessage
    assert model_path.is_file() and job.result["modelPath"] == str(model_path)
    with pytest.raises(FewShotSAMSlicerError, match="already exists"):
        logic.startAdapt(volume, segmentation, str(model_path), segmentIds=[ids["liver"]])

    folder = support.chaos_dir()
    target = support.load_volume(scene, folder / "image_3.nii.gz", "CHAOS T2 case 3")
    target_reference = mc.volumeArray(support.load_volume(scene, folder / "label_3.nii.gz", "reference 3",
                                                          labelmap=True)).astype(np.uint8)
    job = logic.startApply(str(model_path), target, device="cpu")
    assert job.wait(RUN_TIMEOUT_S) == fsLogic.SUCCEEDED, job.errorMessage
    output = job.result["segmentationNode"]
    assert output.GetScene() is scene and output.GetName() == "CHAOS T2 case 3 FewShotSAM"
    source_meta = {m[1]: m[2] for m in support.segment_metadata(segmentation)}
    meta = support.segment_metadata(output)
    assert [m[1] for m in meta] == ["liver", "spleen"]
    for _, name, color in meta:
        np.testing.assert_allclose(color, source_meta[name], atol=1e-3)
    dices = {m[1]: support.dice(mc.segmentMask(output, m[0], target), target_reference == VALUE[m[1]]) for m in meta}
    print("\n[FewShotSAM e2e] adapted model applied to case 3: Dice "
          + ", ".join(f"{o} {d:.3f}" for o, d in dices.items()))
    for organ, value in dices.items():
        assert value >= APPLY_DICE_FLOOR[organ], f"{organ}: {value:.3f}"


# ---- transforms, cancel, errors ---------------------------------------------------------------------------------
def test_parent_transform_is_refused_then_hardened_when_asked(engine, chaos, make_logic, cache_with_shared_encoders):
    scene, volume, reference, slices_for = chaos
    node, segmentation, ids, _ = reoriented_case(chaos, "transformed", np.eye(3))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "table shift")
    shift = np.eye(4)
    shift[:3, 3] = (0.0, 15.0, -40.0)
    transform.SetMatrixTransformToParent(mc.arrayToMatrix(shift))
    for n in (node, segmentation):
        n.SetAndObserveTransformNodeID(transform.GetID())
    before = mc.ijkToRas(node)
    logic = make_logic(cache=cache_with_shared_encoders("transformed-cache"))
    with pytest.raises(FewShotSAMSlicerError, match=r"under a transform\. .*Harden the transform"):
        logic.startPropagation(node, segmentation)
    assert node.GetParentTransformNode() is not None and segmentation.GetParentTransformNode() is not None
    # With hardening the run starts on the moved grid; it is cancelled at once (the propagation itself is covered
    # by the other tests), which also checks the hardened segmentation was exported onto that grid.
    job = logic.startPropagation(node, segmentation, hardenTransforms=True, device="cpu")
    assert node.GetParentTransformNode() is None and segmentation.GetParentTransformNode() is None
    np.testing.assert_allclose(mc.ijkToRas(node)[:3, 3], before[:3, 3] + shift[:3, 3], atol=1e-4)
    assert job.paintedInput.painted[ids["liver"]] == slices_for["liver"]
    job.cancel()
    assert job.wait(60) == fsLogic.CANCELLED


def test_cancel_after_the_first_progress_line_changes_nothing(engine, chaos, make_logic, tmp_path):
    scene, volume, reference, slices_for = chaos
    segmentation, ids, _ = support.add_painted_segmentation(scene, volume, reference, "to cancel",
                                                            slices_for=slices_for)
    before_arrays = support.segment_arrays(segmentation, volume)
    before_meta = support.segment_metadata(segmentation)
    logic = make_logic(cache=tmp_path / "cold-cache")  # cold: the worker is surely busy when cancelled
    holder = {}

    def on_progress(fraction, message):
        job = holder.get("job")
        if job is not None and fraction > 0.0 and "pid" not in holder:
            holder["pid"] = job.pid
            job.cancel()

    job = logic.startPropagation(volume, segmentation, device="cpu", progressCallback=on_progress)
    holder["job"] = job
    assert job.wait(RUN_TIMEOUT_S) == fsLogic.CANCELLED
    assert "pid" in holder, "no progress line arrived before the worker ended"
    assert job.stepIndex == 0 and len(job.runs) == 1  # the second group never started
    deadline = time.monotonic() + 10
    while support.pid_alive(holder["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not support.pid_alive(holder["pid"])
    assert support.segment_metadata(segmentation) == before_meta
    after = support.segment_arrays(segmentation, volume)
    assert after.keys() == before_arrays.keys()
    for segment_id in before_arrays:
        np.testing.assert_array_equal(after[segment_id], before_arrays[segment_id])
        assert ps.readRecord(segmentation.GetSegmentation().GetSegment(segment_id)) is None
    assert not os.path.exists(job.temporaryDirectory)


def test_worker_error_is_readable(engine, chaos, make_logic, tmp_path):
    """A failing worker (a checkpoint that is not a model) gives the engine's one line, not a traceback."""
    scene, volume, reference, slices_for = chaos
    segmentation, _, _ = support.add_painted_segmentation(scene, volume, reference, "bad checkpoint",
                                                          slices_for=slices_for)
    bogus = tmp_path / "not-a-model.pth"
    bogus.write_bytes(b"this is not a checkpoint")
    before = support.segment_arrays(segmentation, volume)
    job = make_logic().startPropagation(volume, segmentation, model="sam_vit_b", checkpoint=str(bogus), device="cpu")
    assert job.wait(RUN_TIMEOUT_S) == fsLogic.FAILED
    print(f"\n[FewShotSAM e2e] worker error shown to the user: {job.errorMessage}")
    assert job.errorMessage and "Traceback" not in job.errorMessage and "\n" not in job.errorMessage
    assert "not-a-model.pth" in job.errorMessage or "checkpoint" in job.errorMessage.lower()
    after = support.segment_arrays(segmentation, volume)
    for segment_id in before:
        np.testing.assert_array_equal(after[segment_id], before[segment_id])
