"""The engine on a CUDA GPU: propagate, adapt, save and apply with the model on the GPU, and a .fsam made there
that loads and applies on the CPU. Skipped where PyTorch sees no CUDA GPU (CI has none); run where one is lent
(this file and benchmarks/speed/gpu.py). Real LiteMedSAM weights and real CHAOS scans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FewShotSAMLib.adapter import FewShotAdapter
from FewShotSAMLib.metrics import dice
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import LabelVolume, Segment
from FewShotSAMLib.volume_io import read_labels, read_volume

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here: the GPU path runs where one is (benchmarks/speed/gpu.py)")

ORGANS = [Segment("liver", 1), Segment("right kidney", 2), Segment("left kidney", 3), Segment("spleen", 4)]
SUPPORT, QUERY = 2, 3
# Embeddings from bf16 autocast (the GPU's default) differ from fp32 ones by a few percent; the results stay the
# same organ outline. Floor of the two devices' agreement per organ, and of the GPU's Dice against the reference.
DEVICE_AGREEMENT_FLOOR = 0.90
PROPAGATE_DICE_FLOOR = 0.80
APPLY_LIVER_FLOOR = 0.65  # CHAOS 2 -> 3 liver, as the Slicer save-and-apply test asks on the CPU


@pytest.fixture(scope="module")
def support_case(chaos_scan):
    image, labels = chaos_scan(SUPPORT)
    volume = read_volume(image)
    reference = read_labels(labels, volume).array
    painted = LabelVolume(few_shot_labels(reference, 0, 3, [s.label_value for s in ORGANS]), volume.geometry, ORGANS)
    return volume, reference, painted


def engine_on(device: str, cache_dir) -> Engine:
    # On the CPU through ONNX Runtime, as the other tests: `auto` would first build and measure every CPU encoder
    # path of that machine (minutes where it can compile the bf16 encoder).
    encoder = "onnx" if device == "cpu" else "auto"
    return Engine(EngineOptions(cache_dir=str(cache_dir), device=device, warm_start=False, encoder=encoder))


def test_propagate_on_the_gpu_agrees_with_the_cpu(support_case, engine_cache_dir):
    volume, reference, painted = support_case
    on_gpu = engine_on("cuda", engine_cache_dir).propagate(volume, painted).array
    on_cpu = engine_on("cpu", engine_cache_dir).propagate(volume, painted).array
    for organ in ORGANS:
        value = organ.label_value
        assert dice(on_gpu == value, on_cpu == value) >= DEVICE_AGREEMENT_FLOOR, organ.name
        assert dice(on_gpu == value, reference == value) >= PROPAGATE_DICE_FLOOR, organ.name


def test_a_model_adapted_on_the_gpu_applies_on_the_cpu(support_case, chaos_scan, engine_cache_dir, tmp_path):
    volume, _, painted = support_case
    made = engine_on("cuda", engine_cache_dir).adapt([(volume, painted)])
    assert all(value.device.type == "cpu" for value in made.decoder_state.values())
    adapter = FewShotAdapter.load(made.save(tmp_path / "organs.fsam"))
    image, labels = chaos_scan(QUERY)
    query = read_volume(image)
    query_reference = read_labels(labels, query).array
    result = engine_on("cpu", engine_cache_dir).apply(adapter, query).array
    assert dice(result == 1, query_reference == 1) >= APPLY_LIVER_FLOOR
    on_gpu = engine_on("cuda", engine_cache_dir).apply(adapter, query).array
    assert dice(on_gpu == 1, result == 1) >= DEVICE_AGREEMENT_FLOOR
    assert np.isin(np.unique(on_gpu), [0, 1, 2, 3, 4]).all()
