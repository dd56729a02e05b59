"""Bad input and faults, as a hostile new user would try them: each gives one clear line (or a warning), never a
traceback or a wrong result, and loses nothing. The README's "Bad input and faults" table points here.

Small synthetic volumes written to tmp_path; the few tests that need the model share one Engine per session.
Full disks are made real with RLIMIT_FSIZE in a child process: the kernel then fails writes past the limit with
EFBIG, as it fails them with ENOSPC on a full disk, without needing root to mount a small file system.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_cli import assert_one_line_error, run_cli
from test_volume_io import write_dicom_series

from FewShotSAMLib.adapter import AdaptOptions, FewShotAdapter
from FewShotSAMLib.cli import main
from FewShotSAMLib.compiled_encoder import compiled_encoder_file, why_not_compilable
from FewShotSAMLib.demo import radiological_slices
from FewShotSAMLib.errors import FewShotSAMError, FewShotSAMWarning
from FewShotSAMLib.onnx_encoder import onnxruntime_available
from FewShotSAMLib.pipeline import Engine, EngineOptions, check_inputs
from FewShotSAMLib.preprocess import apply_normalisation, choose_normalisation
from FewShotSAMLib.prompts import PixelClassifier
from FewShotSAMLib.volume import Geometry, LabelVolume, Segment, Volume
from FewShotSAMLib.volume_io import read_labels, read_volume, write_segmentation, write_volume

TESTS = Path(__file__).resolve().parent
# Child processes run the same FewShotSAMLib as this one (the checkout under test, not an installed copy).
CODE_ROOT = Path(sys.modules[read_volume.__module__].__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CODE_ROOT), str(TESTS)]), "PYTHONWARNINGS": "ignore"}
SHAPE = (6, 32, 32)
POSIX = hasattr(os, "fork")


def geometry(shape=SHAPE, direction=None) -> Geometry:
    direction = np.eye(3) if direction is None else direction
    return Geometry((0.8, 0.8, 2.5), (-10.0, 5.0, 30.0), np.asarray(direction, float), shape)


def mr_like(shape=SHAPE, seed=0) -> np.ndarray:
    """Non-negative float "MR": dark background, a body, a bright organ."""
    rng = np.random.default_rng(seed)
    array = rng.normal(5, 1, shape).clip(0)
    array[:, 6:26, 6:26] += 300
    array[:, 10:18, 10:18] += 400
    return array.astype(np.float32)


def ct_like(shape=SHAPE) -> np.ndarray:
    """Whole-number HU "CT": air around a soft-tissue body with a bone."""
    array = np.full(shape, -1000, np.int16)
    array[:, 6:26, 6:26] = 40
    array[:, 10:18, 10:18] = 60
    array[:, 20:24, 14:18] = 700
    return array


def organ_labels(shape=SHAPE, slices=(1, 4)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    for k in slices:
        labels[k, 10:18, 10:18] = 1
    return labels


def write_array(path, array, direction=None) -> Path:
    write_volume(path, Volume(np.asarray(array), geometry(np.shape(array), direction)))
    return Path(path)


@pytest.fixture
def scan(tmp_path):
    image = write_array(tmp_path / "image.nrrd", mr_like())
    labels = write_array(tmp_path / "labels.nrrd", organ_labels())
    return image, labels


def assert_user_error(call, *fragments) -> str:
    with pytest.raises(FewShotSAMError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def run_child(code: str, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=CHILD_ENV, cwd=TESTS)


# --------------------------------------------------------------------------------------------------------------------
# Damaged image files


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_image_is_refused_not_padded_with_zeros(tmp_path, suffix):
    path = write_array(tmp_path / f"scan{suffix}", mr_like())
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    assert_user_error(lambda: read_volume(path), path.name, "cannot read")


def test_truncated_nifti_says_it_is_cut_short(tmp_path):
    path = write_array(tmp_path / "scan.nii.gz", mr_like())
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size * 2 // 3)
    assert_user_error(lambda: read_volume(path), "scan.nii.gz", "cut short")


def test_damaged_gzip_data_is_refused(tmp_path):
    path = write_array(tmp_path / "scan.nii.gz", mr_like())
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 64):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_user_error(lambda: read_volume(path), "scan.nii.gz", "cannot read")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_nifti_is_refused(tmp_path, suffix, bad):
    array = mr_like()
    array[2, 3, 4] = bad
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))  # SimpleITK reads these voxels back as 0
    assert_user_error(lambda: read_volume(path), path.name, "NaN or infinite")


def test_blank_scan_is_refused(tmp_path):
    path = write_array(tmp_path / "zeros.nii.gz", np.zeros(SHAPE, np.int16))
    assert_user_error(lambda: read_volume(path), "zeros.nii.gz", "blank")
    # The same check for a scan handed over in memory (the Slicer module)
    blank = Volume(np.zeros(SHAPE, np.float32), geometry())
    assert_user_error(lambda: check_inputs(EngineOptions(), blank), "blank")


def dicom_series(tmp_path) -> Path:
    folder = tmp_path / "series"
    write_dicom_series(folder, Volume(ct_like((8, 16, 16)), geometry((8, 16, 16)), "CT"))
    return folder


def test_dicom_series_with_a_broken_file_is_refused_naming_it(tmp_path, capfd):
    folder = dicom_series(tmp_path)
    broken = folder / "slice003.dcm"
    broken.write_bytes(broken.read_bytes()[:400])
    message = assert_user_error(lambda: read_volume(folder), "slice003.dcm", "damaged")
    assert "series" in message
    # No ITK or GDCM WARNING lines before the error
    assert "WARNING" not in capfd.readouterr().err


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    folder = dicom_series(tmp_path)
    (folder / "slice004.dcm").unlink()
    assert_user_error(lambda: read_volume(folder), "series", "not evenly spaced")


def test_reader_warnings_are_not_printed(tmp_path, capfd):
    path = write_array(tmp_path / "scan.mha", mr_like())
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    message = assert_user_error(lambda: read_volume(path), "scan.mha")
    assert "not read completely" in message  # MetaIO's own explanation, moved into the one line
    assert capfd.readouterr().err == ""


# --------------------------------------------------------------------------------------------------------------------
# Intensities: outliers and modality


def test_one_air_voxel_does_not_turn_mr_into_ct(tmp_path):
    array = mr_like().round().astype(np.int16)  # MR as scanners store it: whole numbers
    array[0, 0, 0] = -1000
    assert read_volume(write_array(tmp_path / "mr.nii.gz", array)).modality == "unknown"
    assert read_volume(write_array(tmp_path / "ct.nii.gz", ct_like())).modality == "CT"


def test_one_huge_voxel_does_not_black_out_an_mr_scan():
    clean = Volume(mr_like(), geometry())
    spiked_array = mr_like()
    spiked_array[0, 0, 0] = 1e6
    spiked = Volume(spiked_array, geometry())
    normalised = apply_normalisation(spiked.array, choose_normalisation(spiked))
    reference = apply_normalisation(clean.array, choose_normalisation(clean))
    organ = (slice(None), slice(10, 18), slice(10, 18))
    assert normalised[organ].mean() > 0.9
    normalised[0, 0, 0] = reference[0, 0, 0]  # the spike itself is clipped to 1; every other voxel is as before
    assert np.abs(normalised - reference).max() < 0.02


def test_label_map_with_too_many_values_is_refused(tmp_path):
    image = write_array(tmp_path / "image.nrrd", mr_like())
    as_labels = write_array(tmp_path / "image_as_labels.nrrd", np.arange(np.prod(SHAPE)).reshape(SHAPE) % 1000)
    assert_user_error(lambda: read_labels(as_labels, read_volume(image)), "image_as_labels.nrrd",
                      "different label values")


@pytest.mark.parametrize("values, fragment", [(-1, "negative"), (0.5, "not whole numbers")])
def test_negative_or_fractional_label_values_are_refused(tmp_path, values, fragment):
    image = write_array(tmp_path / "image.nrrd", mr_like())
    labels = organ_labels().astype(np.float32) * values
    path = write_array(tmp_path / "odd_labels.nii.gz", labels)
    assert_user_error(lambda: read_labels(path, read_volume(image)), "odd_labels.nii.gz", fragment)


def test_non_ascii_segment_names_are_kept(tmp_path):
    segments = [Segment("Niere ü", 1, (1.0, 0.0, 0.0)), Segment("肝臓", 2, (0.0, 1.0, 0.0))]
    labels = organ_labels()
    labels[3, 2:5, 2:5] = 2
    path = write_segmentation(tmp_path / "names.seg.nrrd", LabelVolume(labels, geometry(), segments))
    assert "Niere ü".encode() in path.read_bytes()[:4000]  # UTF-8 in the header, as Slicer writes it
    read = read_labels(path, Volume(mr_like(), geometry()))
    assert [(s.name, s.label_value) for s in read.segments] == [("Niere ü", 1), ("肝臓", 2)]


# --------------------------------------------------------------------------------------------------------------------
# Writing: full disks, kill -9, Ctrl+C


FULL_DISK = """
    import resource, signal

    def disk_full_after(size):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, as on a full disk with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
"""


def run_on_a_full_disk(code: str, *args) -> subprocess.CompletedProcess:
    """run_child with disk_full_after(size) defined: writes past `size` bytes of one file fail from then on."""
    return run_child(FULL_DISK + code, *args)


FULL_DISK_WRITER = """
    import json, sys
    import numpy as np
    from FewShotSAMLib.errors import FewShotSAMError
    from FewShotSAMLib.volume import Geometry, LabelVolume, Volume
    from FewShotSAMLib.volume_io import write_segmentation, write_volume
    folder = sys.argv[1]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (20, 64, 64)).astype(np.uint8)  # noise: compresses badly, so the limit is hit
    grid = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), shape=(20, 64, 64))
    volume = Volume(rng.normal(0, 1, (20, 64, 64)).astype(np.float32), grid)
    disk_full_after(20000)
    outcome = {}
    for name in ["out.nii.gz", "out.nii", "out.nrrd", "out.seg.nrrd", "out.mha", "image.nii.gz"]:
        try:
            if name.startswith("image"):
                write_volume(f"{folder}/{name}", volume)
            else:
                write_segmentation(f"{folder}/{name}", LabelVolume(labels, grid, []))
            outcome[name] = "wrote"
        except FewShotSAMError as error:
            outcome[name] = "error: " + str(error)
    print(json.dumps(outcome))
"""


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE needs a POSIX system")
def test_full_disk_while_writing_is_reported_and_leaves_nothing(tmp_path):
    child = run_on_a_full_disk(FULL_DISK_WRITER, tmp_path)
    assert child.returncode == 0, child.stderr
    outcome = json.loads(child.stdout.splitlines()[-1])
    for name, result in outcome.items():
        assert result.startswith("error: cannot write"), (name, result)
        assert "\n" not in result
    assert sorted(os.listdir(tmp_path)) == []  # no partial or temporary file left


FULL_DISK_FSAM = """
    import sys, torch
    from FewShotSAMLib.errors import FewShotSAMError
    from test_bad_input import synthetic_adapter
    disk_full_after(4000)
    try:
        synthetic_adapter(hidden=512).save(sys.argv[1])
        print("wrote")
    except FewShotSAMError as error:
        print("error:", error)
"""


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE needs a POSIX system")
def test_full_disk_while_saving_a_model(tmp_path):
    child = run_on_a_full_disk(FULL_DISK_FSAM, tmp_path / "model.fsam")
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("error: cannot write"), child.stdout + child.stderr
    assert os.listdir(tmp_path) == []


FULL_DISK_CACHE = """
    import sys
    from FewShotSAMLib.embedding_cache import EmbeddingCache
    from FewShotSAMLib.errors import FewShotSAMError
    from test_embedding_cache import N, SHAPE, Encoder
    disk_full_after(3000)
    try:
        EmbeddingCache(sys.argv[1]).get_or_compute("vol", N, SHAPE, None, Encoder())
        print("stored")
    except FewShotSAMError as error:
        print("error:", error)
"""


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE needs a POSIX system")
def test_full_disk_under_the_cache_is_one_line_and_the_cache_recovers(tmp_path):
    from test_embedding_cache import SHAPE, Encoder, N, expected

    from FewShotSAMLib.embedding_cache import EmbeddingCache

    child = run_on_a_full_disk(FULL_DISK_CACHE, tmp_path / "cache")
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("error: cannot write the embedding cache"), child.stdout + child.stderr
    encoder = Encoder()
    out = EmbeddingCache(tmp_path / "cache").get_or_compute("vol", N, SHAPE, None, encoder)
    np.testing.assert_array_equal(out, expected(range(N)))


SLOW_ENCODE = """
    import sys
    from FewShotSAMLib.embedding_cache import EmbeddingCache
    from test_embedding_cache import N, SHAPE, Encoder
    EmbeddingCache(sys.argv[1]).get_or_compute("vol", N, SHAPE, None, Encoder(delay=0.5), batch_size=1)
"""


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def done_slices(header: Path) -> int:
    try:
        return sum(crc is not None for crc in json.loads(header.read_text())["crc32"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.skipif(not POSIX, reason="SIGKILL is POSIX")
def test_kill_9_mid_encode_keeps_finished_slices_and_loses_nothing(tmp_path):
    from test_embedding_cache import SHAPE, Encoder, N, expected

    from FewShotSAMLib.embedding_cache import HEADER_FILE, EmbeddingCache

    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_ENCODE), str(tmp_path)], env=CHILD_ENV,
                             cwd=TESTS)
    header = tmp_path / "vol" / HEADER_FILE
    wait_for(lambda: done_slices(header) >= 2)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    encoder = Encoder()
    out = EmbeddingCache(tmp_path).get_or_compute("vol", N, SHAPE, None, encoder)
    np.testing.assert_array_equal(out, expected(range(N)))
    assert 0 < len(encoder.encoded) < N  # the slices finished before the kill were kept


WRITE_FOREVER = """
    import sys
    import numpy as np
    from FewShotSAMLib.volume import Geometry, LabelVolume
    from FewShotSAMLib.volume_io import write_segmentation
    labels = np.random.default_rng(0).integers(0, 3, (60, 256, 256)).astype(np.uint8)
    grid = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), shape=labels.shape)
    for value in range(1, 1000):
        labels[0, 0, 0] = value % 3
        write_segmentation(sys.argv[1], LabelVolume(labels, grid, []), overwrite=True)
        print(value, flush=True)
"""


@pytest.mark.skipif(not POSIX, reason="SIGKILL is POSIX")
def test_kill_9_mid_write_never_leaves_a_half_written_output(tmp_path):
    out = tmp_path / "result.nii.gz"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITE_FOREVER), str(out)], env=CHILD_ENV,
                             cwd=TESTS, stdout=subprocess.PIPE, text=True)
    child.stdout.readline()  # one whole write done; the next one is under way
    time.sleep(0.15)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    grid = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), shape=(60, 256, 256))
    labels = read_labels(out, Volume(np.zeros((60, 256, 256), np.float32), grid))
    assert labels.array.shape == (60, 256, 256)  # whole: the previous complete file, never a torn one


@pytest.mark.skipif(not POSIX, reason="SIGINT to a child process is POSIX")
def test_ctrl_c_stops_the_command_line_cleanly(tmp_path, scan):
    image, labels = scan
    out = tmp_path / "result.seg.nrrd"
    command = [sys.executable, "-m", "FewShotSAMLib", "propagate", str(image), "--labels", str(labels), "--out",
               str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--progress", "json"]
    # A shell starts background jobs with SIGINT ignored, and the child would inherit that (Python then installs no
    # KeyboardInterrupt handler): give it the default disposition, as a terminal would.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV,
                             cwd=TESTS, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert json.loads(child.stdout.readline())["stage"] == "load"  # inputs read; the model is loading now
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1] == "fewshotsam: interrupted; nothing was written"
    assert "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# Saved models (.fsam)


def synthetic_adapter(hidden=8, support=("unknown",), model_id="litemedsam:0123456789ab") -> FewShotAdapter:
    segments = [Segment("liver", 1, (1.0, 0.0, 0.0)), Segment("kidney", 2, (0.0, 1.0, 0.0))]
    return FewShotAdapter(segments=segments, classifier=PixelClassifier(16, 3, hidden), tokens=torch.zeros(2, 16),
                          decoder_state={"weight": torch.zeros(4)}, model_id=model_id,
                          support_modalities=list(support))


def damaged_fsam(tmp_path, change) -> Path:
    path = synthetic_adapter().save(tmp_path / "model.fsam")
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("change, fragment", [
    (lambda p: p.pop("classifier"), "missing classifier"),
    (lambda p: p.pop("tokens"), "missing tokens"),
    (lambda p: p.__setitem__("classifier_shape", [16, 8, 5]), "damaged model file"),
    (lambda p: p.__setitem__("classifier_shape", [16, 8]), "damaged model file"),
    (lambda p: p.__setitem__("tokens", torch.zeros(5, 16)), "do not match its 2 segments"),
    (lambda p: p["segments"][0].pop("label_value"), "damaged model file"),
    (lambda p: p.__setitem__("options", {"steps_of_doom": 3}), "damaged model file"),
    (lambda p: p.__setitem__("version", "one"), "no format version"),
])
def test_damaged_fsam_is_one_line(tmp_path, change, fragment):
    path = damaged_fsam(tmp_path, change)
    assert_user_error(lambda: FewShotAdapter.load(path), "model.fsam", fragment)


@pytest.mark.parametrize("content", [b"", b"not a model", "torch_dict", "state_dict"])
def test_foreign_file_as_fsam(tmp_path, content):
    path = tmp_path / "foreign.fsam"
    if content == "torch_dict":
        torch.save({"format": "something else"}, path)
    elif content == "state_dict":
        torch.save(PixelClassifier(4, 2).state_dict(), path)
    else:
        path.write_bytes(content)
    assert_user_error(lambda: FewShotAdapter.load(path), "foreign.fsam", "not a FewShotSAM model file")


def test_damaged_fsam_through_the_command_line(tmp_path, scan, capsys):
    image, _ = scan
    path = damaged_fsam(tmp_path, lambda p: p.pop("decoder"))
    code, _, err = run_cli(capsys, "apply", path, image, "--out-dir", tmp_path / "out")
    assert_one_line_error(code, err, "model.fsam", "missing decoder")
    assert not (tmp_path / "out").exists()


def test_fsam_keeps_the_support_modality_and_older_files_still_load(tmp_path):
    saved = synthetic_adapter(support=("CT", "CT")).save(tmp_path / "new.fsam")
    assert FewShotAdapter.load(saved).support_modalities == ["CT", "CT"]
    older = damaged_fsam(tmp_path, lambda p: p.pop("support_modalities"))  # as written before it was recorded
    loaded = FewShotAdapter.load(older)
    assert loaded.support_modalities == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.warn_if_unlike_support("CT")  # nothing known: no warning


def test_modality_mismatch_warns_in_one_line(capsys):
    from FewShotSAMLib.cli import _show_warning

    with pytest.warns(FewShotSAMWarning, match="adapted on non-CT") as record:
        synthetic_adapter(support=("unknown",)).warn_if_unlike_support("CT", "image ct.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synthetic_adapter(support=("MR", "unknown")).warn_if_unlike_support("unknown")
    _show_warning(record[0].message, record[0].category, "x.py", 1)
    err = capsys.readouterr().err
    assert err.startswith("fewshotsam: warning: image ct.nii.gz is CT") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------------------
# Outputs and options: checked before anything is written or the model loads


def test_output_onto_the_input_is_refused_even_with_overwrite(tmp_path, scan, capsys):
    image, labels = scan
    before = image.read_bytes()
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", image, "--overwrite")
    assert_one_line_error(code, err, "image.nrrd", "is the input")
    assert image.read_bytes() == before


def test_output_onto_a_folder_is_refused(tmp_path, scan, capsys):
    image, labels = scan
    folder = tmp_path / "result.seg.nrrd"
    folder.mkdir()
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", folder, "--overwrite")
    assert_one_line_error(code, err, "result.seg.nrrd", "it is a folder")
    assert folder.is_dir()


def test_output_under_a_file_says_so(tmp_path, scan, capsys):
    image, labels = scan
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", image / "o.seg.nrrd")
    assert_one_line_error(code, err, "is a file, not a folder")


def test_apply_out_dir_onto_a_file(tmp_path, scan, capsys):
    image, _ = scan
    model = synthetic_adapter().save(tmp_path / "model.fsam")
    code, _, err = run_cli(capsys, "apply", model, image, "--out-dir", image)
    assert_one_line_error(code, err, "image.nrrd", "is a file, not a folder")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no one may create files")
def test_apply_out_dir_in_an_unwritable_place(tmp_path, scan, capsys):
    image, _ = scan
    model = synthetic_adapter().save(tmp_path / "model.fsam")
    code, _, err = run_cli(capsys, "apply", model, image, "--out-dir", "/proc/fewshotsam-out")
    assert_one_line_error(code, err, "/proc/fewshotsam-out")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no one may create files")
def test_adapt_out_unwritable_is_checked_before_any_work(tmp_path, scan, capsys):
    image, labels = scan
    cache = tmp_path / "cache"
    code, _, err = run_cli(capsys, "adapt", "--image", image, "--labels", labels, "--out", "/proc/model.fsam",
                           "--cache-dir", cache)
    assert_one_line_error(code, err, "/proc/model.fsam", "not writable")
    assert not cache.exists()  # the model never loaded


def test_apply_checks_every_image_before_writing_anything(tmp_path, scan, capsys):
    image, _ = scan
    model = synthetic_adapter().save(tmp_path / "model.fsam")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + b"garbage")
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    code, _, err = run_cli(capsys, "apply", model, image, broken, "--out-dir", out_dir, "--cache-dir", cache)
    assert_one_line_error(code, err, "broken.nii.gz")
    assert not out_dir.exists() and not cache.exists()


def test_apply_refuses_two_images_with_the_same_output_name(tmp_path, scan, capsys):
    image, _ = scan
    (tmp_path / "other").mkdir()
    twin = write_array(tmp_path / "other" / "image.nrrd", mr_like(seed=1))
    model = synthetic_adapter().save(tmp_path / "model.fsam")
    code, _, err = run_cli(capsys, "apply", model, image, twin, "--out-dir", tmp_path / "out")
    assert_one_line_error(code, err, "image_fewshotsam.seg.nrrd", "rename one")


@pytest.mark.parametrize("option, fragment", [
    (["--slice-range", "2-40"], "outside the scan, which has 6 slices"),
    (["--labelled-slices", "9"], "outside the scan's slices 0-5"),
    (["--window", "40,0"], "width must be a positive number"),
    (["--preset", "sunset"], "unknown CT window preset"),
    (["--segments", "3"], "label value 3 is not painted"),
])
def test_option_errors_come_before_the_model_loads(tmp_path, scan, capsys, option, fragment):
    image, labels = scan
    cache = tmp_path / "cache"
    code, _, err = run_cli(capsys, "propagate", image, "--labels", labels, "--out", tmp_path / "o.seg.nrrd",
                           "--cache-dir", cache, *option)
    assert_one_line_error(code, err, fragment)
    assert not cache.exists()  # neither the model nor the cache (its .locks folder) was touched


@pytest.mark.parametrize("option, fragment", [
    (["--slice-range", "25-10"], "reversed"),
    (["--slice-range", "ten"], "not a whole number"),
    (["--slice-range", "-3"], "not a whole number"),
    (["--window", "40"], "LEVEL,WIDTH"),
    (["--segments", "1,x"], "not a whole number"),
    (["--labelled-slices", ","], "names no slice"),
])
def test_malformed_options_are_refused_by_the_parser(tmp_path, scan, capsys, option, fragment):
    image, labels = scan
    with pytest.raises(SystemExit) as exit_code:
        main(["propagate", str(image), "--labels", str(labels), "--out", str(tmp_path / "o.nrrd"), *option])
    assert exit_code.value.code == 2
    assert fragment in capsys.readouterr().err


def test_cache_clear_removes_the_built_encoders(tmp_path, capsys):
    encoders = tmp_path / ".encoders"
    encoders.mkdir()
    (encoders / "litemedsam-x-256px-opset17.onnx").write_bytes(b"half an encoder")
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert not encoders.exists()
    assert "built encoders" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# The demo's overview: radiological convention from the direction matrix


@pytest.mark.parametrize("direction", [
    np.eye(3),  # LPS axes
    np.diag([1.0, -1.0, 1.0]),  # j towards anterior, as the bundled CHAOS sample
    np.diag([-1.0, -1.0, 1.0]),  # RAS-stored (many NIfTI files)
    np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),  # i and j swapped
])
def test_overview_shows_anterior_up_and_patient_right_on_the_left(direction):
    geometry_ = geometry((4, 20, 20), direction)
    array = np.zeros((4, 20, 20), np.uint8)
    # A marker at the patient's right (-x in LPS) and anterior (-y): Slicer shows it at the top left.
    ijk = np.linalg.solve(np.asarray(direction, float), [-1.0, -1.0, 0.0])  # direction of the marker in voxels
    i = 2 if ijk[0] < 0 else 17
    j = 2 if ijk[1] < 0 else 17
    array[:, j, i] = 1
    shown = radiological_slices(array, geometry_, 0)
    rows, cols = np.nonzero(shown[0])
    assert rows[0] < 10 and cols[0] < 10, (rows, cols)


# --------------------------------------------------------------------------------------------------------------------
# With the model (one Engine per session)


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    options = EngineOptions(cache_dir=str(tmp_path_factory.mktemp("bad-input-cache")), device="cpu",
                            encoder="fp32", adapt=AdaptOptions(prompt_steps=20, decoder_steps=1))
    return Engine(options)


def test_mr_model_applied_to_ct_warns(engine):
    shape = (2, 32, 32)  # two slices: encoding is the slow part on a busy CPU
    mr = Volume(mr_like(shape), geometry(shape))
    labels = LabelVolume(organ_labels(shape, slices=(0,)), geometry(shape), [Segment("organ", 1, (1, 0, 0))])
    adapter = engine.adapt([(mr, labels)])
    assert adapter.support_modalities == ["unknown"]
    ct = Volume(ct_like(shape), geometry(shape), "CT")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewShotSAMWarning)  # stops apply at the warning, which comes before encoding
        with pytest.raises(FewShotSAMWarning, match="image ct.nrrd is CT, but the model was adapted on non-CT"):
            engine.apply(adapter, ct, scan_name="image ct.nrrd")


def test_decoder_of_another_model_in_the_fsam_is_one_line(engine, tmp_path):
    adapter = synthetic_adapter(model_id=engine.model.weights_id)
    assert_user_error(lambda: adapter.check_model(engine.model, "model.fsam"), "model.fsam", "does not fit")


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime and onnx are not installed")
def test_truncated_onnx_encoder_in_the_cache_is_rebuilt(engine, tmp_path):
    from FewShotSAMLib.preprocess import resize_stack_longest_side

    model = engine.model
    images, _ = resize_stack_longest_side(apply_normalisation(mr_like()[:1], choose_normalisation(
        Volume(mr_like(), geometry()))), 256, (0.8, 0.8))
    reference = model.encode(images, "onnx", encoders_folder=tmp_path)
    model.release_encoder_sessions()
    (exported,) = tmp_path.glob("*.onnx")
    size = exported.stat().st_size
    with open(exported, "r+b") as handle:
        handle.truncate(size // 3)  # a full disk or a crash while another program copied the cache
    with pytest.warns(UserWarning, match="damaged"):
        again = model.encode(images, "onnx", encoders_folder=tmp_path)
    model.release_encoder_sessions()
    assert exported.stat().st_size == size
    torch.testing.assert_close(again, reference)



@pytest.mark.skipif(why_not_compilable() is not None, reason=f"cannot compile here: {why_not_compilable()}")
def test_truncated_compiled_encoder_in_the_cache_is_rebuilt(engine, compiled_encoder_build, tmp_path):
    from FewShotSAMLib.preprocess import resize_stack_longest_side

    model = engine.model
    volume = Volume(mr_like(), geometry())
    images, _ = resize_stack_longest_side(apply_normalisation(volume.array[:1], choose_normalisation(volume)), 256,
                                          (0.8, 0.8))
    shared, _ = compiled_encoder_build  # a copy of the session's build: one build in this test, not two
    reference = model.encode(images, "compiled", encoders_folder=shared)
    model.release_encoder_sessions()
    built = compiled_encoder_file(model, tmp_path)
    shutil.copyfile(compiled_encoder_file(model, shared), built)
    size = built.stat().st_size
    with open(built, "r+b") as handle:
        handle.truncate(size // 3)
    with pytest.warns(UserWarning, match="damaged"):
        again = model.encode(images, "compiled", encoders_folder=tmp_path)
    model.release_encoder_sessions()
    assert built.stat().st_size > size // 3
    assert (again - reference).norm() / reference.norm() < 1e-3  # rebuilt from the same program: same arithmetic


def test_library_errors_become_one_line_with_their_class_name():
    from FewShotSAMLib.errors import one_line

    error = RuntimeError("Exception from src/core:\n   line two\tand  more " + "x" * 400)
    assert one_line(error) == ("RuntimeError: Exception from src/core: line two and more " + "x" * 400)[:214]
    assert one_line(error, None, with_type=False).startswith("Exception from src/core: line two and more xx")
    assert "\n" not in one_line(error, 300) and len(one_line(error, 300)) == len("RuntimeError: ") + 300
