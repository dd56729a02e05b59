"""The encoder's execution paths: compiled (bf16; the CPU default for LiteMedSAM where it is measured fastest), ONNX
Runtime and bf16 autocast, against eager PyTorch fp32 (auto's probe and OpenVINO: test_encoder_probe.py)."""

from __future__ import annotations

import pytest
import torch

from FewShotSAMLib.compiled_encoder import compiled_encoder_file, cpu_has_bf16, failure_note, why_not_compilable
from FewShotSAMLib.demo import SAMPLE_IMAGE
from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.models import load_model
from FewShotSAMLib.onnx_encoder import onnxruntime_available
from FewShotSAMLib.preprocess import apply_normalisation, choose_normalisation, resize_stack_longest_side
from FewShotSAMLib.volume_io import read_volume

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime and onnx are not installed")


@pytest.fixture(scope="module")
def model():
    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def mri_slices():
    """Three real MRI slices of the bundled sample, as model inputs."""
    volume = read_volume(SAMPLE_IMAGE)
    slices = apply_normalisation(volume.array, choose_normalisation(volume))[10:13]
    images, _ = resize_stack_longest_side(slices, 256, (1.0, 1.0))
    return images


CANNOT_COMPILE = why_not_compilable()
needs_compiler = pytest.mark.skipif(CANNOT_COMPILE is not None, reason=f"cannot compile here: {CANNOT_COMPILE}")


def test_auto_offers_the_compiled_encoder_where_it_can_be_built(model, tmp_path):
    assert ("compiled" in model.cpu_candidates(tmp_path)) == (CANNOT_COMPILE is None)
    assert "onnx" in model.cpu_candidates(tmp_path)
    assert model.encoder_path("bf16") == "bf16"
    with pytest.raises(FewShotSAMError, match="unknown encoder path"):
        model.encoder_path("int4")


def test_without_an_encoders_folder_auto_uses_pytorch_and_built_paths_are_refused(model):
    """Compiled and exported encoders are kept in a folder the caller names (the engine: its cache's .encoders)."""
    assert model.encoder_path("auto") in ("bf16", "fp32")
    for built in ("compiled", "compiled-fp32", "openvino", "onnx"):
        with pytest.raises(FewShotSAMError, match=f"--encoder {built} needs a folder"):
            model.encoder_path(built)


def test_onnxruntime_gives_the_fp32_embeddings(model, mri_slices, tmp_path):
    reference = model.encode(mri_slices, "fp32")
    embeddings = model.encode(mri_slices, "onnx", encoders_folder=tmp_path)
    assert embeddings.shape == reference.shape == (3, 256, 64, 64)
    relative = (embeddings - reference).norm() / reference.norm()
    assert relative < 1e-4, f"ONNX Runtime differs from PyTorch fp32 by {relative:.2e} (relative)"


def test_the_encoder_is_exported_once_per_folder(model, mri_slices, tmp_path):
    model.encode(mri_slices[:1], "onnx", encoders_folder=tmp_path)
    exported = list(tmp_path.glob("*.onnx"))
    assert len(exported) == 1 and exported[0].name.startswith("litemedsam-")
    stamp = exported[0].stat().st_mtime_ns
    fresh = load_model("litemedsam", device="cpu")  # a new process would see the same folder
    fresh.encode(mri_slices[:1], "onnx", encoders_folder=tmp_path)
    assert exported[0].stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*.partial*")), "a temporary export file was left behind"


def test_onnx_path_is_refused_without_the_package(model, monkeypatch, tmp_path):
    import FewShotSAMLib.models as models

    monkeypatch.setattr(models, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(models, "openvino_available", lambda: False)
    with pytest.raises(FewShotSAMError, match="pip install onnxruntime onnx"):
        model.encoder_path("onnx")
    with pytest.raises(FewShotSAMError, match="pip install openvino onnx"):
        model.encoder_path("openvino")
    for precision in ("bf16", "fp32"):
        failure_note(compiled_encoder_file(model, tmp_path, precision)).write_text("no compiler\n")
    assert model.encoder_path("auto", tmp_path) in ("bf16", "fp32")  # falls back to PyTorch silently


@needs_compiler
def test_compiled_encoder_is_built_once_and_stays_close_to_fp32(model, mri_slices, compiled_encoder_build):
    folder, had_to_build = compiled_encoder_build  # built by its first use, like a user's first run
    assert had_to_build
    built = compiled_encoder_file(model, folder)
    assert built.is_file() and not model.will_compile_encoder("compiled", folder)
    assert not list(folder.glob(".*.partial*")), "a temporary build file was left behind"
    stamp = built.stat().st_mtime_ns
    reference = model.encode(mri_slices, "fp32")
    embeddings = model.encode(mri_slices, "compiled", encoders_folder=folder)
    # bf16 arithmetic: a few percent relative, like bf16 autocast; the accuracy benchmark checks Dice holds
    relative = (embeddings - reference).norm() / reference.norm()
    cosine = torch.nn.functional.cosine_similarity(embeddings.flatten(1), reference.flatten(1))
    assert relative < 0.1 and cosine.min() > 0.99, f"relative {relative:.3f}, cosine {cosine.min():.4f}"
    fresh = load_model("litemedsam", device="cpu")  # as a new process would: loads, does not build again
    again = fresh.encode(mri_slices, "compiled", encoders_folder=folder)
    assert built.stat().st_mtime_ns == stamp
    assert torch.equal(again, embeddings)


def test_a_failed_build_is_not_retried_and_auto_falls_back(model, mri_slices, tmp_path):
    note = failure_note(compiled_encoder_file(model, tmp_path))
    note.write_text("CalledProcessError: g++ exited with 1\n")  # what a failed build leaves behind
    assert "compiled" not in model.cpu_candidates(tmp_path)
    with pytest.raises(FewShotSAMError, match=f"could not be built earlier: CalledProcessError.*delete {note}"):
        model.encode(mri_slices[:1], "compiled", encoders_folder=tmp_path)
    assert not compiled_encoder_file(model, tmp_path).exists()


def test_compiled_and_onnx_paths_are_refused_off_cpu(tmp_path):
    meta = load_model("litemedsam", device="cpu").to("meta")  # any non-CPU device; no GPU is needed to check
    for path in ("compiled", "compiled-fp32", "openvino", "openvino-bf16", "onnx"):
        with pytest.raises(FewShotSAMError, match=f"--encoder {path} runs on the CPU only"):
            meta.encoder_path(path, tmp_path)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions: bf16 would be emulated (~30 s "
                    "for one slice) and `--encoder auto` never runs it here; checked on CPUs with bf16 (on a GPU, "
                    "where bf16 is the default, tests/test_gpu.py compares results with the CPU's)")
def test_bf16_embeddings_stay_close_to_fp32(model, mri_slices):
    one_slice = mri_slices[:1]
    reference = model.encode(one_slice, "fp32")
    embeddings = model.encode(one_slice, "bf16")
    cosine = torch.nn.functional.cosine_similarity(embeddings.flatten(1), reference.flatten(1))
    assert cosine.min() > 0.99
