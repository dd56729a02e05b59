"""The encoder's execution paths: ONNX Runtime (the CPU default for LiteMedSAM) against eager PyTorch fp32."""

from __future__ import annotations

import pytest
import torch

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


def test_auto_runs_litemedsam_through_onnxruntime_on_cpu(model):
    assert model.encoder_path("auto") == "onnx"
    assert model.encoder_path("bf16") == "bf16"
    with pytest.raises(FewShotSAMError, match="unknown encoder path"):
        model.encoder_path("int4")


def test_onnxruntime_gives_the_fp32_embeddings(model, mri_slices, tmp_path):
    reference = model.encode(mri_slices, "fp32")
    embeddings = model.encode(mri_slices, "onnx", onnx_folder=tmp_path)
    assert embeddings.shape == reference.shape == (3, 256, 64, 64)
    relative = (embeddings - reference).norm() / reference.norm()
    assert relative < 1e-4, f"ONNX Runtime differs from PyTorch fp32 by {relative:.2e} (relative)"


def test_the_encoder_is_exported_once_per_folder(model, mri_slices, tmp_path):
    model.encode(mri_slices[:1], "onnx", onnx_folder=tmp_path)
    exported = list(tmp_path.glob("*.onnx"))
    assert len(exported) == 1 and exported[0].name.startswith("litemedsam-")
    stamp = exported[0].stat().st_mtime_ns
    fresh = load_model("litemedsam", device="cpu")  # a new process would see the same folder
    fresh.encode(mri_slices[:1], "onnx", onnx_folder=tmp_path)
    assert exported[0].stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".tmp-*")), "a temporary export file was left behind"


def test_onnx_path_is_refused_off_cpu_or_without_the_package(model, monkeypatch):
    import FewShotSAMLib.models as models

    monkeypatch.setattr(models, "onnxruntime_available", lambda: False)
    with pytest.raises(FewShotSAMError, match="pip install onnxruntime onnx"):
        model.encoder_path("onnx")
    assert model.encoder_path("auto") in ("bf16", "fp32")  # falls back to PyTorch silently


def test_bf16_embeddings_stay_close_to_fp32(model, mri_slices):
    reference = model.encode(mri_slices, "fp32")
    embeddings = model.encode(mri_slices, "bf16")
    cosine = torch.nn.functional.cosine_similarity(embeddings.flatten(1), reference.flatten(1))
    assert cosine.min() > 0.99
