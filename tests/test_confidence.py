"""Confidence per slice and "paint slice N next": the rule on known inputs, then a real run on a CHAOS scan."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FewShotSAMLib.cli import main
from FewShotSAMLib.confidence import MIN_GAP, ConfidenceRecorder, default_report_path, suggest_slice
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import Segment

SIZE = 64  # model-input pixels of the hand-made slices


def square(top: int, left: int, side: int) -> torch.Tensor:
    probability = torch.zeros(SIZE, SIZE)
    probability[top:top + side, left:left + side] = 0.9
    return probability


def test_a_thin_boundary_band_is_not_doubt_but_a_missing_blob_is():
    recorder = ConfidenceRecorder()
    recorder.begin(3, [Segment("liver", 1)], painted=[0], slice_axis=0)
    recorder.add(1, 0, square(10, 10, 30), square(11, 11, 29))  # the masks differ by a 1-pixel band only
    recorder.add(2, 0, square(10, 10, 30), square(10, 10, 15))  # the decoder misses three quarters
    report = recorder.report()
    liver = report.structures[0]
    assert liver.slice_confidence[1] == 1.0
    assert liver.slice_confidence[2] == pytest.approx(1 - (900 - 225) / 900)
    assert liver.least_confident[0][0] == 2
    assert liver.confidence == pytest.approx(1 - 675 / 1800)


def test_the_suggestion_is_the_most_doubtful_neighbourhood_away_from_the_painting():
    doubt = np.zeros(30)
    doubt[10] = 50  # next to the painted slice 11: not allowed
    doubt[20:23] = [30, 40, 30]  # a doubtful stretch
    doubt[27] = 60  # one doubtful slice alone
    assert suggest_slice(doubt, painted=[11]) == 21
    assert abs(suggest_slice(doubt, painted=[11, 21]) - 21) >= MIN_GAP
    assert suggest_slice(np.zeros(30), painted=[5]) is None
    assert suggest_slice(doubt, painted=list(range(30))) is None


@pytest.mark.parametrize("out, expected", [("a/liver.seg.nrrd", "a/liver.report.json"),
                                           ("scan.nii.gz", "scan.report.json"), ("x.nrrd", "x.report.json")])
def test_the_default_report_lies_beside_the_segmentation(out, expected):
    assert str(default_report_path(out)) == expected


def test_a_report_that_cannot_be_written_stops_the_run_before_it_starts(tmp_path, capsys):
    existing = tmp_path / "mine.json"
    existing.write_text("precious")
    image = tmp_path / "missing.nrrd"  # never read: the report is checked first
    for report, fragment in ((existing, "--overwrite"), (tmp_path / "report.txt", "unknown file type")):
        code = main(["propagate", str(image), "--labels", str(image), "--out", str(tmp_path / "o.nrrd"),
                     "--report", str(report)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0] and str(report.name) in lines[0]
    assert existing.read_text() == "precious"
    assert not (tmp_path / "o.nrrd").exists()


def slice_dice(predicted: np.ndarray, truth: np.ndarray, z: int) -> float:
    both = predicted[z].sum() + truth[z].sum()
    return 1.0 if both == 0 else 2 * (predicted[z] & truth[z]).sum() / both


def test_report_on_a_real_scan_points_away_from_the_painting_and_at_worse_slices(tmp_path, chaos_scan,
                                                                                engine_cache_dir, capsys):
    """CHAOS scan 2, one painted slice per organ: the printed and written report, and whether the slices it is
    least sure of are really worse than the others (per-slice Dice against the manual reference)."""
    image_path, label_path = chaos_scan(2)
    reference_image = sitk.ReadImage(str(label_path))
    reference = sitk.GetArrayFromImage(reference_image).astype(np.int32)
    painted = few_shot_labels(reference, 0, 1, [1, 2, 3, 4])
    painted_image = sitk.GetImageFromArray(painted.astype(np.uint8))
    painted_image.CopyInformation(reference_image)
    painted_path = tmp_path / "painted.nii.gz"
    sitk.WriteImage(painted_image, str(painted_path))
    out, report_path = tmp_path / "result.nii.gz", tmp_path / "advice.json"
    code = main(["propagate", str(image_path), "--labels", str(painted_path), "--out", str(out), "--cache-dir",
                 str(engine_cache_dir), "--device", "cpu", "--progress", "none", "--report", str(report_path)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"wrote {report_path}" in printed and "paint slice" in printed and "(label 1)" in printed

    report = json.loads(report_path.read_text())
    painted_slices = sorted({int(z) for z in np.flatnonzero(painted.any(axis=(1, 2)))})
    assert report["slice_axis"] == 0 and report["painted_slices"] == painted_slices
    assert [s["label_value"] for s in report["structures"]] == [1, 2, 3, 4]
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    doubtful_dice, other_dice = [], []
    for structure in report["structures"]:
        suggested = structure["suggested_slice"]
        assert suggested is not None and 0 <= suggested < reference.shape[0]
        assert min(abs(suggested - z) for z in painted_slices) >= MIN_GAP
        assert 0 <= structure["confidence"] <= 1
        value = structure["label_value"]
        scored = {int(z): slice_dice(predicted == value, reference == value, int(z))
                  for z in structure["slice_confidence"] if int(z) not in painted_slices}
        doubtful = {entry["slice"] for entry in structure["least_confident"]} - set(painted_slices)
        doubtful_dice += [scored[z] for z in doubtful if z in scored]
        other_dice += [dice for z, dice in scored.items() if z not in doubtful]
    assert np.mean(doubtful_dice) < np.mean(other_dice)
