"""The accuracy benchmark's quick mode, end to end in a real subprocess (CHAOS scans 2 and 15, k=3).

Floors were set from measurement (litemedsam, CPU; see benchmarks/results/accuracy.md): FewShotSAM mean Dice 0.942
over the two scans, Fill between slices 0.917, SAM box 0.924. The floors leave a margin for platform differences.
"""

from __future__ import annotations

import json

import pytest
from benchmark_helpers import require_chaos_cases, require_module, run_benchmark


FEWSHOTSAM_DICE_FLOOR = 0.85  # measured 0.942
MARGIN_TO_FILL_BETWEEN_SLICES = 0.02  # FewShotSAM must not be worse than Fill between slices by more than this


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, shared_data_dir, engine_cache_dir):
    # The Fill between slices baseline runs Slicer's own code.
    require_module("slicer", "slicer-core is needed for the Fill between slices baseline (pip install -e '.[slicer]')")
    require_chaos_cases(shared_data_dir, (2, 15))
    out = tmp_path_factory.mktemp("accuracy-quick")
    completed = run_benchmark("benchmarks.accuracy.run", ["--quick", "--out", str(out), "--cache-dir",
                                                          str(engine_cache_dir), "--data-dir", str(shared_data_dir)],
                              timeout=900)
    return out, completed


def _summary(result: dict, method: str) -> dict:
    rows = [s for s in result["summaries"]
            if s["protocol"] == 1 and s["dataset"] == "chaos" and s["method"] == method and s["k"] in (3, None)]
    assert len(rows) == 1, f"expected one summary row for {method}, got {rows}"
    return rows[0]


def test_quick_benchmark_writes_json_markdown_and_plot(quick_run):
    out, completed = quick_run
    result = json.loads((out / "accuracy.json").read_text())
    markdown = (out / "accuracy.md").read_text()
    assert (out / "accuracy_dice_vs_k.png").stat().st_size > 1000
    assert result["run"]["status"] == "complete"
    for method in ("FewShotSAM", "Fill between slices", "SAM box (reference box)"):
        assert method in markdown
        assert any(r["method"] == method for r in result["records"])
    assert {r["scan"] for r in result["records"]} == {"2", "15"}
    assert "| method | k |" in completed.stdout  # the markdown is printed
    assert "Supervised reference: not run" in markdown
    for record in result["records"]:
        assert set(record["structures"]) == {"liver", "right kidney", "left kidney", "spleen"}
        for scores in record["structures"].values():
            assert {"dice", "iou", "hd95_mm", "assd_mm", "false_positive_slices"} <= set(scores)


def test_fewshotsam_beats_the_floor_and_matches_fill_between_slices(quick_run):
    out, _ = quick_run
    result = json.loads((out / "accuracy.json").read_text())
    fewshotsam = _summary(result, "FewShotSAM")
    fill = _summary(result, "Fill between slices")
    assert fewshotsam["n_scans"] == 2 and fill["n_scans"] == 2
    assert fewshotsam["dice"] > FEWSHOTSAM_DICE_FLOOR, fewshotsam
    assert fewshotsam["dice"] > fill["dice"] - MARGIN_TO_FILL_BETWEEN_SLICES, (fewshotsam["dice"], fill["dice"])


def test_sam_box_baseline_is_sane(quick_run):
    """The reference-box baseline is told each organ's box on every slice: it must segment well (catches a
    coordinate mix-up between rows/columns or slice pixels/model-input pixels, which would drop it near zero)."""
    out, _ = quick_run
    result = json.loads((out / "accuracy.json").read_text())
    assert _summary(result, "SAM box (reference box)")["dice"] > 0.8
