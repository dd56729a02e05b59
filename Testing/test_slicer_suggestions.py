"""'Paint slice N next' in the scene: engine reports -> one suggestion per segment, and the jump to its slice.

Real MRML nodes (slicer-core): a CHAOS volume with its own geometry, a segmentation, slice nodes. The reports have
the engine's format (FewShotSAMLib.confidence.ConfidenceReport.as_json, written here from its own classes), so a
change there that breaks the module fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer_extension_support as support

slicer = support.import_slicer()

from FewShotSAMLib.confidence import build_report  # noqa: E402
from FewShotSAMLib.volume import Segment  # noqa: E402
from FewShotSAMSlicerLib import mrml_conversion as mc  # noqa: E402
from FewShotSAMSlicerLib import suggestions as sg  # noqa: E402


@pytest.fixture(scope="module")
def chaos():
    scene = support.new_scene()
    volume = support.load_volume(scene, support.chaos_dir() / f"image_{support.CHAOS_CASE}.nii.gz", "chaos image")
    return scene, volume


def engine_report(n_slices: int, doubtful: dict[int, int], painted: list[int], axis: int = 0) -> dict:
    """An engine report for structures 1 and 2 in which structure s is unsure only around slice doubtful[s]."""
    disagreement, union = np.zeros((n_slices, 2)), np.full((n_slices, 2), 100.0)
    for structure, index in doubtful.items():
        disagreement[index, structure - 1] = 40 + 10 * structure
    segments = [Segment("liver", 1), Segment("spleen", 2)]
    return build_report(disagreement, union, painted, segments, axis).as_json()


def test_each_segment_gets_its_suggested_slice_least_sure_first(chaos):
    scene, volume = chaos
    n_slices = mc.volumeShape(volume)[0]
    # Two worker runs (segments painted on different slices), label values 1..4 across both, as the logic writes.
    first = engine_report(n_slices, {1: 20, 2: 8}, painted=[14])
    second = engine_report(n_slices, {1: 4}, painted=[16])
    second["structures"][0]["label_value"], second["structures"][1]["label_value"] = 3, 4
    ids = ["Liver", "Spleen", "Kidney", "Notes"]
    names = {"Liver": "liver", "Spleen": "spleen", "Kidney": "right kidney", "Notes": "notes"}
    found = sg.suggestionsFromReports([first, second], ids, names, volume, axis=0)
    assert {(s.segmentId, s.sliceIndex) for s in found} == {("Liver", 20), ("Spleen", 8), ("Kidney", 4)}
    assert [s.confidence for s in found] == sorted(s.confidence for s in found)
    assert "paint slice 8 next" in next(s.text for s in found if s.segmentId == "Spleen")


def test_the_suggested_point_lies_on_the_suggested_slice_and_the_views_jump_there(chaos):
    scene, volume = chaos
    [suggestion] = [s for s in sg.suggestionsFromReports([engine_report(mc.volumeShape(volume)[0], {1: 25}, [14])],
                                                         ["Liver", "Spleen"], {}, volume, axis=0)
                    if s.segmentId == "Liver"]
    rasToIjk = np.linalg.inv(mc.ijkToRas(volume))
    ijk = rasToIjk @ np.array([*suggestion.rasPoint, 1.0])
    assert ijk[2] == pytest.approx(25)  # array axis 0 is k
    red = slicer.vtkMRMLSliceNode()
    red.SetName("Red")
    red.SetLayoutName("Red")  # a new slice node looks along RAS z: axial
    scene.AddNode(red)
    sg.jumpToSuggestion(scene, suggestion)
    assert red.GetSliceOffset() == pytest.approx(suggestion.rasPoint[2], abs=1e-3)


def test_a_report_along_another_axis_is_not_shown(chaos):
    scene, volume = chaos
    report = engine_report(mc.volumeShape(volume)[0], {1: 20}, [14], axis=2)
    assert sg.suggestionsFromReports([report, None], ["Liver", "Spleen"], {}, volume, axis=0) == []
