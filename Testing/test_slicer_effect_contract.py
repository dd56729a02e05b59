"""The extension honours Slicer's contract for a scripted module and a Segment Editor effect, and writes its
results where Slicer's editor would.

Part 1 lists the Python hooks Slicer's C++ calls, with the file each comes from (read in Slicer's sources at tags
v5.8.1 and v5.10.0), and checks the module and the effect against them.

Part 2 runs the effect's editor code (FewShotSAMSlicerLib/editor_effect.py) and the logic on real MRML scenes
(slicer-core) with slicer_effect_standin.ScriptedEffectStandIn, whose modifySegmentByLabelmap and undo are Slicer's
own vtkSlicerSegmentEditorLogic. The worker is Testing/fill_worker.py (a real child process that writes real
files, quickly); the real engine runs in test_slicer_propagation_e2e.py.
"""

from __future__ import annotations

import ast
import sys

import numpy as np
import pytest
import slicer_extension_support as support
from slicer_extension_support import MODULE_DIR, REPO_ROOT

slicer = support.import_slicer()

from slicer_effect_standin import ScriptedEffectStandIn  # noqa: E402

from FewShotSAMSlicerLib import editor_effect as ee  # noqa: E402
from FewShotSAMSlicerLib import logic as fsLogic  # noqa: E402
from FewShotSAMSlicerLib import mrml_conversion as mc  # noqa: E402
from FewShotSAMSlicerLib import painted_slices as ps  # noqa: E402
from FewShotSAMSlicerLib import worker as wk  # noqa: E402

EFFECT_FILE = MODULE_DIR / "SegmentEditorFewShotSAMLib" / "SegmentEditorEffect.py"
MODULE_FILE = MODULE_DIR / "FewShotSAM.py"

# ---- Part 1: the hooks Slicer calls -------------------------------------------------------------------------------
# name -> number of arguments after self. Modules/Loadable/Segmentations/EditorEffects/
# qSlicerSegmentEditorScriptedEffect.cxx (declareMethod list and callMethod arguments), v5.8.1 and v5.10.0;
# "cleanup" is declared from v5.10.0 on.
EFFECT_HOOKS = {
    "icon": 0, "helpText": 0, "clone": 0, "activate": 0, "deactivate": 0, "setupOptionsFrame": 0,
    "createCursor": 1, "processInteractionEvents": 3, "processViewNodeEvents": 3, "setMRMLDefaults": 0,
    "referenceGeometryChanged": 0, "sourceVolumeNodeChanged": 0, "masterVolumeNodeChanged": 0, "layoutChanged": 0,
    "interactionNodeModified": 1, "updateGUIFromMRML": 0, "updateMRMLFromGUI": 0, "cleanup": 0,
}
# Names an effect might define believing Slicer calls them; Slicer never does (defaults go in setMRMLDefaults).
NEVER_CALLED = ("setDefaultParameters", "setDefaults", "onSceneClose")
# Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx declares setup, enter, exit (v5.8.1, v5.10.0);
# Base/Python/slicer/ScriptedLoadableModule.py calls cleanup() on moduleAboutToBeUnloaded.
WIDGET_HOOKS = {"setup": 0, "enter": 0, "exit": 0, "cleanup": 0}
# Base/QTGUI/qSlicerScriptedLoadableModule.cxx instantiates the class named as the module, with the parent;
# qSlicerScriptedLoadableModuleWidget.cxx the class "<module>Widget".
MODULE_CLASSES = ("FewShotSAM", "FewShotSAMWidget", "FewShotSAMLogic", "FewShotSAMTest")


def methods_of(path, class_name) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {item.name: item for item in node.body if isinstance(item, ast.FunctionDef)}
    raise AssertionError(f"class {class_name} not found in {path.name}")


def positional_count(function: ast.FunctionDef) -> tuple[int, int, bool]:
    """(required, total, has *args) positional parameters after self."""
    arguments = function.args.posonlyargs + function.args.args
    total = len(arguments) - 1
    return total - len(function.args.defaults), total, function.args.vararg is not None


def accepts(function: ast.FunctionDef, count: int) -> bool:
    required, total, varargs = positional_count(function)
    return required <= count and (count <= total or varargs)


def test_effect_defines_hooks_with_the_arguments_slicer_passes():
    methods = methods_of(EFFECT_FILE, "SegmentEditorEffect")
    for name, count in EFFECT_HOOKS.items():
        if name in methods:
            assert accepts(methods[name], count), f"{name} must take {count} argument(s) after self"
    for required in ("clone", "icon", "helpText", "setMRMLDefaults", "setupOptionsFrame", "updateGUIFromMRML",
                     "updateMRMLFromGUI", "cleanup"):
        assert required in methods, f"the effect has no {required}()"
    assert not set(NEVER_CALLED) & set(methods), f"Slicer never calls {sorted(set(NEVER_CALLED) & set(methods))}"


def test_effect_defaults_are_set_where_slicer_calls_them():
    source = ast.unparse(methods_of(EFFECT_FILE, "SegmentEditorEffect")["setMRMLDefaults"])
    assert "ee.setMRMLDefaults(self.scriptedEffect)" in source
    init = ast.unparse(methods_of(EFFECT_FILE, "SegmentEditorEffect")["__init__"])
    assert "scriptedEffect.name = ee.EFFECT_NAME" in init and "scriptedEffect.title = _(" in init


def test_effect_writes_only_through_the_editor():
    text = EFFECT_FILE.read_text()
    assert "SetBinaryLabelmapToSegment" not in text and "setSegmentMask" not in text
    apply_source = ast.unparse(methods_of(EFFECT_FILE, "SegmentEditorEffect")["onApply"])
    assert "ee.editorResultWriter(self.scriptedEffect" in apply_source
    assert "ModificationModeSet" in apply_source and "beforeModifyCallback=self.scriptedEffect.saveStateForUndo" \
        in apply_source


def test_module_classes_and_widget_hooks():
    tree = ast.parse(MODULE_FILE.read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert set(MODULE_CLASSES) <= classes
    methods = methods_of(MODULE_FILE, "FewShotSAMWidget")
    for name, count in WIDGET_HOOKS.items():
        assert name in methods and accepts(methods[name], count), name
    cleanup = ast.unparse(methods["cleanup"])
    assert "self.job.shutdown()" in cleanup, "module cleanup must kill the worker (no timer polls after it)"
    module_init = ast.unparse(methods_of(MODULE_FILE, "FewShotSAM")["__init__"])
    assert "'aboutToQuit()', fewShotSAMLogic.shutdownAllJobs" in module_init


def test_module_propagation_is_one_undo_step_in_the_segment_editor():
    propagate = ast.unparse(methods_of(MODULE_FILE, "FewShotSAMWidget")["onPropagate"])
    assert "beforeModifyCallback=segmentEditorUndoSaver(p.segmentation)" in propagate
    saver = next(node for node in ast.parse(MODULE_FILE.read_text()).body
                 if isinstance(node, ast.FunctionDef) and node.name == "segmentEditorUndoSaver")
    assert "editor.saveStateForUndo()" in ast.unparse(saver)  # qMRMLSegmentEditorWidget public slot (5.8, 5.10)


def test_job_finished_does_not_need_the_parameter_node():
    """exit() sets the parameter node to None; a job finishing afterwards must still record its result."""
    finished = ast.unparse(methods_of(MODULE_FILE, "FewShotSAMWidget")["onJobFinished"])
    assert "self._parameterNode" not in finished


def test_self_test_creates_the_widget_and_activates_the_effect_without_sleeping():
    methods = methods_of(MODULE_FILE, "FewShotSAMTest")
    assert "self.test_WidgetAndEffect()" in ast.unparse(methods["runTest"])
    widget_test = ast.unparse(methods["test_WidgetAndEffect"])
    assert "getModuleWidget('FewShotSAM')" in widget_test and "setActiveEffectByName" in widget_test
    propagation = ast.unparse(methods["test_Propagation"])
    assert "processEvents" in propagation and ".wait(" not in propagation and "propagate(" not in propagation


# ---- Part 2: behaviour on real MRML scenes ------------------------------------------------------------------------
SHAPE = (12, 24, 20)  # k, j, i


def fill_worker_factory(command, env):
    """Runs Testing/fill_worker.py instead of ``-m FewShotSAMLib`` (same arguments)."""
    assert command[1:3] == ["-m", "FewShotSAMLib"]
    script = str(REPO_ROOT / "Testing" / "fill_worker.py")
    env = wk.workerEnvironment(env, str(REPO_ROOT))
    return wk.WorkerProcess([sys.executable, script, *command[3:]], env=env)


@pytest.fixture
def make_logic(tmp_path):
    def make():
        return fsLogic.FewShotSAMSlicerLogic(processFactory=fill_worker_factory, cacheDirectory=str(tmp_path / "c"),
                                             temporaryDirectory=str(tmp_path / "t"))
    return make


def add_volume(scene, spacing=(1.0, 1.0, 2.0), shape=SHAPE, name="image"):
    k, j, i = np.indices(shape)
    image = (100 + 10 * i + j + 50 * ((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2 < 30)).astype(np.int16)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = np.diag([*spacing, 1.0])
    matrix[:3, 3] = (-10.0, -12.0, 5.0)
    volume.SetIJKToRASMatrix(mc.arrayToMatrix(matrix))
    volume.SetAndObserveImageData(mc.imageDataFromArray(image))
    return volume


def add_segmentation(scene, volume, name="seg"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def add_segment(node, name, mask, grid, color=(0.8, 0.2, 0.2)):
    segment_id = node.GetSegmentation().AddEmptySegment("", name, color)
    mc.setSegmentMask(node, segment_id, mask, grid)
    return segment_id


def disc(shape, center, radius, slices, axis=0):
    """A disc of the given radius on each of `slices` along `axis` (other axes: the disc's plane)."""
    mask = np.zeros(shape, dtype=bool)
    other = [a for a in range(3) if a != axis]
    grid = np.indices([shape[a] for a in other])
    inside = (grid[0] - center[0]) ** 2 + (grid[1] - center[1]) ** 2 <= radius ** 2
    for index in slices:
        mask[ps.sliceIndex(axis, index)] = inside
    return mask


def run_to_end(job, timeout=120):
    assert job.wait(timeout) in (fsLogic.SUCCEEDED, fsLogic.FAILED, fsLogic.CANCELLED)
    return job


@pytest.fixture
def scene():
    return support.new_scene()


def test_fresh_editor_parameters_are_empty_in_slicer_and_set_by_set_mrml_defaults(scene):
    volume = add_volume(scene)
    segmentation = add_segmentation(scene, volume)
    effect = ScriptedEffectStandIn(scene, ee.EFFECT_NAME, segmentation, volume)
    assert effect.parameter(ee.MODEL) == "" and effect.criticalMessages  # Slicer's behaviour before the defaults
    assert ee.settings(effect).model == "litemedsam"  # never "Unknown model ''"
    effect.criticalMessages.clear()
    ee.setMRMLDefaults(effect)
    for name, value in ee.DEFAULTS.items():
        assert effect.parameter(name) == value
    assert effect.editorNode.GetAttribute(f"{ee.EFFECT_NAME}.{ee.MODEL}") == "litemedsam"
    effect.setParameter(ee.DEVICE, "cpu")
    ee.setMRMLDefaults(effect)  # a second call keeps the user's choice
    assert ee.settings(effect).device == "cpu" and not effect.criticalMessages
    fsLogic.FewShotSAMSlicerLogic()._checkModel(ee.settings(effect).model, None, ee.settings(effect).device)


def test_editor_inputs_are_checked_before_anything_else(scene):
    volume = add_volume(scene)
    segmentation = add_segmentation(scene, volume)
    effect = ScriptedEffectStandIn(scene, ee.EFFECT_NAME, segmentation)
    with pytest.raises(ee.FewShotSAMSlicerError, match="source volume"):
        ee.editorInputs(effect.parameterSetNode())
    effect.editorNode.SetAndObserveSourceVolumeNode(volume)
    assert ee.editorInputs(effect.parameterSetNode()) == (segmentation, volume)


def test_apply_through_the_editor_respects_editable_area_and_overwrite_and_is_one_undo_step(scene, make_logic):
    volume = add_volume(scene)
    segmentation = add_segmentation(scene, volume)
    organ = disc(SHAPE, (12, 10), 5, [2, 9])
    organ_id = add_segment(segmentation, "organ", organ, volume)
    other = np.zeros(SHAPE, bool)
    other[:, 10:14, 8:12] = True  # crosses the organ on every slice
    other_id = add_segment(segmentation, "other", other, volume, (0.2, 0.8, 0.2))
    region = np.zeros(SHAPE, bool)
    region[:6] = True  # the editable area: slices 0..5 only
    region_id = add_segment(segmentation, "region", region, volume, (0.2, 0.2, 0.8))
    before = support.segment_arrays(segmentation, volume)
    effect = ScriptedEffectStandIn(scene, ee.EFFECT_NAME, segmentation, volume)
    editor = effect.editorNode
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(region_id)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    editor.SetSelectedSegmentID(organ_id)

    preview = ee.createPreviewNode(effect, segmentation)
    job = run_to_end(make_logic().startPropagation(volume, segmentation, segmentIds=[organ_id], device="cpu",
                                                   previewNode=preview))
    assert job.status == fsLogic.SUCCEEDED, job.errorMessage
    filled = mc.segmentMask(preview, organ_id, volume)
    assert filled[2:10].all(axis=0).sum() > 0 and filled[5].any()
    after_preview = support.segment_arrays(segmentation, volume)
    for segment_id in before:  # the preview changed nothing in the segmentation
        np.testing.assert_array_equal(after_preview[segment_id], before[segment_id])

    writer = ee.editorResultWriter(effect, effect.ModificationModeSet)
    job.result["pending"].commit(writer, beforeModifyCallback=effect.saveStateForUndo)
    ee.removePreviewNode(effect, segmentation)
    after = support.segment_arrays(segmentation, volume)
    assert effect.undoStatesSaved == 1
    # Inside the editable area the result; outside it the organ as it was (slice 9 painted, 6..8 not filled).
    np.testing.assert_array_equal(after[organ_id][:6], filled[:6])
    np.testing.assert_array_equal(after[organ_id][6:], organ[6:])
    # "Overwrite all segments": the other segment lost the voxels the organ now covers. (Outside the editable
    # area Slicer's Set mode keeps the organ as it was and still removes its overlap from other segments.)
    np.testing.assert_array_equal(after[other_id], other & ~after[organ_id])
    assert (other & filled)[:6].any()
    assert preview.GetScene() is None and ee.previewNode(effect) is None
    effect.logic.Undo()  # one Ctrl+Z in the editor: back to the painted slices
    undone = support.segment_arrays(segmentation, volume)
    for segment_id in before:
        np.testing.assert_array_equal(undone[segment_id], before[segment_id], err_msg=segment_id)


def test_segment_reaching_outside_the_volume(scene, make_logic):
    volume = add_volume(scene)
    segmentation = add_segmentation(scene, volume)
    organ_id = add_segment(segmentation, "organ", disc(SHAPE, (12, 10), 4, [3, 8]), volume)
    big = np.zeros((SHAPE[0] + 4, SHAPE[1] + 6, SHAPE[2] + 6), np.uint8)
    big[:, :8, :8] = 1  # reaches 2-3 voxels past the volume on every side
    matrix = mc.ijkToRas(volume)
    matrix[:3, 3] = (matrix @ np.array([-3, -3, -2, 1.0]))[:3]
    outside = slicer.vtkSlicerSegmentationsModuleLogic
    other_id = segmentation.GetSegmentation().AddEmptySegment("", "outside")
    assert outside.SetBinaryLabelmapToSegment(mc.orientedImageFromArray(big, matrix), segmentation, other_id,
                                              outside.MODE_REPLACE)
    mask = mc.segmentMask(segmentation, other_id, volume)  # was: "did not resample to the source volume's grid"
    assert mask.shape == SHAPE and mask[:, :5, :5].all()
    job = run_to_end(make_logic().startPropagation(volume, segmentation, segmentIds=[organ_id], device="cpu"))
    assert job.status == fsLogic.SUCCEEDED, job.errorMessage
    assert mc.segmentMask(segmentation, organ_id, volume)[3:9].any(axis=(1, 2)).all()


def oversampled_segmentation(scene, volume, factor=2):
    """A segmentation whose reference geometry is the volume's, oversampled `factor` times in-plane."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fine")
    node.CreateDefaultDisplayNodes()
    matrix = mc.ijkToRas(volume)
    fine = matrix.copy()
    fine[:3, 0] /= factor
    fine[:3, 1] /= factor
    fine[:3, 3] = (matrix @ np.array([-0.5 + 0.5 / factor, -0.5 + 0.5 / factor, 0, 1.0]))[:3]
    geometry = slicer.vtkOrientedImageData()
    geometry.SetExtent(0, SHAPE[2] * factor - 1, 0, SHAPE[1] * factor - 1, 0, SHAPE[0] - 1)
    geometry.SetImageToWorldMatrix(mc.arrayToMatrix(fine))
    node.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
    return node


def test_oversampled_segmentation_keeps_its_resolution_in_a_shared_layer(scene, make_logic):
    volume = add_volume(scene)
    segmentation = oversampled_segmentation(scene, volume)
    grid = mc.workingGrid(volume, segmentation)
    assert grid is not volume and mc.volumeShape(grid) == (SHAPE[0], SHAPE[1] * 2, SHAPE[2] * 2)
    fine_shape = mc.volumeShape(grid)
    organ_id = add_segment(segmentation, "organ", disc(fine_shape, (24, 20), 9, [2, 9]), grid)
    detail = np.zeros(fine_shape, bool)
    detail[:, 2:30:2, 30:34] = True  # one-voxel stripes: cannot survive a trip through the coarse grid
    detail_id = add_segment(segmentation, "detail", detail, grid)
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)  # organ and detail share one layer
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1
    job = run_to_end(make_logic().startPropagation(volume, segmentation, segmentIds=[organ_id], device="cpu"))
    assert job.status == fsLogic.SUCCEEDED, job.errorMessage
    np.testing.assert_array_equal(mc.segmentMask(segmentation, detail_id, grid), detail)
    organ = mc.segmentMask(segmentation, organ_id, grid)
    assert organ[2:10].any(axis=(1, 2)).all() and not organ[10:].any()


def test_closed_surface_source_is_switched_to_binary_labelmap(scene, make_logic):
    volume = add_volume(scene)
    segmentation = add_segmentation(scene, volume)
    organ_id = add_segment(segmentation, "organ", disc(SHAPE, (12, 10), 5, [3, 8]), volume)
    segmentation.GetSegmentation().CreateRepresentation("Closed surface")
    segmentation.GetSegmentation().SetSourceRepresentationName("Closed surface")
    assert ee.hasClosedSurfaceSource(segmentation)
    ee.switchSourceToBinaryLabelmap(segmentation)
    assert not ee.hasClosedSurfaceSource(segmentation)
    job = run_to_end(make_logic().startPropagation(volume, segmentation, segmentIds=[organ_id], device="cpu"))
    assert job.status == fsLogic.SUCCEEDED, job.errorMessage
    segmentation.GetSegmentation().CreateRepresentation("Closed surface", True)  # a later conversion
    assert mc.segmentMask(segmentation, organ_id, volume)[3:9].any(axis=(1, 2)).all()


def test_scene_close_during_a_run_writes_nothing(scene, make_logic):
    volume = add_volume(scene)
    segmentation = add_segmentation(scene, volume)
    organ = disc(SHAPE, (12, 10), 5, [2, 9])
    organ_id = add_segment(segmentation, "organ", organ, volume)
    job = make_logic().startPropagation(volume, segmentation, segmentIds=[organ_id], device="cpu")
    job.run.process.wait(60)  # the worker has finished, the GUI has not polled yet
    scene.Clear(0)  # File > Close Scene
    assert run_to_end(job).status == fsLogic.FAILED
    assert "scene was closed" in job.errorMessage
    np.testing.assert_array_equal(mc.segmentMask(segmentation, organ_id, volume), organ)


def test_coronal_painting_is_recognised_for_automatic_orientation(scene, make_logic):
    volume = add_volume(scene)
    segmentation = add_segmentation(scene, volume)
    organ = disc(SHAPE, (6, 10), 4, [6, 12, 18], axis=1)  # painted in the coronal view: 3 slices along j
    organ_id = add_segment(segmentation, "organ", organ, volume)
    logic = make_logic()
    painted = logic.paintedInput(volume, segmentation, orientation="auto")
    assert painted.axis == 1 and painted.orientation == "coronal" and painted.painted[organ_id] == [6, 12, 18]
    assert logic.paintedInput(volume, segmentation, orientation="axial").axis == 0  # an explicit choice wins
    job = run_to_end(logic.startPropagation(volume, segmentation, device="cpu"))
    assert job.status == fsLogic.SUCCEEDED, job.errorMessage
    assert "--axis" in job.command and job.command[job.command.index("--axis") + 1] == "coronal"
    result = mc.segmentMask(segmentation, organ_id, volume)
    assert result[:, 6:19].any(axis=(0, 2)).all() and not result[:, :6].any()
    record = ps.readRecord(segmentation.GetSegmentation().GetSegment(organ_id))
    assert record.axis == 1 and record.painted == (6, 12, 18)


def test_first_scalar_volume_skips_labelmaps(scene):
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert labels.IsA("vtkMRMLScalarVolumeNode")  # why GetFirstNodeByClass picked it
    assert mc.firstScalarVolume(scene) is None
    volume = add_volume(scene)
    assert mc.firstScalarVolume(scene) is volume


def test_segment_ids_with_commas_survive_the_parameter_node(scene):
    from FewShotSAMSlicerLib import parameters

    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    wrapped = parameters.FewShotSAMParameters(node)
    wrapped.setSelectedSegmentIds(["liver, left lobe", "spleen"])
    assert parameters.FewShotSAMParameters(node).selectedSegmentIds() == ["liver, left lobe", "spleen"]
    node.SetParameter("segmentIds", "liver,spleen")  # a scene saved before: comma-separated
    assert wrapped.selectedSegmentIds() == ["liver", "spleen"]
