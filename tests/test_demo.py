"""The README's first quick-start command, `fewshotsam demo`, through the installed entry point in its own process:
the bundled sample scan, the bundled LiteMedSAM weights, the files it promises, and no file replaced unasked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from FewShotSAMLib.demo import SAMPLE_IMAGE, SAMPLE_SEGMENTS
from FewShotSAMLib.volume_io import read_labels, read_volume

# The README quotes a mean Dice of 0.947 for the demo (3 painted slices per organ); measured 0.94-0.95 on every
# encoder path. The floor leaves room for another CPU's rounding, not for a broken run.
DEMO_MEAN_DICE_FLOOR = 0.90
OUTPUTS = ("painted.seg.nrrd", "result.seg.nrrd", "overview.png", "dice.json")


def entry_point() -> Path:
    """The `fewshotsam` script installed beside this interpreter (what the README's command runs)."""
    script = Path(sys.executable).parent / ("fewshotsam.exe" if sys.platform == "win32" else "fewshotsam")
    if not script.exists():
        pytest.fail(f"{script} is missing: install the project (pip install -e .)", pytrace=False)
    return script


def run_demo_command(out_dir: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    # No time-out of its own: its speed depends on this CPU's encoder path; CI's own limit bounds the run.
    return subprocess.run([str(entry_point()), "demo", "--out-dir", str(out_dir), "--cache-dir", str(cache_dir),
                           "--device", "cpu", *extra], capture_output=True, text=True)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, engine_cache_dir):
    out_dir = tmp_path_factory.mktemp("demo")
    completed = run_demo_command(out_dir, engine_cache_dir)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out_dir, completed


def test_demo_writes_what_the_readme_promises(demo_run):
    out_dir, completed = demo_run
    for name in OUTPUTS:
        assert f"wrote {out_dir / name}" in completed.stdout or name == "painted.seg.nrrd", completed.stdout
        assert (out_dir / name).stat().st_size > 0, name
    report = json.loads((out_dir / "dice.json").read_text())
    assert set(report["dice"]) == {s.name for s in SAMPLE_SEGMENTS} | {"mean"}
    assert report["dice"]["mean"] >= DEMO_MEAN_DICE_FLOOR, report["dice"]
    assert f"mean {report['dice']['mean']:.3f}" in completed.stdout  # the Dice line the user reads

    image = read_volume(SAMPLE_IMAGE)
    result = read_labels(out_dir / "result.seg.nrrd", image)
    assert result.geometry.same_grid(image.geometry)
    assert [(s.name, s.label_value) for s in result.segments] == [(s.name, s.label_value) for s in SAMPLE_SEGMENTS]
    painted = read_labels(out_dir / "painted.seg.nrrd", image).array
    assert np.array_equal(result.array[report["painted_slices"]], painted[report["painted_slices"]])
    with Image.open(out_dir / "overview.png") as overview:
        assert overview.format == "PNG" and min(overview.size) >= 256


def test_a_second_demo_run_replaces_nothing_unless_asked(demo_run, engine_cache_dir):
    out_dir, _ = demo_run
    for name in ("painted.seg.nrrd", "result.seg.nrrd"):  # only the overview and the report are in the way now
        (out_dir / name).unlink()
    kept = {name: (out_dir / name).read_bytes() for name in ("overview.png", "dice.json")}
    refused = run_demo_command(out_dir, engine_cache_dir)
    assert refused.returncode != 0
    assert "exists; pass --overwrite" in refused.stderr and "overview.png" in refused.stderr, refused.stderr
    # Refused before any work: nothing new written, nothing replaced.
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(kept)
    assert all((out_dir / name).read_bytes() == data for name, data in kept.items())
