import os
import uuid

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from geometry_helpers import rotation

from FewShotSAMLib import volume_io
from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.orientation import slice_axis
from FewShotSAMLib.volume import Geometry, LabelVolume, Segment, Volume
from FewShotSAMLib.volume_io import (
    check_output_path,
    image_from_array,
    read_labels,
    read_volume,
    write_segmentation,
    write_volume,
)

DIRECTIONS = {
    "identity": np.eye(3),
    "oblique": rotation("z", 20) @ rotation("x", 20),  # ~20 degrees about two axes
    "flipped": np.diag([-1.0, 1.0, -1.0]),
}
SHAPE = (5, 6, 7)  # [k, j, i]


def make_geometry(direction="identity", shape=SHAPE) -> Geometry:
    return Geometry(
        spacing=(0.75, 0.8125, 2.5),
        origin=(-120.5, 33.25, -7.0),
        direction=np.asarray(DIRECTIONS[direction] if isinstance(direction, str) else direction, float),
        shape=shape,
    )


def make_volume(direction="identity", dtype=np.int16, low=-1000, high=1500, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(low, high, size=SHAPE).astype(dtype)
    return Volume(array=array, geometry=make_geometry(direction))


def make_labels(geometry: Geometry) -> np.ndarray:
    array = np.zeros(geometry.shape, np.uint8)
    array[1:3, 1:4, 2:5] = 1
    array[3:5, 2:5, 0:2] = 3
    return array


def assert_same_geometry(actual: Geometry, expected: Geometry):
    np.testing.assert_allclose(actual.spacing, expected.spacing, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=1e-4)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=1e-5)
    assert tuple(actual.shape) == tuple(expected.shape)


def folder_listing(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------------------------------
# Geometry round trips


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_write_then_read_volume_keeps_geometry_and_voxels(tmp_path, suffix, direction):
    volume = make_volume(direction)
    path = write_volume(tmp_path / f"scan{suffix}", volume)
    assert folder_listing(tmp_path) == [f"scan{suffix}"]  # no temporary left beside it
    loaded = read_volume(path)
    assert loaded.array.dtype == np.int16
    np.testing.assert_array_equal(loaded.array, volume.array)
    assert_same_geometry(loaded.geometry, volume.geometry)


def test_left_handed_direction_survives_nrrd_and_nifti(tmp_path):
    volume = make_volume(np.diag([1.0, 1.0, -1.0]))
    for suffix in (".nrrd", ".nii.gz"):
        loaded = read_volume(write_volume(tmp_path / f"scan{suffix}", volume))
        np.testing.assert_array_equal(loaded.array, volume.array)
        assert_same_geometry(loaded.geometry, volume.geometry)


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
def test_detached_header_formats_are_read(tmp_path, suffix):
    volume = make_volume("oblique")
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image_from_array(volume.array, volume.geometry), str(path))
    loaded = read_volume(path)
    np.testing.assert_array_equal(loaded.array, volume.array)
    assert_same_geometry(loaded.geometry, volume.geometry)


def new_uid() -> str:
    return "1.2.826.0.1.3680043.2.1125." + str(uuid.uuid4().int)[:20]


def write_dicom_series(folder, volume: Volume, modality="CT", prefix="slice"):
    """One file per slice with the tags that position it, as a scanner would write them."""
    folder.mkdir(exist_ok=True)
    image = image_from_array(volume.array.astype(np.int16), volume.geometry)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))  # i then j axis cosines
    series_uid, study_uid = new_uid(), new_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10g}" for v in position),
            "0020|0013": str(k + 1),
            "0018|0050": f"{volume.geometry.spacing[2]:.10g}",
            "0008|103e": f"test series {prefix}",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_image)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_dicom_series_folder_keeps_geometry_and_voxels(tmp_path, direction):
    volume = make_volume(direction)
    write_dicom_series(tmp_path / "series", volume)
    loaded = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(loaded.array, volume.array)
    assert_same_geometry(loaded.geometry, volume.geometry)
    assert loaded.modality == "CT"


def test_dicom_folder_with_two_series_reads_the_longest_and_uses_the_modality_tag(tmp_path):
    long_series = make_volume(low=0, high=100)  # not HU-like: only the tag says MR/CT
    write_dicom_series(tmp_path / "mixed", long_series, modality="MR", prefix="long")
    short = Volume(long_series.array[:3].copy(), make_geometry(shape=(3, 6, 7)))
    write_dicom_series(tmp_path / "mixed", short, modality="CT", prefix="short")
    loaded = read_volume(tmp_path / "mixed")
    assert loaded.array.shape == SHAPE
    np.testing.assert_array_equal(loaded.array, long_series.array)
    assert loaded.modality == "MR"


def test_modality_guess_from_intensities(tmp_path):
    ct_like = make_volume(low=-1024, high=1500)
    assert read_volume(write_volume(tmp_path / "ct.nrrd", ct_like)).modality == "CT"
    mr_like = make_volume(low=0, high=1200)
    assert read_volume(write_volume(tmp_path / "mr.nrrd", mr_like)).modality == "unknown"
    # HU range but fractional values: interpolated or normalised data, not trusted as CT
    fractional = Volume(ct_like.array.astype(np.float32) + 0.37, ct_like.geometry)
    assert read_volume(write_volume(tmp_path / "f.nrrd", fractional)).modality == "unknown"
    whole_floats = Volume(ct_like.array.astype(np.float64), ct_like.geometry)
    assert read_volume(write_volume(tmp_path / "w.nii.gz", whole_floats)).modality == "CT"


# --------------------------------------------------------------------------------------------------------------------
# Bad images


def assert_user_error_naming(path, call, *fragments):
    with pytest.raises(FewShotSAMError) as error:
        call()
    message = str(error.value)
    assert path.name in message, message
    assert "\n" not in message, message  # one line
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_image(tmp_path):
    path = tmp_path / "nothere.nii.gz"
    assert_user_error_naming(path, lambda: read_volume(path), "not found")


@pytest.mark.parametrize("name", ["notes.nii.gz", "garbage.nrrd", "plain.txt"])
def test_file_that_is_not_an_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n")
    assert_user_error_naming(path, lambda: read_volume(path), "cannot read")


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    folder = tmp_path / "empty_series"
    folder.mkdir()
    assert_user_error_naming(folder, lambda: read_volume(folder), "no DICOM series")


def test_2d_image(tmp_path):
    path = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.int16)), str(path))
    assert_user_error_naming(path, lambda: read_volume(path), "2D")


def test_single_slice_volume_counts_as_2d(tmp_path):
    path = tmp_path / "oneslice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 8, 9), np.int16)), str(path))
    assert_user_error_naming(path, lambda: read_volume(path), "2D")


def test_4d_image(tmp_path):
    path = tmp_path / "timeseries.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.int16), isVector=False), str(path))
    assert_user_error_naming(path, lambda: read_volume(path), "4D")


def test_multi_component_image(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    assert_user_error_naming(path, lambda: read_volume(path), "3 components")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(tmp_path, bad):
    array = np.zeros(SHAPE, np.float32)
    array[2, 3, 4] = bad
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert_user_error_naming(path, lambda: read_volume(path), "NaN or infinite")


# --------------------------------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_plain_labelmap_round_trip(tmp_path, suffix):
    volume = make_volume("oblique")
    array = make_labels(volume.geometry)
    path = write_segmentation(tmp_path / f"labels{suffix}", LabelVolume(array, volume.geometry, []))
    labels = read_labels(path, volume)
    np.testing.assert_array_equal(labels.array, array)
    assert np.issubdtype(labels.array.dtype, np.integer)
    assert [s.label_value for s in labels.segments] == [1, 3]
    assert [s.name for s in labels.segments] == ["Segment_1", "Segment_3"]
    assert labels.segments[0].color != labels.segments[1].color
    assert labels.geometry.same_grid(volume.geometry)


def test_float_labels_holding_whole_numbers_are_accepted(tmp_path):
    volume = make_volume()
    path = tmp_path / "float_labels.nii.gz"
    sitk.WriteImage(image_from_array(make_labels(volume.geometry).astype(np.float64), volume.geometry), str(path))
    labels = read_labels(path, volume)
    assert labels.array.dtype == np.uint8
    np.testing.assert_array_equal(labels.array, make_labels(volume.geometry))


def test_non_integer_labels_are_refused(tmp_path):
    volume = make_volume()
    array = make_labels(volume.geometry).astype(np.float32)
    array[0, 0, 0] = 0.5
    path = tmp_path / "probabilities.nrrd"
    sitk.WriteImage(image_from_array(array, volume.geometry), str(path))
    assert_user_error_naming(path, lambda: read_labels(path, volume), "whole numbers")


@pytest.mark.parametrize(
    "what, changed",
    [
        ("shape", dict(shape=(5, 6, 8))),
        ("spacing", dict(spacing=(0.75, 0.8125, 3.0))),
        ("origin", dict(origin=(-120.5, 33.25, -2.0))),
        ("direction", dict(direction=DIRECTIONS["flipped"])),
    ],
)
def test_label_grid_mismatch_names_both_files_and_the_difference(tmp_path, what, changed):
    volume = make_volume()
    image_path = write_volume(tmp_path / "image.nrrd", volume)
    geometry = Geometry(**{**volume.geometry.__dict__, **changed})
    label_path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(image_from_array(np.zeros(geometry.shape, np.uint8), geometry), str(label_path))
    message = assert_user_error_naming(label_path, lambda: read_labels(label_path, volume, image_path), what)
    assert image_path.name in message


def test_missing_labels_file(tmp_path):
    path = tmp_path / "labels.seg.nrrd"
    assert_user_error_naming(path, lambda: read_labels(path, make_volume()), "not found")


# --------------------------------------------------------------------------------------------------------------------
# Slicer .seg.nrrd


SEGMENTS = [Segment("liver", 1, (0.8, 0.3, 0.2)), Segment("right kidney", 3, (0.1, 0.6, 0.9))]


@pytest.mark.parametrize("direction", ["oblique", "flipped"])
def test_seg_nrrd_round_trip_through_slicerio_and_read_labels(tmp_path, direction):
    volume = make_volume(direction)
    array = make_labels(volume.geometry)
    path = write_segmentation(tmp_path / "out.seg.nrrd", LabelVolume(array, volume.geometry, SEGMENTS))

    segmentation = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in segmentation["segments"]] == ["liver", "right kidney"]
    assert [s["labelValue"] for s in segmentation["segments"]] == [1, 3]
    assert [s["layer"] for s in segmentation["segments"]] == [0, 0]
    np.testing.assert_allclose(segmentation["segments"][1]["color"], (0.1, 0.6, 0.9), atol=1e-6)
    np.testing.assert_allclose(segmentation["ijkToLPS"], volume.geometry.ijk_to_lps(), atol=1e-9)
    assert segmentation["voxels"].ndim == 3  # one layer
    np.testing.assert_array_equal(segmentation["voxels"], array.transpose(2, 1, 0))  # slicerio is [i, j, k]

    labels = read_labels(path, volume)
    np.testing.assert_array_equal(labels.array, array)
    assert labels.segments == SEGMENTS


def test_seg_nrrd_gets_a_segment_for_every_value_in_the_array(tmp_path):
    volume = make_volume()
    array = make_labels(volume.geometry)
    path = write_segmentation(tmp_path / "out.seg.nrrd", LabelVolume(array, volume.geometry, SEGMENTS[:1]))
    names = slicerio.segment_names(slicerio.read_segmentation(str(path)))
    assert names == ["liver", "Segment_3"]


def write_cropped_seg(path, volume, offset_ijk, box_shape_ijk, segments, layers=None, origin_shift=(0, 0, 0)):
    """A .seg.nrrd covering a box of the volume's grid starting at voxel offset_ijk, as Slicer saves cropped ones."""
    g = volume.geometry
    matrix = g.ijk_to_lps()
    origin = matrix @ np.array([*offset_ijk, 1.0])
    matrix[:3, 3] = origin[:3] + np.asarray(origin_shift)
    voxels = layers if layers is not None else np.zeros(box_shape_ijk, np.uint8)
    slicerio.write_segmentation(str(path), {"voxels": voxels, "ijkToLPS": matrix, "segments": segments})
    return voxels


def test_cropped_seg_nrrd_is_placed_on_the_reference_grid(tmp_path):
    volume = make_volume("oblique")
    voxels = np.zeros((3, 4, 2), np.uint8)  # [i, j, k]
    voxels[1, 2, 1] = 2
    voxels[0, 0, 0] = 2
    path = tmp_path / "cropped.seg.nrrd"
    write_cropped_seg(path, volume, (2, 1, 3), voxels.shape, [{"id": "s", "name": "tumour", "labelValue": 2}],
                      layers=voxels)
    labels = read_labels(path, volume)
    assert labels.array.shape == SHAPE
    assert np.count_nonzero(labels.array) == 2
    assert labels.array[3 + 1, 1 + 2, 2 + 1] == 2  # [k, j, i] = offset + index
    assert labels.array[3, 1, 2] == 2
    assert labels.segments[0].name == "tumour" and labels.segments[0].label_value == 2


def test_seg_nrrd_off_the_grid_is_refused(tmp_path):
    volume = make_volume()
    voxels = np.ones((2, 2, 2), np.uint8)
    half_voxel = tmp_path / "shifted.seg.nrrd"
    write_cropped_seg(half_voxel, volume, (1, 1, 1), None, [{"name": "a", "labelValue": 1}], layers=voxels,
                      origin_shift=(0.3, 0, 0))
    assert_user_error_naming(half_voxel, lambda: read_labels(half_voxel, volume), "not a whole number")
    outside = tmp_path / "outside.seg.nrrd"
    write_cropped_seg(outside, volume, (6, 1, 1), None, [{"name": "a", "labelValue": 1}], layers=voxels)
    assert_user_error_naming(outside, lambda: read_labels(outside, volume), "beyond")


def test_seg_nrrd_with_non_overlapping_layers_is_merged(tmp_path):
    volume = make_volume()
    layers = np.zeros((2, 7, 6, 5), np.uint8)  # [layer, i, j, k]
    layers[0, 0:2, 0:2, 0:2] = 1
    layers[1, 4:6, 3:5, 2:4] = 1
    path = tmp_path / "layers.seg.nrrd"
    segments = [{"name": "a", "labelValue": 1, "layer": 0}, {"name": "b", "labelValue": 1, "layer": 1}]
    write_cropped_seg(path, volume, (0, 0, 0), None, segments, layers=layers)
    labels = read_labels(path, volume)
    assert [(s.name, s.label_value) for s in labels.segments] == [("a", 1), ("b", 2)]  # renumbered: values clashed
    np.testing.assert_array_equal(labels.array == 1, layers[0].transpose(2, 1, 0) == 1)
    np.testing.assert_array_equal(labels.array == 2, layers[1].transpose(2, 1, 0) == 1)


def test_seg_nrrd_with_overlapping_segments_is_refused(tmp_path):
    volume = make_volume()
    layers = np.zeros((2, 7, 6, 5), np.uint8)
    layers[0, 0:3, 0:3, 0:3] = 1
    layers[1, 2:4, 2:4, 2:4] = 1
    path = tmp_path / "overlap.seg.nrrd"
    segments = [{"name": "liver", "labelValue": 1, "layer": 0}, {"name": "tumour", "labelValue": 1, "layer": 1}]
    write_cropped_seg(path, volume, (0, 0, 0), None, segments, layers=layers)
    assert_user_error_naming(path, lambda: read_labels(path, volume), "'liver' and 'tumour' overlap")


# --------------------------------------------------------------------------------------------------------------------
# Writers: no overwrite, no partial files, errors before work


def test_existing_output_is_not_overwritten_without_permission(tmp_path):
    volume = make_volume()
    labels = LabelVolume(make_labels(volume.geometry), volume.geometry, SEGMENTS)
    path = tmp_path / "result.seg.nrrd"
    path.write_bytes(b"precious")
    for call in (
        lambda: check_output_path(path, overwrite=False),
        lambda: write_segmentation(path, labels),
        lambda: write_volume(tmp_path / "result.seg.nrrd", volume),
    ):
        assert_user_error_naming(path, call, "exists; pass --overwrite")
    assert path.read_bytes() == b"precious"
    assert folder_listing(tmp_path) == ["result.seg.nrrd"]
    write_segmentation(path, labels, overwrite=True)
    assert [s["name"] for s in slicerio.read_segmentation(str(path))["segments"]] == ["liver", "right kidney"]


def test_unknown_output_suffix(tmp_path):
    volume = make_volume()
    path = tmp_path / "result.png"
    assert_user_error_naming(path, lambda: write_volume(path, volume), "unknown file type")
    assert folder_listing(tmp_path) == []


def test_output_folder_that_does_not_exist_or_is_a_file(tmp_path):
    volume = make_volume()
    missing = tmp_path / "nope" / "scan.nrrd"
    assert_user_error_naming(missing, lambda: write_volume(missing, volume), "does not exist")
    (tmp_path / "a_file").write_text("x")
    under_file = tmp_path / "a_file" / "scan.nrrd"
    assert_user_error_naming(under_file, lambda: write_volume(under_file, volume), "is a file, not a folder")
    assert folder_listing(tmp_path) == ["a_file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        path = folder / "scan.nrrd"
        assert_user_error_naming(path, lambda: write_volume(path, make_volume()), "not writable")
        assert folder_listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_unwritable_folder_is_reported_before_any_work(tmp_path, monkeypatch):
    # Runs as root too: the folder refuses new files, which is what check_output_path probes for.
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(volume_io, "open", refuse, raising=False)
    path = tmp_path / "scan.nii.gz"
    assert_user_error_naming(path, lambda: check_output_path(path, overwrite=True), "not writable",
                             "Permission denied")
    assert folder_listing(tmp_path) == []


@pytest.mark.parametrize("failure", [RuntimeError("ITK ERROR: disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    volume = make_volume()

    def write_half_then_fail(image, filename, *args):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise failure

    monkeypatch.setattr(volume_io.sitk, "WriteImage", write_half_then_fail)
    path = tmp_path / "scan.nii.gz"
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            write_volume(path, volume)
    else:
        assert_user_error_naming(path, lambda: write_volume(path, volume), "disk full")
    assert folder_listing(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------------
# Real data


def test_chaos_mri_image_and_labels(shared_data_file):
    image_path = shared_data_file("chaos_t2_mri/image_1.nii.gz")
    volume = read_volume(image_path)
    assert volume.array.ndim == 3 and volume.array.shape[1:] == (256, 256)
    assert volume.modality != "CT"
    assert slice_axis(volume.geometry) == 0  # axial slices along the last NIfTI axis
    labels = read_labels(shared_data_file("chaos_t2_mri/label_1.nii.gz"), volume, image_path)
    assert np.issubdtype(labels.array.dtype, np.integer)
    assert labels.array.shape == volume.array.shape
    assert {s.label_value for s in labels.segments} == {1, 2, 3, 4}  # liver, kidneys, spleen
    assert np.count_nonzero(labels.array == 1) > np.count_nonzero(labels.array == 2)  # liver is the largest


def test_totalsegmentator_ct_is_detected_as_ct(shared_data_file):
    assert read_volume(shared_data_file("totalsegmentator_ct_mr/ct_example_sm.nii.gz")).modality == "CT"
    assert read_volume(shared_data_file("totalsegmentator_ct_mr/mr_example_sm.nii.gz")).modality != "CT"
