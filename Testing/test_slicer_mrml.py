"""MRML side of the extension with a real scene (slicer-core): geometry, files, segments, parameters, export.

No model runs here; see test_slicer_propagation_e2e.py for the real worker.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicer_extension_support as support

slicer = support.import_slicer()

from FewShotSAMSlicerLib import export as exporting  # noqa: E402
from FewShotSAMSlicerLib import logic as fsLogic  # noqa: E402
from FewShotSAMSlicerLib import mrml_conversion as mc  # noqa: E402
from FewShotSAMSlicerLib import painted_slices as ps  # noqa: E402
from FewShotSAMSlicerLib import parameters  # noqa: E402
from FewShotSAMSlicerLib.errors import FewShotSAMSlicerError  # noqa: E402

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def chaos():
    folder = support.chaos_dir()
    scene = support.new_scene()
    volume = support.load_volume(scene, folder / f"image_{support.CHAOS_CASE}.nii.gz", "chaos image")
    label = support.load_volume(scene, folder / f"label_{support.CHAOS_CASE}.nii.gz", "chaos label", labelmap=True)
    reference = mc.volumeArray(label).astype(np.uint8)
    return scene, volume, reference


@pytest.fixture
def painted(chaos):
    scene, volume, reference = chaos
    segmentation, ids, slices = support.add_painted_segmentation(scene, volume, reference)
    yield segmentation, ids, slices
    scene.RemoveNode(segmentation)


def geometry_from_sitk(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-LPS of a SimpleITK image."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


# ---- geometry ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_slice_axis_agrees_with_the_engine(seed):
    from FewShotSAMLib import orientation
    from FewShotSAMLib.volume import Geometry

    rng = np.random.default_rng(seed)
    direction = support.rotation(rng.normal(size=3), rng.uniform(0, 80)) @ np.diag(rng.choice([-1.0, 1.0], 3))
    direction = direction[:, rng.permutation(3)]
    spacing = rng.uniform(0.5, 5.0, 3)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction @ np.diag(spacing)
    lps = Geometry(spacing=tuple(spacing), origin=(0.0, 0.0, 0.0), direction=RAS_TO_LPS @ direction, shape=(5, 6, 7))
    for choice in ("auto", "axial", "coronal", "sagittal"):
        assert mc.sliceAxis(ijk_to_ras, choice) == orientation.slice_axis(lps, choice), choice


def test_chaos_slices_are_axial_along_k(chaos):
    _, volume, _ = chaos
    assert mc.sliceAxis(mc.ijkToRas(volume), "auto") == 0
    assert mc.sliceAxis(mc.ijkToRas(volume), "sagittal") == 2


def test_written_volume_is_in_lps_with_the_same_voxels(chaos, tmp_path):
    _, volume, _ = chaos
    path = mc.writeVolume(volume, str(tmp_path / "image.nrrd"))
    image = sitk.ReadImage(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), mc.volumeArray(volume))
    expected = mc.ijkToRas(volume)
    expected[:3] = RAS_TO_LPS @ expected[:3]
    np.testing.assert_allclose(geometry_from_sitk(image), expected, atol=1e-4)


def test_label_written_by_simpleitk_reads_back_on_the_grid(chaos, tmp_path):
    """A result written the way the engine writes it (SimpleITK, LPS) lands on the same voxels in Slicer."""
    from FewShotSAMLib import volume_io

    scene, volume, reference = chaos
    oblique = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    oblique.SetAndObserveImageData(volume.GetImageData())
    matrix = mc.ijkToRas(volume)
    matrix[:3, :3] = support.rotation((1, 1, 0), 30) @ matrix[:3, :3]
    oblique.SetIJKToRASMatrix(mc.arrayToMatrix(matrix))
    try:
        image = sitk.ReadImage(mc.writeVolume(oblique, str(tmp_path / "oblique.nrrd")))
        geometry = volume_io.geometry_from_image(image)
        result = sitk.GetImageFromArray(reference)
        result.CopyInformation(image)
        sitk.WriteImage(result, str(tmp_path / "result.nrrd"))
        assert geometry.shape == reference.shape
        array, _ = mc.readLabelArray(str(tmp_path / "result.nrrd"), oblique)
        np.testing.assert_array_equal(array, reference)
        with pytest.raises(FewShotSAMSlicerError, match="not on the voxel grid"):
            mc.readLabelArray(str(tmp_path / "result.nrrd"), volume)
    finally:
        scene.RemoveNode(oblique)


# ---- segments ------------------------------------------------------------------------------------------------
def test_segment_masks_round_trip_on_the_full_grid(chaos, painted):
    _, volume, reference = chaos
    segmentation, ids, slices = painted
    for value, organ, _ in support.ORGANS:
        mask = mc.segmentMask(segmentation, ids[organ], volume)
        assert mask.shape == reference.shape
        expected = ps.onlySlices(reference == value, 0, slices[organ])
        np.testing.assert_array_equal(mask, expected)
    assert not mc.segmentMask(segmentation, ids["notes"], volume).any()


def test_painted_input_defaults_to_every_painted_segment(chaos, painted):
    _, volume, reference = chaos
    segmentation, ids, slices = painted
    logic = fsLogic.FewShotSAMSlicerLogic()
    painted_input = logic.paintedInput(volume, segmentation)
    assert painted_input.segmentIds == [ids[o] for _, o, _ in support.ORGANS]
    assert painted_input.skipped == [ids["notes"]]
    for value, (_, organ, _) in enumerate(support.ORGANS, start=1):
        assert painted_input.painted[ids[organ]] == slices[organ]
        assert set(np.flatnonzero((painted_input.labels == value).any(axis=(1, 2)))) == set(slices[organ])
    with pytest.raises(FewShotSAMSlicerError, match="'notes' has no painted slice"):
        logic.paintedInput(volume, segmentation, [ids["liver"], ids["notes"]])
    assert logic.paintedInput(volume, segmentation, [ids["spleen"]]).segmentIds == [ids["spleen"]]


def test_propagated_slices_are_not_taken_for_painted_ones(chaos, painted):
    """After a propagation only painted or user-edited slices count as painted (record in a segment tag)."""
    _, volume, reference = chaos
    segmentation, ids, slices = painted
    liver = ids["liver"]
    full = reference == 1
    axis, grid = 0, mc.gridFingerprint(volume)
    record = ps.PropagationRecord(axis=axis, grid=grid, painted=tuple(slices["liver"]),
                                  written=ps.sliceChecksums(full, axis))
    mc.setSegmentMask(segmentation, liver, full, volume)
    ps.writeRecord(segmentation.GetSegmentation().GetSegment(liver), record)
    logic = fsLogic.FewShotSAMSlicerLogic()
    assert logic.paintedInput(volume, segmentation, [liver]).painted[liver] == slices["liver"]
    # The user corrects one propagated slice: it becomes a painted slice.
    edited = full.copy()
    extra = next(i for i in ps.nonEmptySlices(full, axis) if i not in slices["liver"])
    columns = np.flatnonzero(full[extra].any(axis=0))
    edited[extra, :, columns[len(columns) // 2]:] = False
    assert edited[extra].any() and not np.array_equal(edited[extra], full[extra])
    mc.setSegmentMask(segmentation, liver, edited, volume)
    assert logic.paintedInput(volume, segmentation, [liver]).painted[liver] == sorted(slices["liver"] + [extra])
    # Another grid (or axis): the record does not apply, every non-empty slice counts.
    assert ps.paintedSlices(edited, axis, "other-grid", record) == ps.nonEmptySlices(edited, axis)


def test_record_survives_seg_nrrd(chaos, painted, tmp_path):
    _, volume, _ = chaos
    segmentation, ids, _ = painted
    record = ps.PropagationRecord(axis=0, grid="0a1b2c3d", painted=(3, 9), written={3: "deadbeef", 4: "0badf00d"})
    ps.writeRecord(segmentation.GetSegmentation().GetSegment(ids["liver"]), record)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "with-record.seg.nrrd"))
    assert storage.WriteData(segmentation)
    loaded = slicer.vtkMRMLSegmentationNode()
    storage.ReadData(loaded)
    assert ps.readRecord(loaded.GetSegmentation().GetSegment(ids["liver"])) == record
    assert ps.PropagationRecord.fromTag(record.toTag()) == record
    assert ps.PropagationRecord.fromTag("v0;junk") is None


# ---- transforms ----------------------------------------------------------------------------------------------
def test_parent_transform_is_refused_unless_hardening_is_asked(chaos, painted):
    scene, volume, reference = chaos
    segmentation, _, _ = painted
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.5)
    transform.SetMatrixTransformToParent(mc.arrayToMatrix(shift))
    moved = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moved")
    moved.SetAndObserveImageData(volume.GetImageData())
    moved.SetIJKToRASMatrix(mc.arrayToMatrix(mc.ijkToRas(volume)))
    moved.SetAndObserveTransformNodeID(transform.GetID())
    try:
        logic = fsLogic.FewShotSAMSlicerLogic()
        with pytest.raises(FewShotSAMSlicerError, match=r"'moved' \(under 'shift'\) is under a transform.*Harden"):
            logic.startPropagation(moved, segmentation)
        assert moved.GetParentTransformNode() is not None  # refused: nothing changed
        hardened = mc.ensureNoParentTransforms([moved, segmentation], hardenTransforms=True)
        assert hardened == ["moved"] and moved.GetParentTransformNode() is None
        np.testing.assert_allclose(mc.ijkToRas(moved)[:3, 3], mc.ijkToRas(volume)[:3, 3] + shift[:3, 3], atol=1e-4)
    finally:
        scene.RemoveNode(moved)
        scene.RemoveNode(transform)


def test_model_choices_are_checked(chaos, painted, tmp_path):
    _, volume, _ = chaos
    segmentation, _, _ = painted
    logic = fsLogic.FewShotSAMSlicerLogic()
    with pytest.raises(FewShotSAMSlicerError, match="needs its checkpoint"):
        logic.startPropagation(volume, segmentation, model="sam_vit_b")
    with pytest.raises(FewShotSAMSlicerError, match="does not exist"):
        logic.startPropagation(volume, segmentation, model="sam_vit_b", checkpoint=str(tmp_path / "none.pth"))
    with pytest.raises(FewShotSAMSlicerError, match="Unknown device"):
        logic.startPropagation(volume, segmentation, device="tpu")


# ---- parameters ----------------------------------------------------------------------------------------------
def test_parameters_survive_scene_save_and_load(chaos, painted, tmp_path):
    scene, volume, _ = chaos
    segmentation, ids, _ = painted
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "FewShotSAM")
    node.SetAttribute("ModuleName", "FewShotSAM")
    try:
        p = parameters.FewShotSAMParameters(node)
        assert (p.model, p.device, p.orientation, p.allPaintedSegments, p.hardenTransforms) == (
            "litemedsam", "auto", "auto", True, False)
        assert p.segmentIdsToPropagate() is None
        p.sourceVolume, p.segmentation = volume, segmentation
        p.model, p.device, p.orientation = "medsam_vit_b", "cpu", "coronal"
        p.allPaintedSegments = False
        p.setSelectedSegmentIds([ids["liver"], ids["spleen"]])
        p.hardenTransforms = True
        with pytest.raises(ValueError):
            p.model = "unknown"
        with pytest.raises(TypeError):
            p.sourceVolume = segmentation
        # stored as parameterNodeWrapper stores them
        assert node.GetParameter("hardenTransforms") == "True" and node.GetParameter("model") == "medsam_vit_b"
        assert node.GetNodeReferenceID("sourceVolume") == volume.GetID()
        scene.SetURL(str(tmp_path / "scene.mrml"))
        assert scene.Commit()
        loaded_scene = support.new_scene()
        loaded_scene.SetURL(str(tmp_path / "scene.mrml"))
        loaded_scene.Import()
        loaded = parameters.FewShotSAMParameters(loaded_scene.GetFirstNodeByName("FewShotSAM"))
        assert loaded.model == "medsam_vit_b" and loaded.device == "cpu" and loaded.orientation == "coronal"
        assert loaded.hardenTransforms is True and loaded.allPaintedSegments is False
        assert loaded.segmentIdsToPropagate() == [ids["liver"], ids["spleen"]]
        assert loaded.sourceVolume.GetName() == volume.GetName()
        assert loaded.segmentation.GetName() == segmentation.GetName()
    finally:
        scene.RemoveNode(node)


# ---- export --------------------------------------------------------------------------------------------------
def test_export_seg_nrrd_and_labelmap(chaos, painted, tmp_path):
    import slicerio

    _, volume, reference = chaos
    segmentation, ids, slices = painted
    organs = [ids[o] for _, o, _ in support.ORGANS]
    seg_path, label_path = tmp_path / "out.seg.nrrd", tmp_path / "out-label.nrrd"
    written = exporting.exportSegmentation(segmentation, volume, str(seg_path), str(label_path), segmentIds=organs)
    assert written == [str(seg_path), str(label_path)]
    assert sorted(os.listdir(tmp_path)) == ["out-label.nrrd", "out.seg.nrrd"]  # no partial files left

    expected_lps = mc.ijkToRas(volume)
    expected_lps[:3] = RAS_TO_LPS @ expected_lps[:3]
    # labelmap: full grid of the source volume, label n = n-th segment
    image = sitk.ReadImage(str(label_path))
    np.testing.assert_allclose(geometry_from_sitk(image), expected_lps, atol=1e-4)
    labels = sitk.GetArrayFromImage(image)
    for value, organ, _ in support.ORGANS:
        np.testing.assert_array_equal(labels == value, ps.onlySlices(reference == value, 0, slices[organ]))
    # .seg.nrrd with slicerio: names, colours, label values, geometry
    data = slicerio.read_segmentation(str(seg_path))
    assert [(s["name"], s["labelValue"]) for s in data["segments"]] == [(o, v) for v, o, _ in support.ORGANS]
    for segment, (_, _, color) in zip(data["segments"], support.ORGANS):
        np.testing.assert_allclose(segment["color"], color, atol=1e-3)
    np.testing.assert_allclose(data["ijkToLPS"], expected_lps, atol=1e-4)
    voxels = data["voxels"]  # slicerio: [i, j, k]
    np.testing.assert_array_equal(np.transpose(voxels, (2, 1, 0)), labels)
    # .seg.nrrd with Slicer's storage node
    loaded = slicer.vtkMRMLSegmentationNode()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(seg_path))
    assert storage.ReadData(loaded)
    assert [m[1:] for m in support.segment_metadata(loaded)] == [
        m[1:] for m in support.segment_metadata(segmentation) if m[0] in organs]
    np.testing.assert_array_equal(mc.segmentMask(loaded, ids["spleen"], volume), labels == 4)


def test_export_never_overwrites_unless_asked(chaos, painted, tmp_path):
    _, volume, _ = chaos
    segmentation, _, _ = painted
    target = tmp_path / "existing.seg.nrrd"
    target.write_text("keep me")
    with pytest.raises(FewShotSAMSlicerError, match="already exists"):
        exporting.exportSegmentation(segmentation, volume, str(target))
    assert target.read_text() == "keep me"
    exporting.exportSegmentation(segmentation, volume, str(target), overwrite=True)
    assert target.stat().st_size > 100
    with pytest.raises(FewShotSAMSlicerError, match="use one of"):
        exporting.exportSegmentation(segmentation, volume, labelmapPath=str(tmp_path / "x.txt"))
