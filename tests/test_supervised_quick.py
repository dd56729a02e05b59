"""The supervised reference's quick mode (benchmarks.supervised.run --quick), end to end on real CHAOS scans.

A MONAI 2D U-Net trains for 10 s on every slice of scans 1 and 2 and predicts scan 13. With so little training the
Dice values say nothing about accuracy; the test checks the pipeline: data in, a time-bounded training, a prediction
on the scan's grid, per-organ scores and an atomically written supervised.json.
"""

from __future__ import annotations

import json
import math

import pytest
from benchmark_helpers import require_chaos_cases, require_module, run_benchmark

ORGANS = {"liver", "right kidney", "left kidney", "spleen"}
TRAINING_SECONDS = 10  # the pipeline, not the model: a few dozen steps are enough


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory, shared_data_dir):
    require_module("monai", "MONAI is needed for the supervised reference (pip install -e '.[test]')")
    require_chaos_cases(shared_data_dir, (1, 2, 13))
    out = tmp_path_factory.mktemp("supervised-quick")
    run_benchmark("benchmarks.supervised.run", ["--quick", "--minutes", str(TRAINING_SECONDS / 60), "--threads", "1",
                                                "--out", str(out), "--data-dir", str(shared_data_dir)])
    return out, json.loads((out / "supervised.json").read_text())


def test_quick_run_writes_finite_dice_per_organ(quick_result):
    out, result = quick_result
    assert [path.name for path in out.iterdir()] == ["supervised.json"]  # no temporary file left behind
    assert result["run"]["status"] == "complete" and result["run"]["quick"] is True
    assert result["run"]["torch_threads"] == 1 and result["run"]["monai_version"]
    [record] = result["records"]
    assert record["scan"] == "13" and record["train_scans"] == ["1", "2"]
    assert set(record["structures"]) == ORGANS
    for organ, scores in record["structures"].items():
        assert scores["dice"] is not None and math.isfinite(scores["dice"]), organ
        assert 0.0 <= scores["dice"] <= 1.0, (organ, scores["dice"])


def test_quick_run_records_the_training_actually_done(quick_result):
    _, result = quick_result
    [model] = result["models"]
    assert model["train_slices"] > 50  # every slice of two scans (34 + 31 + ...), not only those with organs
    assert model["steps"] > 0 and model["epochs"] > 0
    # The budget is checked before each step, so training stops within one step of it.
    assert TRAINING_SECONDS <= model["seconds_trained"] < TRAINING_SECONDS + 30


def test_accuracy_report_shows_the_supervised_reference(quick_result, tmp_path):
    """report.py puts the supervised result beside FewShotSAM's protocol-1 Dice on the same scans, and on the plot."""
    from PIL import Image

    from benchmarks.accuracy import report

    out, result = quick_result
    assert report.load_supervised(out) == result
    scores = {organ: {metric: 0.9 for metric in report.METRICS} for organ in ORGANS}
    records = [{"protocol": 1, "dataset": "chaos", "scan": scan, "method": report.FEWSHOTSAM, "k": k,
                "labelled_slices": 3 * k, "seconds": 1.0, "structures": scores}
               for scan in ("13", "2") for k in (1, 3, 5)]
    text = "\n".join(report.supervised_section(result, records))
    assert "## Supervised reference (MONAI 2D U-Net)" in text and "Quick mode" in text
    assert "| FewShotSAM, protocol 1, k=3 |" in text
    assert "| 1 |" in text.split("k=3")[1].splitlines()[0]  # only scan 13, the scan the U-Net predicted
    rows = report.summaries(records)
    without = report.plot_dice_vs_k(rows, tmp_path / "without.png")
    with_supervised = report.plot_dice_vs_k(rows, tmp_path / "with.png", result)
    assert Image.open(with_supervised).size[1] > Image.open(without).size[1]  # one more legend row
