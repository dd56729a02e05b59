"""The decoder's tuning precision (fp32 by default; "auto": bf16 autocast where the CPU has bf16 instructions, fp32
elsewhere), and the same segmentation of a scan's own painting either way (real CHAOS scan 2, real LiteMedSAM
weights)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from FewShotSAMLib import tuning
from FewShotSAMLib.adapter import AdaptOptions
from FewShotSAMLib.compiled_encoder import cpu_has_bf16
from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.metrics import dice
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import LabelVolume, Segment
from FewShotSAMLib.volume_io import read_labels, read_volume

ORGANS = [Segment("liver", 1), Segment("right kidney", 2), Segment("left kidney", 3), Segment("spleen", 4)]
# Measured on CHAOS 2, 3 and 5 at k = 3 on a Zen 5: mean Dice equal to 4 decimals with either precision, the tuned
# weights 1e-4 to 4e-2 apart (relative). Each organ of the two results must overlap at least this much.
AGREEMENT_FLOOR = 0.97


def test_auto_tunes_in_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch):
    assert AdaptOptions().tuning_precision == "fp32"  # the default (AdaptOptions says why)
    cpu = torch.device("cpu")
    assert isinstance(tuning.tuning_autocast("fp32", cpu), contextlib.nullcontext)
    assert isinstance(tuning.tuning_autocast("bf16", cpu), torch.autocast)
    auto = tuning.tuning_autocast("auto", cpu)
    assert isinstance(auto, torch.autocast if cpu_has_bf16() else contextlib.nullcontext)
    # An AVX2-only CPU (Zen 3, most laptops) or Apple Silicon: bf16 would be emulated, slower than fp32.
    monkeypatch.setattr(tuning, "cpu_has_bf16", lambda: False)
    assert isinstance(tuning.tuning_autocast("auto", cpu), contextlib.nullcontext)
    with pytest.raises(FewShotSAMError, match="unknown tuning precision 'fp16'"):
        tuning.tuning_autocast("fp16", cpu)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions: `auto` tunes in fp32 here and a "
                    "forced bf16 tuning is emulated (this test took 86 s on an AVX2-only Zen 3); the agreement is "
                    "checked on CPUs with bf16")
def test_bf16_and_fp32_tuning_segment_a_real_scan_alike(chaos_scan, engine_cache_dir):
    image_path, label_path = chaos_scan(2)
    volume = read_volume(image_path)
    reference = read_labels(label_path, volume).array
    painted = LabelVolume(few_shot_labels(reference, 0, 3, [1, 2, 3, 4]), volume.geometry, ORGANS)
    results = {}
    for precision in ("fp32", "bf16"):
        # The session cache's encoder (auto), whose embeddings of this scan the quick accuracy benchmark has cached.
        options = EngineOptions(cache_dir=str(engine_cache_dir), device="cpu", warm_start=False,
                                adapt=AdaptOptions(tuning_precision=precision))
        results[precision] = Engine(options).propagate(volume, painted).array
    for organ in ORGANS:
        value = organ.label_value
        agreement = dice(results["fp32"] == value, results["bf16"] == value)
        assert agreement >= AGREEMENT_FLOOR, (organ.name, agreement)
        scores = [dice(results[p] == value, reference == value) for p in ("fp32", "bf16")]
        assert abs(scores[0] - scores[1]) < 0.01, (organ.name, scores)
