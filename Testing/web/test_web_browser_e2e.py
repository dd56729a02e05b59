"""End to end in a real headless browser: `fewshotsam serve` on a cropped CHAOS scan, driven by Playwright + chromium.

The test paints liver and spleen on 3 axial slices with mouse drags on the axial view (the server maps voxels to
view pixels in the page state `fsam_axial`), runs Adapt & Propagate in the worker, checks the scene's segmentation
(downloaded as .seg.nrrd, read with slicerio) against the manual reference, takes a screenshot, then cancels a
second run and checks the segmentation did not change.

Runs in the web environment (scripts/test.sh: .venv-web). FEWSHOTSAM_WEB_SCREENSHOT=<path> also saves the
screenshot there (the README's docs/web-app.png is made this way).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from web_support import (
    LIVER,
    REPO_ROOT,
    SPLEEN,
    chromium_executable,
    cropped_chaos_scan,
    free_port,
    reference_array,
    reference_spacing_mm,
    require_trame_slicer,
    support,
)

# Dice floors on the slices that were not painted: 3 of 12 slices painted with the 20 mm brush kept inside each organ
# (the spleen's thin crescent is only painted along its core), so below the engine's scores on exact reference
# slices. Measured on CPU: liver 0.816, spleen 0.648.
DICE_FLOOR = {LIVER: 0.75, SPLEEN: 0.55}
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = float(os.environ.get("FEWSHOTSAM_WEB_RUN_TIMEOUT", 300))  # a busy 2-core machine needs more
VIEWPORT = {"width": 1900, "height": 1000}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_trame_slicer()
    chromium = chromium_executable()
    try:
        import playwright  # noqa: F401
    except ImportError as error:
        support.skip_or_fail(f"playwright cannot be imported ({error}); pip install playwright")
    folder = tmp_path_factory.mktemp("web-e2e")
    image, labels, painted = cropped_chaos_scan(folder / "scan")
    port = free_port()
    # Its own embeddings, but the built encoders and `auto`'s verdict of the default cache, which the session tests'
    # jobs use too: built once for this run of the web tests, not twice (about a minute where a compiled encoder is).
    from FewShotSAMLib.embedding_cache import EmbeddingCache, default_cache_dir

    shared_encoders = EmbeddingCache(default_cache_dir()).encoders_dir
    shared_encoders.mkdir(parents=True, exist_ok=True)
    EmbeddingCache(folder / "cache").encoders_dir.symlink_to(shared_encoders, target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "FewShotSAMLib", "serve", str(image), "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--cache-dir", str(folder / "cache"), "--work-dir", str(folder / "work")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(folder), start_new_session=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "chromium": chromium, "labels": labels, "painted": painted,
               "folder": folder, "process": process}
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def state(page, key):
    return page.evaluate(f"window.trame.state.get('{key}')")


def wait_state(page, expression: str, timeout_s: float):
    try:
        page.wait_for_function(f"window.trame && window.trame.state && ({expression})", timeout=timeout_s * 1000)
    except Exception as error:
        keys = ("fsam_message", "fsam_painted", "fsam_axial", "fsam_runs", "fsam_running", "fsam_stage")
        shown = {key: state(page, key) for key in keys} if page.evaluate("!!(window.trame && window.trame.state)") \
            else "no trame state"
        raise AssertionError(f"timed out after {timeout_s} s waiting for {expression}; page state: {shown}") from error


def axial_element_box(page, size):
    """Page box of the axial view's image: the view element whose size is the render window's."""
    box = page.evaluate("""([w, h]) => {
        for (const e of document.querySelectorAll('.image-display-area, video, canvas')) {
            const r = e.parentElement.getBoundingClientRect();
            if (Math.abs(r.width - w) <= 2 && Math.abs(r.height - h) <= 2) return [r.x, r.y, r.width, r.height];
        }
        return null; }""", size)
    assert box is not None, f"no view element of the axial view's size {size} in the page"
    return box


def to_page(geometry, box, i: float, j: float, k: float) -> tuple[float, float]:
    """Voxel (i, j, k) -> page pixel, through the server's voxel -> view-pixel map (origin at the bottom left)."""
    m = np.asarray(geometry["ijkToXy"], float).reshape(2, 4)
    x, y = (m[row, 0] * i + m[row, 1] * j + m[row, 2] * k + m[row, 3] for row in (0, 1))
    width, height = geometry["size"]
    return box[0] + x * box[2] / width, box[1] + (height - y) * box[3] / height


def paint_strokes(mask: np.ndarray, radius_voxels: float, visible: np.ndarray) -> list[list[tuple[int, int]]]:
    """Horizontal strokes (lists of (i, j)) that cover the organ's slice with a brush of this radius, staying inside.

    Rows 1.8 brush radii apart (so that neighbouring strokes overlap) through the organ eroded by the brush radius
    and kept to the voxels the view shows; each run of a row is one stroke.
    """
    from scipy import ndimage

    erosion = int(np.ceil(radius_voxels))
    inner = ndimage.binary_erosion(mask, iterations=erosion) & visible
    assert inner.any(), f"the organ is thinner than the brush ({radius_voxels:.1f} voxels radius)"
    rows = np.flatnonzero(inner.any(axis=1))
    strokes = []
    for j in range(int(rows.min()), int(rows.max()) + 1, max(1, int(1.8 * radius_voxels))):
        columns = np.flatnonzero(inner[j])
        if columns.size == 0:
            continue
        runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
        strokes += [[(int(run[0]), j), (int(run[-1]), j)] for run in runs if run.size]
    return strokes


def drag(page, points, step_pixels: float):
    """A mouse drag through the points.

    The page queues mouse events for the server and merges the moves that wait behind a busy server; the brush
    interpolates between the positions it gets, so a straight drag paints the same line whatever gets merged.
    """
    page.mouse.move(*points[0])  # the brush follows the pointer on the shown slice
    time.sleep(0.1)
    page.mouse.down()
    for start, end in zip(points[:-1], points[1:]):
        steps = max(1, int(np.ceil(np.hypot(end[0] - start[0], end[1] - start[1]) / step_pixels)))
        for n in range(1, steps + 1):
            page.mouse.move(start[0] + (end[0] - start[0]) * n / steps, start[1] + (end[1] - start[1]) * n / steps)
            time.sleep(0.1)
    page.mouse.up()


def choose_paint_effect(page):
    """Click the segment editor's Paint button (the lowest brush icon of the left tool bar) and wait for it."""
    page.wait_for_function("document.querySelectorAll('button i.mdi-brush').length >= 2", timeout=30000)
    center = page.evaluate("""() => {
        const boxes = [...document.querySelectorAll('button')].filter(b => b.querySelector('i.mdi-brush'))
            .map(b => b.getBoundingClientRect()).filter(r => r.width > 0 && r.y > 0 && r.bottom < innerHeight)
            .sort((a, b) => a.y - b.y);
        const r = boxes[boxes.length - 1];
        return [r.x + r.width / 2, r.y + r.height / 2]; }""")
    page.mouse.click(*center)
    wait_state(page, "String(window.trame.state.get('SegmentEditorState__active_effect_name')).endsWith('Paint')", 30)


def go_to_slice(page, index: int):
    """Scroll the axial view to slice `index` with the mouse wheel over it, as in desktop Slicer.

    Wheel events travel in the same ordered queue as the brush strokes, so once the view shows the new slice every
    stroke made before it has been applied: this is the test's barrier between slices and before segment changes.
    (A page control such as the slice slider sends its change at once; it could overtake strokes that a busy server
    has not applied yet and put them on the new slice, or into the next segment.)
    """
    geometry = state(page, "fsam_axial")
    box = axial_element_box(page, geometry["size"])
    page.mouse.move(box[0] + 0.5 * box[2], box[1] + 0.04 * box[3])  # above the body, clear of the slider
    forward = 1
    for _ in range(3 * geometry["slices"]):
        current = state(page, "fsam_axial")["slice"]
        if current == index:
            return
        page.mouse.wheel(0, (-100 if current < index else 100) * forward)
        wait_state(page, f"window.trame.state.get('fsam_axial').slice !== {current}", 120)
        if abs(state(page, "fsam_axial")["slice"] - index) > abs(current - index):
            forward = -forward  # the wheel runs the other way through this scan's slices
    raise AssertionError(f"the mouse wheel did not reach slice {index}: {state(page, 'fsam_axial')}")


def brush_diameter_mm(page) -> float:
    """The Paint brush's diameter as the page's brush slider holds it (the app sets the brush size in mm)."""
    from trame_slicer.segmentation import BrushDiameterMode

    assert state(page, "PaintEffectState__brush_diameter_mode") == BrushDiameterMode.Absolute.value
    return float(state(page, "PaintEffectState__brush_diameter_slider__SliderState__value"))


def paint_organ(page, reference: np.ndarray, value: int, slices: list[int], spacing_mm: float):
    """Paint the organ on each slice with row strokes of the page's brush (into the selected segment)."""
    radius_voxels = brush_diameter_mm(page) / 2 / spacing_mm
    for index in slices:
        go_to_slice(page, index)
        geometry = state(page, "fsam_axial")
        box = axial_element_box(page, geometry["size"])
        pixels_per_voxel = abs(geometry["ijkToXy"][0]) * box[2] / geometry["size"][0]
        jj, ii = np.mgrid[0:reference.shape[1], 0:reference.shape[2]]
        x, y = to_page(geometry, box, ii, jj, index)
        margin = radius_voxels * pixels_per_voxel + 2
        visible = ((x > box[0] + margin) & (x < box[0] + box[2] - margin) & (y > box[1] + margin)
                   & (y < box[1] + box[3] - margin))
        for stroke in paint_strokes(reference[index] == value, radius_voxels, visible):
            drag(page, [to_page(geometry, box, i, j, index) for i, j in stroke], 3 * radius_voxels * pixels_per_voxel)
        if os.environ.get("FEWSHOTSAM_WEB_DEBUG"):
            page.screenshot(path=os.path.join(os.environ["FEWSHOTSAM_WEB_DEBUG"], f"paint-{value}-{index}.png"))
    # the next slice change (the caller's) waits for these strokes


def download_segmentation(page, folder: Path, name: str) -> Path:
    with page.expect_download(timeout=60000) as download:
        page.locator("#fsam-export-seg-nrrd").click()
    path = folder / name
    download.value.save_as(str(path))
    return path


def read_segments(path: Path) -> tuple[list[dict], np.ndarray]:
    import slicerio

    data = slicerio.read_segmentation(str(path))
    voxels = np.transpose(data["voxels"], (2, 1, 0))  # slicerio: i, j, k; the reference: k, j, i
    return data["segments"], voxels


def test_paint_propagate_export_and_cancel_in_a_real_browser(server):
    from playwright.sync_api import sync_playwright

    reference = reference_array(server["labels"])
    spacing_mm = reference_spacing_mm(server["labels"])
    painted = server["painted"]
    folder = server["folder"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=server["chromium"], args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:  # the server needs a few seconds before it listens
                try:
                    page.goto(server["url"])
                    break
                except Exception:
                    if time.monotonic() > deadline or server["process"].poll() is not None:
                        raise AssertionError("the server did not start: "
                                             + (folder / "server.log").read_text()[-2000:]) from None
                    time.sleep(1)
            wait_state(page, "window.trame.state.get('fsam_scan_name') && window.trame.state.get('fsam_axial')",
                       START_TIMEOUT_S)

            started = time.monotonic()
            # two segments, each painted on the same 3 axial slices with mouse drags
            page.get_by_role("button", name="Add segment").click()
            wait_state(page, "Object.keys(window.trame.state.get('fsam_painted') || {}).length === 1", 30)
            choose_paint_effect(page)
            paint_organ(page, reference, LIVER, painted, spacing_mm)
            go_to_slice(page, painted[0])  # every liver stroke is in before the next segment is added
            page.locator("button:has(.mdi-plus)").last.click()
            wait_state(page, "Object.keys(window.trame.state.get('fsam_painted') || {}).length === 2", 30)
            choose_paint_effect(page)  # adding a segment leaves the current effect
            paint_organ(page, reference, SPLEEN, painted, spacing_mm)
            go_to_slice(page, painted[0])
            wait_state(page, f"Object.values(window.trame.state.get('fsam_painted'))[1].includes({painted[-1]})", 30)
            page.screenshot(path=str(folder / "painted.png"))
            assert list(state(page, "fsam_painted").values()) == [painted, painted], state(page, "fsam_painted")

            # Adapt & Propagate in the worker: progress, then a preview to accept
            print(f"painted in {time.monotonic() - started:.0f} s")
            page.locator("#fsam-propagate").click()
            wait_state(page, "window.trame.state.get('fsam_runs') === 1", RUN_TIMEOUT_S)
            assert state(page, "fsam_message_type") == "success", state(page, "fsam_message")
            assert state(page, "fsam_preview")
            print(f"propagated at {time.monotonic() - started:.0f} s")
            page.locator("#fsam-accept").click()
            wait_state(page, "!window.trame.state.get('fsam_preview')", 30)
            go_to_slice(page, painted[0] + 1)  # a slice FewShotSAM filled in
            time.sleep(1.0)  # the views' new images reach the page
            page.screenshot(path=str(folder / "web-app.png"))
            if os.environ.get("FEWSHOTSAM_WEB_SCREENSHOT"):
                shutil.copyfile(folder / "web-app.png", os.environ["FEWSHOTSAM_WEB_SCREENSHOT"])

            first = download_segmentation(page, folder, "first.seg.nrrd")
            segments, voxels = read_segments(first)
            assert voxels.shape == reference.shape
            assert [s["labelValue"] for s in segments] == [1, 2]
            # a second run, cancelled: the segmentation stays exactly as it was
            page.locator("#fsam-propagate").click()
            page.locator("#fsam-cancel").click(timeout=30000)
            wait_state(page, "window.trame.state.get('fsam_runs') === 2", RUN_TIMEOUT_S)
            assert "Cancelled" in state(page, "fsam_message"), state(page, "fsam_message")
            assert not state(page, "fsam_preview")
            _, after = read_segments(download_segmentation(page, folder, "after-cancel.seg.nrrd"))
            np.testing.assert_array_equal(after, voxels)
            unpainted = [k for k in range(reference.shape[0]) if k not in painted]
            scores = {}
            for segment, organ in zip(segments, (LIVER, SPLEEN)):
                mask = voxels == segment["labelValue"]
                assert mask[painted].any(), f"{segment['name']} has no painted voxels"
                scores[organ] = support.dice(mask[unpainted], reference[unpainted] == organ)
            print(f"browser e2e Dice on unpainted slices: liver {scores[LIVER]:.3f}, spleen {scores[SPLEEN]:.3f}")
            for organ, floor in DICE_FLOOR.items():
                assert scores[organ] >= floor, scores
        finally:
            browser.close()
