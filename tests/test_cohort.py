"""Cohort runs on Dask: a .fsam adapted on one real CHAOS scan, applied to four others by a LocalCluster of two
single-threaded worker processes, against the single-process `apply`.

To keep this quick the scans are cropped copies (CROP_SLICES slices around the liver's middle) and every test
shares one embedding cache: the reference run encodes each scan once, the cluster reads the embeddings back.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("distributed", reason="the cohort extra is not installed: pip install -e '.[cohort]'")

from distributed import Client, LocalCluster

from FewShotSAMLib.cli import main
from FewShotSAMLib.cohort import apply_cohort, dask_client, environment_kept, workers_on_this_machine
from FewShotSAMLib.cohort_inputs import find_scans, output_paths
from FewShotSAMLib.cohort_report import StructureMeasure, read_summary_csv
from FewShotSAMLib.pipeline import EngineOptions, adapt_files, apply_files
from FewShotSAMLib.second_pass import SecondPassOptions
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import LabelVolume, Segment
from FewShotSAMLib.volume_io import read_labels, read_volume, write_segmentation

ADAPT_CASE = 2
APPLY_CASES = (1, 3, 5, 8)
CROP_SLICES = 10
ORGANS = [Segment("liver", 1), Segment("right kidney", 2), Segment("left kidney", 3), Segment("spleen", 4)]


def crop_copy(image_path, label_path, folder, name):
    """CROP_SLICES axial slices around the middle of the liver (CHAOS slices are the last image axis)."""
    image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    liver = np.flatnonzero((sitk.GetArrayFromImage(labels) == 1).any(axis=(1, 2)))
    first = max(0, int(liver.mean()) - CROP_SLICES // 2)
    last = min(image.GetSize()[2], first + CROP_SLICES)
    image_out, labels_out = folder / f"{name}.nii.gz", folder / f"{name}_labels.nii.gz"
    sitk.WriteImage(image[:, :, first:last], str(image_out))  # slicing keeps spacing and direction, moves the origin
    sitk.WriteImage(labels[:, :, first:last], str(labels_out))
    return image_out, labels_out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, chaos_scan, engine_cache_dir):
    """The model (.fsam), the four cropped scans to apply it to, and the single-process apply's outputs."""
    root = tmp_path_factory.mktemp("cohort")
    scans_folder = root / "scans"
    scans_folder.mkdir()
    adapt_image, adapt_labels = crop_copy(*chaos_scan(ADAPT_CASE), root, "adapt")
    image = read_volume(adapt_image)
    painted = few_shot_labels(read_labels(adapt_labels, image).array, 0, 2, [1, 2, 3, 4])
    painted_path = write_segmentation(root / "painted.seg.nrrd", LabelVolume(painted, image.geometry, ORGANS))
    # One prediction per scan: these tests are about the cluster, not accuracy (tests/test_second_pass.py).
    options = EngineOptions(cache_dir=str(engine_cache_dir), device="cpu", second_pass=SecondPassOptions(enabled=False))
    model = adapt_files([(adapt_image, painted_path)], root / "abdomen.fsam", options)
    scans = [crop_copy(*chaos_scan(case), scans_folder, f"case{case}")[0] for case in APPLY_CASES]
    for case in APPLY_CASES:
        (scans_folder / f"case{case}_labels.nii.gz").unlink()  # the folder then holds only scans
    reference = apply_files(model, [str(scan) for scan in scans], root / "single-process", options)
    return {"root": root, "model": model, "scans": scans, "folder": scans_folder, "options": options,
            "reference": reference}


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each; Dask replaces a worker that dies."""
    with environment_kept(), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                          silence_logs=40) as local_cluster, Client(local_cluster) as client:
        yield local_cluster, client


def assert_same_results(outputs, reference):
    assert len(outputs) == len(reference)
    for output, expected in zip(outputs, reference):
        assert output.name == expected.name
        image = read_volume(expected)  # the result's own grid: identical geometry is part of identical
        ours, theirs = read_labels(output, image), read_labels(expected, image)
        assert np.array_equal(ours.array, theirs.array), f"{output} differs from the single-process {expected}"
        assert [(s.name, s.label_value) for s in ours.segments] == [(s.name, s.label_value) for s in theirs.segments]


def test_cluster_outputs_equal_single_process_apply_and_rerun_skips(cohort, cluster, tmp_path):
    _, client = cluster
    # so the whole cohort encodes with the path `auto` picks in this process, whatever the workers' thread count
    assert workers_on_this_machine(client)
    out = tmp_path / "results"
    summary = apply_cohort(cohort["model"], [str(cohort["folder"])], out, cohort["options"], scheduler=client)
    assert [row["status"] for row in summary.rows] == ["ok"] * 4, summary.rows
    outputs = [out / expected.name for expected in cohort["reference"]]
    assert_same_results(outputs, cohort["reference"])

    rows = read_summary_csv(out / "summary.csv")
    assert [row["path"] for row in rows] == [str(scan) for scan in cohort["scans"]]
    for row in rows:
        assert float(row["liver_volume_ml"]) > 100, row  # ten 7.7 mm slices through the middle of a liver
        assert 1 <= int(row["liver_slices"]) <= CROP_SLICES
        assert 0 < float(row["liver_confidence"]) <= 1
        assert float(row["seconds"]) > 0

    modified = [output.stat().st_mtime_ns for output in outputs]
    again = apply_cohort(cohort["model"], [str(cohort["folder"])], out, cohort["options"], scheduler=client)
    assert [row["status"] for row in again.rows] == ["skipped"] * 4
    assert [output.stat().st_mtime_ns for output in outputs] == modified
    # A skipped scan's measures are read back from its result: the same numbers as when it was made.
    for first, second in zip(summary.rows, again.rows):
        assert first["liver_volume_ml"] == second["liver_volume_ml"]
        assert first["spleen_slices"] == second["spleen_slices"]
        assert first["liver_confidence"] == second["liver_confidence"]  # kept from the first run's summary


def test_a_killed_worker_still_yields_every_output(cohort, cluster, tmp_path):
    _, client = cluster
    out = tmp_path / "results"
    killed = []

    def kill_a_busy_worker():
        # Wait until a worker is segmenting a scan, then kill its process outright (as the OOM killer would).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = [address for address, tasks in client.processing().items() if tasks]
            if busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    summary = apply_cohort(cohort["model"], [str(cohort["folder"])], out, cohort["options"],
                           scheduler=client.scheduler.address)
    killer.join()
    assert killed, "no worker was busy to be killed"
    assert [row["status"] for row in summary.rows] == ["ok"] * 4, summary.rows
    assert_same_results([out / expected.name for expected in cohort["reference"]], cohort["reference"])
    client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed one for the tests that follow


def test_a_corrupt_scan_is_one_failed_row(cohort, cluster, tmp_path):
    _, client = cluster
    folder = tmp_path / "scans"
    folder.mkdir()
    first, second = (shutil.copy(scan, folder) for scan in cohort["scans"][:2])  # same voxels: cached embeddings
    corrupt = folder / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    listing = tmp_path / "scans.txt"
    listing.write_text("\n".join(["scans/" + Path(first).name, "scans/corrupt.nii.gz", str(second)]) + "\n")
    out = tmp_path / "results"
    summary = apply_cohort(cohort["model"], [str(listing)], out, cohort["options"], scheduler=client)
    assert [row["status"] for row in summary.rows] == ["ok", "failed", "ok"]
    failed = summary.rows[1]
    assert "corrupt.nii.gz" in failed["error"] and "cannot read" in failed["error"]
    assert failed["liver_volume_ml"] == ""
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["summary.csv", cohort["reference"][0].name, cohort["reference"][1].name])


def test_cli_apply_with_a_scheduler_and_a_glob(cohort, cluster, tmp_path, capsys):
    local_cluster, _ = cluster
    out = tmp_path / "results"
    code = main(["apply", str(cohort["model"]), str(cohort["folder"] / "case*.nii.gz"), "--out-dir", str(out),
                 "--scheduler", local_cluster.scheduler_address, "--cache-dir", cohort["options"].cache_dir,
                 "--device", "cpu", "--progress", "none", "--no-second-pass"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "4 scans: 4 ok, 0 skipped, 0 failed" in printed.out
    assert_same_results([out / expected.name for expected in cohort["reference"]], cohort["reference"])
    assert len(read_summary_csv(out / "summary.csv")) == 4


def test_in_process_run_with_overwrite_redoes_a_finished_scan(cohort, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    earlier = out / cohort["reference"][0].name
    earlier.write_bytes(b"an earlier result, to be replaced")
    summary = apply_cohort(cohort["model"], [str(cohort["scans"][0])], out, cohort["options"], workers=0,
                           overwrite=True)
    assert summary.counts == {"ok": 1, "skipped": 0, "failed": 0}
    assert_same_results([earlier], cohort["reference"][:1])


# ----------------------------------------------------------------------------------------------------------------
# Inputs (no model needed)


def write_image(path, slices=3):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((slices, 8, 8), np.int16)), str(path))
    return path


def test_inputs_globs_folders_lists_and_dicom_series(tmp_path):
    archive = tmp_path / "archive"
    for patient in ("p1", "p2"):
        (archive / patient).mkdir(parents=True)
        write_image(archive / patient / "image.nii.gz")
        write_image(archive / patient / "image_fewshotsam.seg.nrrd")  # an earlier output: not a scan
    dicom = archive / "p3" / "series"
    dicom.mkdir(parents=True)
    volume = sitk.GetImageFromArray(np.arange(3 * 8 * 8, dtype=np.int16).reshape(3, 8, 8))
    for index in range(3):
        slice_image = volume[:, :, index]
        for tag, value in (("0020|000e", "1.2.3.4"), ("0020|0013", str(index + 1)), ("0008|0060", "MR"),
                           ("0020|0032", f"0\\0\\{index}"), ("0020|0037", "1\\0\\0\\0\\1\\0")):
            slice_image.SetMetaData(tag, value)
        sitk.WriteImage(slice_image, str(dicom / f"slice{index}.dcm"))
    expected = [archive / "p1" / "image.nii.gz", archive / "p2" / "image.nii.gz", dicom]
    assert find_scans([str(archive)]) == expected
    assert find_scans([str(archive / "**" / "image.nii.gz")]) == expected[:2]
    assert find_scans([str(dicom)]) == [dicom]

    listing = tmp_path / "scans.csv"
    listing.write_text("id,path\n1,archive/p2/image.nii.gz\n2,archive/p1/image.nii.gz\n3,missing.nii.gz\n")
    assert find_scans([str(listing)]) == [expected[1], expected[0], tmp_path / "missing.nii.gz"]
    # Two scans called image.nii.gz: their patient folders are mirrored, so the outputs never collide.
    outputs = output_paths(expected, tmp_path / "out")
    assert outputs == [tmp_path / "out" / "p1" / "image_fewshotsam.seg.nrrd",
                       tmp_path / "out" / "p2" / "image_fewshotsam.seg.nrrd",
                       tmp_path / "out" / "p3" / "series_fewshotsam.seg.nrrd"]


def test_a_glob_that_matches_nothing_is_one_clear_error(tmp_path, capsys):
    from FewShotSAMLib.errors import FewShotSAMError

    with pytest.raises(FewShotSAMError, match="no file or folder matches"):
        find_scans([str(tmp_path / "*.nii.gz")])


def test_flags_name_absent_outlying_and_low_confidence_structures():
    from FewShotSAMLib.cohort_report import flag_rows, row_for

    liver = [Segment("liver", 1)]
    volumes = {"a": 1000.0, "b": 1100.0, "c": 900.0, "d": 2500.0, "e": 0.0}
    rows = [row_for(name, f"{name}.seg.nrrd", "ok", "", 1.0, liver, {1: StructureMeasure(volume, 5, 0.9)})
            for name, volume in volumes.items()]
    rows.append(row_for("f", "f.seg.nrrd", "ok", "", 1.0, liver, {1: StructureMeasure(950.0, 5, 0.3)}))
    rows.append(row_for("g", "g.seg.nrrd", "failed", "cannot read g", 0.0, [], None))
    flag_rows(rows, liver)
    flags = {row["path"]: row["flags"] for row in rows}
    assert flags == {"a": "", "b": "", "c": "", "d": "liver: volume 2.50x the cohort median", "e": "liver: absent",
                     "f": "liver: low confidence 0.30", "g": ""}


def test_a_local_cluster_leaves_this_process_environment_as_it_was():
    """Dask's nanny sets OMP_NUM_THREADS=1 in the process that starts a LocalCluster; programs started from this
    process afterwards (the Slicer module's worker) must not inherit it (they ran on one thread, 2x slower)."""
    before = dict(os.environ)
    with dask_client(None, workers=1, retries=0) as (client, _):
        assert set(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values()) == {"1"}  # the workers': Dask's
    assert dict(os.environ) == before
