"""The zoomed second look at small structures (FewShotSAMLib/zoom.py): which structures it takes, the crop's
geometry on oblique, flipped and permuted volumes, what pasting may change, and a real run on the 512x512 CT."""

from __future__ import annotations

import numpy as np
import pytest

from FewShotSAMLib.embedding_cache import EmbeddingCache
from FewShotSAMLib.errors import Cancelled
from FewShotSAMLib.metrics import dice
from FewShotSAMLib.orientation import in_plane_spacing, to_slices
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import Geometry, LabelVolume, Segment, Volume
from FewShotSAMLib.volume_io import read_labels, read_volume
from FewShotSAMLib.zoom import ZoomBox, ZoomOptions, crop_geometry, crop_pair, paste, zoom_boxes
from tests.geometry_helpers import rotation

GRID = 64  # LiteMedSAM's embedding grid


def box_mask(shape, rows, cols) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_only_structures_under_the_cell_limit_are_zoomed_into_a_square_of_millimetres():
    # A 512x512 slice of 1 mm x 0.5 mm pixels (512 mm x 256 mm): one embedding cell is 8 mm.
    shape, spacing = (512, 512), (1.0, 0.5)
    small = box_mask(shape, (100, 130), (300, 340))  # 30 mm x 20 mm: under 4 cells
    large = box_mask(shape, (300, 420), (20, 200))  # 120 mm: 15 cells
    painted = np.zeros((3,) + shape, dtype=np.int32)
    painted[1][small], painted[1][large] = 1, 2
    boxes = zoom_boxes(painted, painted, [1, 2], spacing, GRID, ZoomOptions(fill=0.25))
    assert [box.value for box in boxes] == [1]
    box = boxes[0]
    rows_mm = (box.rows.stop - box.rows.start) * spacing[0]
    cols_mm = (box.cols.stop - box.cols.start) * spacing[1]
    assert rows_mm == pytest.approx(120, abs=1) and cols_mm == pytest.approx(120, abs=1)  # 30 mm / 0.25, square
    cropped = small[box.rows, box.cols]
    assert cropped.sum() == small.sum()  # the whole structure inside
    centre = np.argwhere(cropped).mean(axis=0)
    assert centre == pytest.approx(np.array(cropped.shape) / 2 - 0.5, abs=1)  # and in the middle


def test_a_crop_near_the_edge_moves_inside_and_a_weak_magnification_is_not_worth_it():
    shape, spacing = (256, 256), (1.0, 1.0)
    painted = np.zeros((2,) + shape, dtype=np.int32)
    painted[0][box_mask(shape, (0, 20), (240, 256))] = 1  # 20 mm: 5 cells, in a corner
    box, = zoom_boxes(painted, painted, [1], spacing, GRID, ZoomOptions(fill=0.25))
    assert (box.rows.start, box.rows.stop) == (0, 80) and (box.cols.start, box.cols.stop) == (176, 256)
    # The whole-slice result spreads the structure over 200 mm: a crop around it would magnify 256 / 800 < 2.
    engine = painted.copy()
    engine[1][box_mask(shape, (0, 200), (0, 20))] = 1
    assert zoom_boxes(painted, engine, [1], spacing, GRID, ZoomOptions(fill=0.25)) == []
    assert zoom_boxes(painted, painted, [1], spacing, GRID, ZoomOptions(enabled=False)) == []


@pytest.mark.parametrize("direction", [np.eye(3), rotation("z", 20) @ rotation("x", 30), np.diag([-1.0, 1.0, -1.0])],
                         ids=["identity", "oblique", "flipped"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_every_voxel_of_the_crop_lies_where_it_lay_in_the_scan(direction, axis):
    geometry = Geometry(spacing=(0.7, 1.1, 2.5), origin=(-30.0, 12.0, 75.0), direction=direction, shape=(20, 30, 40))
    box = ZoomBox(1, slice(3, 11), slice(5, 17))
    cropped = crop_geometry(geometry, axis, box)
    expected_shape = list(geometry.shape)
    others = [a for a in (0, 1, 2) if a != axis]
    expected_shape[others[0]], expected_shape[others[1]] = 8, 12
    assert cropped.shape == tuple(expected_shape)
    assert cropped.spacing == geometry.spacing and np.array_equal(cropped.direction, geometry.direction)
    for kji in [(0, 0, 0), (2, 5, 7), (5, 7, 3)]:
        in_crop = np.array(kji)
        in_scan = in_crop.copy()
        in_scan[others[0]] += 3
        in_scan[others[1]] += 5
        at_crop = cropped.ijk_to_lps() @ np.append(in_crop[::-1], 1.0)
        at_scan = geometry.ijk_to_lps() @ np.append(in_scan[::-1], 1.0)
        assert at_crop == pytest.approx(at_scan)


def test_the_crop_keeps_only_the_boxed_structures_painting():
    geometry = Geometry(spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0), shape=(4, 10, 10))
    labels = np.zeros(geometry.shape, dtype=np.int16)
    labels[1, 2:4, 2:4], labels[1, 3:5, 5:7] = 1, 2
    segments = [Segment("a", 1), Segment("b", 2)]
    volume = Volume(np.arange(400, dtype=np.float32).reshape(geometry.shape), geometry, "CT")
    crop_volume, crop_labels = crop_pair(volume, LabelVolume(labels, geometry, segments), 0,
                                         ZoomBox(1, slice(1, 6), slice(1, 8)))
    assert crop_volume.array.shape == (4, 5, 7) and crop_volume.modality == "CT"
    assert np.array_equal(crop_volume.array, volume.array[:, 1:6, 1:8])
    assert np.array_equal(np.unique(crop_labels.array), [0, 1]) and crop_labels.segments == [segments[0]]
    assert crop_labels.array.dtype == labels.dtype and crop_labels.geometry == crop_volume.geometry


def test_pasting_replaces_the_structure_inside_its_box_and_never_takes_another():
    predicted = np.zeros((2, 10, 10), dtype=np.int32)
    predicted[0, 2:5, 2:5] = 1  # the whole-slice outline of structure 1
    predicted[0, 5:8, 5:8] = 2  # a neighbour
    box = ZoomBox(1, slice(1, 9), slice(1, 9))
    zoomed = np.zeros((2, 8, 8), dtype=np.int32)
    zoomed[0, 3:6, 3:6] = 1  # moved by 2 voxels, overlapping the neighbour at [5, 5]
    zoomed[1, 0, 0] = 1
    result = paste(predicted, zoomed, 0, box)
    expected = predicted.copy()
    expected[expected == 1] = 0
    expected[0, 4:7, 4:7][expected[0, 4:7, 4:7] == 0] = 1
    expected[1, 1, 1] = 1
    assert np.array_equal(result, expected)
    assert (result == 2).sum() == 9 and predicted[0, 2, 2] == 1  # the input is left as it was


@pytest.fixture
def ct512(shared_data_file):
    volume = read_volume(shared_data_file("totalsegmentator_ct_mr/ct_dicom_20slices.nii.gz"))
    labels = read_labels(shared_data_file("totalsegmentator_ct_mr/ct_dicom_20slices_seg_total_on_dicom_grid.nii.gz"),
                         volume)
    return volume, labels


def cached_slices(folder) -> dict[str, int]:
    return {entry.key: entry.n_done for entry in EmbeddingCache(folder).entries()}


def test_a_real_adrenal_gland_on_a_512_ct_is_zoomed_through_its_own_cached_crop(ct512, cache_with_shared_encoders):
    volume, labels = ct512
    adrenal = 8  # TotalSegmentator's right adrenal gland: 13x27 voxels of 0.98 mm at its widest, 11 slices
    reference = np.where(labels.array == adrenal, adrenal, 0)
    cache = cache_with_shared_encoders("zoom-cache")
    engine = Engine(EngineOptions(cache_dir=str(cache), device="cpu", encoder="onnx"))
    axis = engine.slice_axis(volume)
    painted = few_shot_labels(reference, axis, 1, [adrenal])
    painting = LabelVolume(painted, volume.geometry, [Segment("adrenal gland", adrenal)])
    events = []
    zoomed = engine.propagate(volume, painting, Progress(events.append))
    stages = [event.stage for event in events]
    assert "zoom" in stages
    zoom_fractions = [event.fraction for event in events if event.stage == "zoom"]
    assert zoom_fractions == sorted(zoom_fractions)  # the nested run's stages never move the bar back
    assert all(event.message.startswith("zoom: ") for event in events if event.stage == "zoom")
    engine.options.zoom.enabled = False
    whole_slice = engine.propagate(volume, painting).array
    engine.options.zoom.enabled = True
    painted_slices = to_slices(painted, axis)
    box, = zoom_boxes(painted_slices, to_slices(whole_slice, axis), [adrenal],
                      in_plane_spacing(volume.geometry, axis), GRID, engine.options.zoom)
    outside = np.ones(to_slices(whole_slice, axis).shape, dtype=bool)
    outside[:, box.rows, box.cols] = False
    assert not to_slices(zoomed.array, axis)[outside].any()  # the structure only inside its crop
    assert not np.array_equal(zoomed.array, whole_slice)
    # Found: measured 0.750 zoomed against 0.732 whole-slice (ONNX Runtime fp32; the adrenal alone painted, k = 1).
    assert dice(zoomed.array == adrenal, reference == adrenal) > 0.65
    # The crop's embeddings are cached like any scan's, under their own key: a second run encodes nothing.
    entries = cached_slices(cache)
    assert len(entries) == 2
    engine.propagate(volume, painting)
    assert cached_slices(cache) == entries
    # Cancel reaches the crop's run: the whole run stops with nothing returned.
    seen = []
    with pytest.raises(Cancelled):
        engine.propagate(volume, painting, Progress(seen.append, cancel=lambda: any(e.stage == "zoom" for e in seen)))


def test_no_chaos_organ_and_no_hippocampus_is_zoomed(chaos_benchmark_paintings, hippocampus_benchmark_paintings):
    """The zoom needs only the painting to decline (the whole-slice result can only widen the crop): every CHAOS
    organ at k = 1-10 spans 8 or more cells, and the hippocampus crops are already magnified 5x."""
    options = ZoomOptions()
    assert len(chaos_benchmark_paintings) == 12 * 4
    for case, k, painted, spacing in chaos_benchmark_paintings:
        assert zoom_boxes(painted, painted, [1, 2, 3, 4], spacing, GRID, options) == [], (case, k)
    assert len(hippocampus_benchmark_paintings) == 10 * 3
    for scan, k, painted, spacing in hippocampus_benchmark_paintings:
        assert zoom_boxes(painted, painted, [1, 2], spacing, GRID, options) == [], (scan, k)


def test_the_command_line_turns_the_zoom_off_only_when_asked():
    from FewShotSAMLib.cli import build_parser, engine_options

    arguments = ["propagate", "scan.nrrd", "--labels", "painted.seg.nrrd", "--out", "result.seg.nrrd"]
    assert engine_options(build_parser().parse_args(arguments)).zoom.enabled
    assert not engine_options(build_parser().parse_args(arguments + ["--no-zoom"])).zoom.enabled
