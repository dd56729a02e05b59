"""`--encoder auto` on CPU: the fastest path that builds and runs here, measured once and remembered; the OpenVINO
path it can pick."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import FewShotSAMLib.models as models
from FewShotSAMLib import encoder_probe
from FewShotSAMLib.compiled_encoder import cpu_has_bf16
from FewShotSAMLib.demo import SAMPLE_IMAGE
from FewShotSAMLib.embedding_cache import EmbeddingCache
from FewShotSAMLib.encoder_probe import probe_record_file
from FewShotSAMLib.encoding import VolumeEncoding, arithmetic_of
from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.models import load_model
from FewShotSAMLib.onnx_encoder import onnxruntime_available
from FewShotSAMLib.openvino_encoder import openvino_available, openvino_encoder_file
from FewShotSAMLib.preprocess import apply_normalisation, choose_normalisation, resize_stack_longest_side
from FewShotSAMLib.volume import Volume
from FewShotSAMLib.volume_io import read_volume

pytestmark = pytest.mark.skipif(not (onnxruntime_available() and openvino_available()),
                                reason="onnxruntime, openvino and onnx are not all installed")


@pytest.fixture(scope="module")
def model():
    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def built_folder(tmp_path_factory, model):
    """An encoders folder holding the ONNX export and the OpenVINO encoder, built once for this module."""
    folder = tmp_path_factory.mktemp("encoders")
    model.prepare_encoder("openvino", folder)
    model.release_encoder_sessions()
    return folder


@pytest.fixture
def encoders(built_folder, tmp_path):
    """A fresh encoders folder with the built files but no probe record, as after an upgrade."""
    shutil.copytree(built_folder, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "auto-*"))
    return tmp_path


@pytest.fixture
def without_compiled_paths(model, monkeypatch):
    """Leave the AOTInductor builds (20-60 s each) out of the candidates: other tests build them."""
    monkeypatch.setattr(type(model), "_compiled_encoder_usable", lambda self, folder, precision: False)


def failing(message):
    def open_encoder(*args, **kwargs):
        raise FewShotSAMError(message)
    return open_encoder


def test_the_real_probe_ranks_what_runs_here_and_is_remembered(model, encoders, without_compiled_paths,
                                                               monkeypatch):
    assert model.will_compile_encoder("auto", encoders)
    chosen = model.encoder_path("auto", encoders)
    record = json.loads(probe_record_file(model, encoders).read_text())
    expected = ["onnx", "openvino"] + (["openvino-bf16"] if cpu_has_bf16() else [])
    assert record["failed"] == {} and sorted(record["ranking"]) == expected
    assert chosen == record["ranking"][0]
    times = record["seconds_per_slice"]
    assert times[record["ranking"][0]] <= times[record["ranking"][1]]
    assert record["cpu"] == encoder_probe.cpu_description() and record["libraries"]["openvino"] != "absent"
    assert not model.will_compile_encoder("auto", encoders)
    # A new process reads the record and measures nothing again...
    monkeypatch.setattr(encoder_probe, "probe", failing("measured again"))
    assert load_model("litemedsam", device="cpu").encoder_path("auto", encoders) == chosen
    # ...but another CPU (or library version) has a record of its own.
    monkeypatch.setattr(encoder_probe, "cpu_description", lambda: "Another CPU | avx2 fma")
    with pytest.raises(FewShotSAMError, match="measured again"):
        model.encoder_path("auto", encoders)


def test_auto_never_picks_a_path_that_fails_to_build_or_run(model, encoders, without_compiled_paths, monkeypatch):
    """As on a Mac or a Windows machine without a compiler: the paths that cannot work there fail their probe."""
    def fails_when_run(*args):
        def run(images):
            raise RuntimeError("MPS backend: operator not implemented")
        return run

    monkeypatch.setattr(models, "open_openvino_encoder", fails_when_run)
    assert model.encoder_path("auto", encoders) == "onnx"
    record = json.loads(probe_record_file(model, encoders).read_text())
    assert record["ranking"] == ["onnx"] and "MPS backend" in record["failed"]["openvino"]
    model.release_encoder_sessions()


def test_a_failed_compiler_build_is_left_out(model, encoders, monkeypatch):
    """No C++ compiler (Windows without MSVC): the compiled encoder fails to build; auto runs the fastest other."""
    monkeypatch.setattr(models, "why_not_compilable", lambda precision="bf16": None)  # as if a compiler were there
    monkeypatch.setattr(models, "open_compiled_encoder", failing("no C++ compiler found (cl.exe)"))
    chosen = model.encoder_path("auto", encoders)
    record = json.loads(probe_record_file(model, encoders).read_text())
    assert set(record["failed"]) == {"compiled"} and "cl.exe" in record["failed"]["compiled"]
    assert chosen in ("onnx", "openvino", "openvino-bf16") and chosen == record["ranking"][0]
    model.release_encoder_sessions()


def test_when_every_built_path_fails_auto_runs_pytorch(model, encoders, without_compiled_paths, monkeypatch):
    monkeypatch.setattr(models, "open_openvino_encoder", failing("openvino: no CPU plugin"))
    monkeypatch.setattr(models, "open_onnx_encoder", failing("onnxruntime: illegal instruction"))
    assert model.encoder_path("auto", encoders) in ("bf16", "fp32")
    assert model.prepare_encoder("auto", encoders) in ("bf16", "fp32")
    with pytest.raises(FewShotSAMError, match="illegal instruction"):
        model.prepare_encoder("onnx", encoders)  # asked for by name, the failure is the user's to see


@pytest.fixture(scope="module")
def sample_slices():
    """Two real MRI slices of the bundled sample, as model inputs."""
    volume = read_volume(SAMPLE_IMAGE)
    images, _ = resize_stack_longest_side(apply_normalisation(volume.array, choose_normalisation(volume))[10:12],
                                          256, (1.0, 1.0))
    return images


def test_openvino_gives_the_fp32_embeddings_and_is_built_once(model, built_folder, sample_slices):
    images = sample_slices
    reference = model.encode(images, "fp32")
    built = openvino_encoder_file(model, built_folder)
    stamp = built.stat().st_mtime_ns
    embeddings = load_model("litemedsam", device="cpu").encode(images, "openvino", encoders_folder=built_folder)
    assert built.stat().st_mtime_ns == stamp, "a new process compiled the OpenVINO encoder again"
    relative = (embeddings - reference).norm() / reference.norm()
    assert embeddings.shape == reference.shape and relative < 1e-4, f"OpenVINO differs by {relative:.2e}"
    assert not list(built_folder.glob(".*.partial*")), "a temporary build file was left behind"


def test_openvino_bf16_is_offered_only_on_cpus_with_bf16_instructions(model, tmp_path, monkeypatch):
    """Without them OpenVINO would quietly run fp32 under the bf16 name; with them auto measures it."""
    assert ("openvino-bf16" in model.cpu_candidates(tmp_path)) == cpu_has_bf16()
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)  # as on a Zen 3, most laptops, Apple Silicon
    assert "openvino-bf16" not in model.cpu_candidates(tmp_path)
    with pytest.raises(FewShotSAMError, match="openvino-bf16 needs a CPU with bf16 instructions.*--encoder openvino"):
        model.encoder_path("openvino-bf16", tmp_path)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert "openvino-bf16" in model.cpu_candidates(tmp_path)
    # Its embeddings are neither fp32's nor the compiled bf16 encoder's: a cache entry of their own.
    assert len({arithmetic_of(path) for path in ("openvino-bf16", "openvino", "compiled", "bf16")}) == 4


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions: --encoder openvino-bf16 is "
                    "refused here (the test above checks that); it runs on Zen 4/5 and Xeons since Cooper Lake")
def test_openvino_bf16_is_built_into_a_file_of_its_own_and_stays_close_to_fp32(model, encoders, sample_slices):
    fp32 = model.encode(sample_slices, "openvino", encoders_folder=encoders)
    bf16 = model.encode(sample_slices, "openvino-bf16", encoders_folder=encoders)
    model.release_encoder_sessions()
    built = openvino_encoder_file(model, encoders, "bf16")
    assert built.is_file() and built != openvino_encoder_file(model, encoders)
    relative = (bf16 - fp32).norm() / fp32.norm()
    cosine = torch.nn.functional.cosine_similarity(bf16.flatten(1), fp32.flatten(1))
    # bf16 arithmetic: a few percent (the compiled bf16 encoder: ~4-6 %), not fp32's 1e-6, nor a broken network
    assert 1e-3 < relative < 0.1 and cosine.min() > 0.99, f"relative {relative:.3g}, cosine {cosine.min():.4f}"


def test_a_damaged_openvino_encoder_is_compiled_again(model, encoders):
    built = openvino_encoder_file(model, encoders)
    built.write_bytes(built.read_bytes()[:1000])  # cut short, as by a full disk
    with pytest.warns(UserWarning, match="damaged"):
        model.encode(torch.zeros(1, 3, 256, 256), "openvino", encoders_folder=encoders)
    assert built.stat().st_size > 1_000_000
    model.release_encoder_sessions()


def cache_with_encoders(folder, built_folder) -> EmbeddingCache:
    """An embedding cache whose encoders folder holds the built ONNX and OpenVINO encoders (no probe record)."""
    cache = EmbeddingCache(folder)
    shutil.copytree(built_folder, cache.encoders_dir, ignore=shutil.ignore_patterns(".*", "auto-*"))
    return cache


@pytest.fixture
def sample_cache(built_folder, tmp_path):
    """A cache with the built encoders, and a 3-slice volume."""
    volume = read_volume(SAMPLE_IMAGE)
    return cache_with_encoders(tmp_path / "cache", built_folder), Volume(np.ascontiguousarray(volume.array[10:13]),
                                                                          volume.geometry)


def test_a_cached_volume_is_read_without_opening_the_encoder(model, sample_cache, monkeypatch):
    """The warm re-run's case: opening OpenVINO costs ~0.2 s, and every slice it needs is in the cache already."""
    cache, volume = sample_cache
    first = VolumeEncoding(model, volume, 0, cache, encoder="openvino").encode(None)
    model.release_encoder_sessions()
    monkeypatch.setattr(models, "open_openvino_encoder", failing("the encoder was opened"))
    again = VolumeEncoding(model, volume, 0, cache, encoder="openvino")
    assert np.array_equal(again.encode([0, 2]).embeddings[[0, 2]], first.embeddings[[0, 2]])
    assert not model.__dict__.get("_encoder_sessions")
    with pytest.raises(FewShotSAMError, match="the encoder was opened"):
        VolumeEncoding(model, volume, 1, cache, encoder="openvino").encode([0])  # another axis: not cached


def test_a_fallback_of_other_arithmetic_takes_every_slice_from_its_own_cache_entry(model, sample_cache, built_folder,
                                                                                    tmp_path, monkeypatch):
    """auto's record says the compiled bf16 encoder is fastest, but it fails to open now (its library deleted, no
    compiler): the fp32 fallback must not write fp32 embeddings under the bf16 key, nor hand out a mix of both."""
    reference_cache, volume = sample_cache
    reference = VolumeEncoding(model, volume, 0, reference_cache, encoder="openvino")
    expected = reference.encode(None).embeddings
    cache = cache_with_encoders(tmp_path / "fallback", built_folder)
    monkeypatch.setattr(models, "why_not_compilable", lambda precision="bf16": None)  # as on a bf16 CPU
    monkeypatch.setattr(models, "open_compiled_encoder", failing("the compiled library is gone"))
    # Every candidate is in the record (or the probe would measure again): openvino-bf16 as failed, as on a CPU
    # without bf16 instructions, so that OpenVINO fp32 is the fallback here on any CPU.
    record = {"ranking": ["compiled", "openvino", "onnx"], "failed": {"openvino-bf16": "no bf16 instructions"}}
    probe_record_file(model, cache.encoders_dir).write_text(json.dumps(record))
    encoding = VolumeEncoding(model, volume, 0, cache, encoder="auto")
    assert encoding.path == "compiled" and encoding.entry.key != reference.entry.key
    with pytest.warns(UserWarning, match="the compiled library is gone"):
        encoded = encoding.encode([1])
    assert encoding.path == "openvino" and encoding.entry.key == reference.entry.key and encoded.encoded == [1]
    encoded = encoding.encode([2])
    assert encoded.encoded == [1, 2] and np.array_equal(encoded.embeddings[[1, 2]], expected[[1, 2]])
    model.release_encoder_sessions()
