"""The command line: end to end in a real subprocess, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSAMLib.cli import main
from FewShotSAMLib.models import save_random_checkpoint


def write_image(path, array, spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def small_scan(tmp_path):
    rng = np.random.default_rng(0)
    image = write_image(tmp_path / "image.nrrd", rng.normal(100, 20, (6, 32, 32)).astype(np.float32))
    labels = np.zeros((6, 32, 32), np.uint8)
    labels[2, 10:20, 10:20] = 1
    label_path = write_image(tmp_path / "labels.nrrd", labels)
    return image, label_path


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fewshotsam: error: ")
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


def test_missing_image(tmp_path, capsys):
    missing = tmp_path / "nope.nrrd"
    code, _, err = run_cli(capsys, "propagate", missing, "--labels", missing, "--out", tmp_path / "o.seg.nrrd")
    assert_one_line_error(code, err, "nope.nrrd")
    assert not (tmp_path / "o.seg.nrrd").exists()


def test_label_grid_differs_from_image(tmp_path, small_scan, capsys):
    image, _ = small_scan
    other = write_image(tmp_path / "other.nrrd", np.ones((6, 30, 32), np.uint8))
    code, _, err = run_cli(capsys, "propagate", image, "--labels", other, "--out", tmp_path / "o.nrrd")
    assert_one_line_error(code, err, "other.nrrd", "image.nrrd")
    assert not (tmp_path / "o.nrrd").exists()


def test_no_labelled_slice(tmp_path, small_scan, capsys):
    image, _ = small_scan
    empty = write_image(tmp_path / "empty.nrrd", np.zeros((6, 32, 32), np.uint8))
    code, _, err = run_cli(capsys, "propagate", image, "--labels", empty, "--out", tmp_path / "o.nrrd")
    assert_one_line_error(code, err, "empty")
    assert not (tmp_path / "o.nrrd").exists()


def test_label_value_absent(tmp_path, small_scan, capsys):
    image, labels = small_scan
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", tmp_path / "o.nrrd",
                           "--segments", "7")
    assert_one_line_error(code, err, "label value 7")


@pytest.mark.parametrize("shape", [(32, 32), (2, 6, 32, 32)])
def test_image_must_be_3d(tmp_path, small_scan, capsys, shape):
    _, labels = small_scan
    bad = tmp_path / "bad.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(shape, np.float32), isVector=False), str(bad))
    code, _, err = run_cli(capsys, "propagate", bad, "--labels", labels, "--out", tmp_path / "o.nrrd")
    assert_one_line_error(code, err, "bad.nrrd")


def test_nan_voxels(tmp_path, small_scan, capsys):
    _, labels = small_scan
    array = np.ones((6, 32, 32), np.float32)
    array[3, 4, 5] = np.nan
    bad = write_image(tmp_path / "nan.nrrd", array)
    code, _, err = run_cli(capsys, "propagate", bad, "--labels", labels, "--out", tmp_path / "o.nrrd")
    assert_one_line_error(code, err, "nan.nrrd", "NaN")


def test_checkpoint_that_does_not_match_the_model(tmp_path, small_scan, capsys):
    image, labels = small_scan
    checkpoint = save_random_checkpoint("litemedsam", tmp_path / "lite.pth")
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", tmp_path / "o.nrrd",
                           "--model", "sam_vit_b", "--checkpoint", checkpoint, "--cache-dir", tmp_path / "cache")
    assert_one_line_error(code, err, "lite.pth", "does not match model sam_vit_b")
    assert not (tmp_path / "o.nrrd").exists()


def test_not_a_checkpoint(tmp_path, small_scan, capsys):
    image, labels = small_scan
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", tmp_path / "o.nrrd",
                           "--model", "medsam_vit_b", "--checkpoint", junk, "--cache-dir", tmp_path / "cache")
    assert_one_line_error(code, err, "junk.pth")


def test_unwritable_output(tmp_path, small_scan, capsys):
    image, labels = small_scan
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", tmp_path / "no" / "o.nrrd")
    assert_one_line_error(code, err, "o.nrrd", "does not exist")


def test_existing_output_is_not_overwritten(tmp_path, small_scan, capsys):
    image, labels = small_scan
    existing = tmp_path / "o.nrrd"
    existing.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", existing)
    assert_one_line_error(code, err, "o.nrrd", "--overwrite")
    assert existing.read_bytes() == b"precious"


def test_cli_end_to_end_with_json_progress(tmp_path, chaos_scan, engine_cache_dir):
    """The installed entry point in a separate process, as the Slicer worker runs it."""
    from FewShotSAMLib.slice_selection import few_shot_labels
    from FewShotSAMLib.volume_io import read_labels, read_volume

    image_path, label_path = chaos_scan(2)
    reference_image = sitk.ReadImage(str(label_path))
    reference = sitk.GetArrayFromImage(reference_image).astype(np.int32)
    painted = sitk.GetImageFromArray(few_shot_labels(reference, 0, 1, [1, 2, 3, 4]).astype(np.uint8))
    painted.CopyInformation(reference_image)
    painted_path = tmp_path / "painted.nii.gz"
    sitk.WriteImage(painted, str(painted_path))
    out = tmp_path / "result.nii.gz"
    command = [sys.executable, "-m", "FewShotSAMLib", "propagate", str(image_path), "--labels", str(painted_path),
               "--out", str(out), "--cache-dir", str(engine_cache_dir), "--device", "cpu", "--progress", "json",
               "--report"]
    # No time-out of its own: its speed depends on this CPU's encoder path; CI's own limit bounds the run.
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert completed.returncode == 0, completed.stderr
    events = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    fractions = [event["fraction"] for event in events]
    assert fractions == sorted(fractions), "overall progress must never go backwards"
    # propagate has no second pass (apply's): its weight must not leave a jump to 100% at the end
    assert max(e["fraction"] for e in events if e["stage"] == "propagate") >= 0.95, events[-5:]
    report_path = tmp_path / "result.report.json"  # --report without a path: beside the output
    assert events[-1]["stage"] == "done" and events[-1]["outputs"] == [str(out), str(report_path)]
    assert events[-1]["report"] == json.loads(report_path.read_text())  # what the Slicer module reads
    assert [s["label_value"] for s in events[-1]["report"]["structures"]] == [1, 2, 3, 4]
    assert {"encode", "prompts", "tune", "propagate"} <= {event["stage"] for event in events}
    result = read_labels(out, read_volume(image_path)).array
    predicted, truth = result == 1, reference == 1
    liver = predicted.sum() and 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert liver > 0.75

    # A second run on the same output without --overwrite is refused and leaves the file as it was.
    before = out.read_bytes()
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert out.read_bytes() == before


def test_help_explains_each_option(capsys):
    with pytest.raises(SystemExit):
        main(["propagate", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--checkpoint", "--device", "--cache-dir", "--seed", "--axis", "--labelled-slices",
                   "--overwrite", "--progress"):
        assert option in text
