"""What the web app does with the scene, without any widget: open a scan, run FewShotSAM, preview, export.

``WebSession`` works on a trame-slicer ``SlicerApp`` (scene, views, segment editor) and the extension's shared logic
(``FewShotSAMSlicerLib``: painted slices, worker process, export), so it is tested server-side without a browser.
The widgets and their wiring live in app.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from FewShotSAMSlicerLib import export as exportModule
from FewShotSAMSlicerLib import mrml_conversion as mc
from FewShotSAMSlicerLib import painted_slices as ps
from FewShotSAMSlicerLib import scan_files
from FewShotSAMSlicerLib.errors import FewShotSAMSlicerError
from FewShotSAMSlicerLib.logic import FewShotSAMJob, FewShotSAMSlicerLogic
from FewShotSAMSlicerLib.preview import SegmentationSnapshot

# Export kinds offered for download: file suffix and MIME type.
EXPORTS = {
    "seg.nrrd": ("application/octet-stream", "segmentation"),
    "nrrd": ("application/octet-stream", "labelmap"),
    "nii.gz": ("application/gzip", "labelmap"),
}


class WebSession:
    """One browser session's scene operations (the scene and its volume belong to the trame-slicer app)."""

    def __init__(self, slicerApp, workDirectory: str | None = None, device: str = "auto",
                 cacheDirectory: str | None = None):
        self.slicerApp = slicerApp
        self.workDirectory = Path(workDirectory or tempfile.mkdtemp(prefix="fewshotsam-web-"))
        self.workDirectory.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.logic = FewShotSAMSlicerLogic(cacheDirectory=cacheDirectory,
                                           temporaryDirectory=str(self.workDirectory / "jobs"))
        self.volumeNode = None
        self.job: FewShotSAMJob | None = None
        self.snapshot: SegmentationSnapshot | None = None  # set while a result waits to be accepted or discarded
        self.modelPath: str | None = None  # the adapted model (.fsam) saved or uploaded last, for "Apply model"

    # -- scans ---------------------------------------------------------------------------------------------------
    @property
    def scene(self):
        return self.slicerApp.scene

    @property
    def segmentationNode(self):
        return self.slicerApp.segmentation_editor.active_segmentation_node

    def loadScan(self, path: str):
        """Read a checked scan file or DICOM folder into a fresh scene and show it. Returns the volume node."""
        self.ensureIdle("open another scan")
        volumes = self.slicerApp.io_manager.load_volumes([path]) if Path(path).is_file() else []
        if not volumes:
            volumes = self._loadThroughEngineReader(path)
        self.volumeNode = volumes[0]
        self.snapshot = None
        self.logic.prepareWorker()  # the engine's imports run while the user paints
        return self.volumeNode

    def _loadThroughEngineReader(self, path: str):
        # DICOM folders (and anything Slicer's archetype reader refuses) go through the engine's reader to .nrrd.
        from FewShotSAMLib.volume_io import read_volume, write_volume

        converted = self.workDirectory / "uploads" / f"scan-{os.getpid()}-{len(os.listdir(self.workDirectory))}.nrrd"
        converted.parent.mkdir(parents=True, exist_ok=True)
        write_volume(converted, read_volume(path), overwrite=True)
        volumes = self.slicerApp.io_manager.load_volumes([str(converted)])
        if not volumes:
            raise FewShotSAMSlicerError(f"{os.path.basename(path)}: Slicer could not load the scan.")
        return volumes

    def scanFromUpload(self, files: list[tuple[str, bytes]]) -> str:
        folder = tempfile.mkdtemp(prefix="upload-", dir=self._folder("uploads"))
        try:
            return scan_files.scanFromUpload(files, folder)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _folder(self, name: str) -> str:
        folder = self.workDirectory / name
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    # -- Adapt & Propagate ---------------------------------------------------------------------------------------
    def ensureIdle(self, what: str) -> None:
        if self.job is not None and self.job.isRunning:
            raise FewShotSAMSlicerError(f"FewShotSAM is still running; wait for it or press Cancel before you {what}.")

    def startPropagation(self, progressCallback=None) -> FewShotSAMJob:
        self.ensureIdle("start another run")
        if self.volumeNode is None or self.segmentationNode is None:
            raise FewShotSAMSlicerError("Open a scan and paint a few slices of each structure first.")
        self.accept()  # a pending preview is kept when the user runs again

        def takeSnapshot():
            self.snapshot = SegmentationSnapshot(self.segmentationNode)

        self.job = self.logic.startPropagation(self.volumeNode, self.segmentationNode, device=self.device,
                                               progressCallback=progressCallback, beforeModifyCallback=takeSnapshot)
        return self.job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def accept(self) -> None:
        self.snapshot = None

    def discard(self) -> None:
        if self.snapshot is not None:
            self.snapshot.restore()
        self.snapshot = None

    # -- adapted models (.fsam) ---------------------------------------------------------------------------------
    def startSaveModel(self, progressCallback=None) -> FewShotSAMJob:
        """Adapt the model to the painted slices into a new .fsam on the server (then offered for download)."""
        self.ensureIdle("save a model")
        if self.volumeNode is None or self.segmentationNode is None:
            raise FewShotSAMSlicerError("Open a scan and paint a few slices of each structure first.")
        self.accept()
        folder = tempfile.mkdtemp(prefix="model-", dir=self._folder("models"))
        path = os.path.join(folder, f"{self._stem()}-fewshotsam.fsam")

        def remember(job):
            if job.status == "succeeded":
                self.modelPath = job.result["modelPath"]

        self.job = self.logic.startAdapt(self.volumeNode, self.segmentationNode, path, device=self.device,
                                         progressCallback=progressCallback, finishedCallback=remember)
        return self.job

    def modelFromUpload(self, name: str, content: bytes) -> str:
        """Keep an uploaded adapted model for "Apply model"; a file that is not a .fsam is refused, nothing kept."""
        base = os.path.basename(str(name).replace("\\", "/")) or "model.fsam"
        if not base.lower().endswith(".fsam"):
            raise FewShotSAMSlicerError(f"{base}: not an adapted model; choose a .fsam file saved by FewShotSAM.")
        if not content:
            raise FewShotSAMSlicerError(f"{base}: the file is empty.")
        folder = tempfile.mkdtemp(prefix="model-", dir=self._folder("models"))
        path = os.path.join(folder, base)
        Path(path).write_bytes(content)
        self.modelPath = path
        return path

    def modelFile(self) -> tuple[str, bytes]:
        if not self.modelPath or not os.path.isfile(self.modelPath):
            raise FewShotSAMSlicerError("No adapted model yet: press Save model (or load a .fsam) first.")
        return os.path.basename(self.modelPath), Path(self.modelPath).read_bytes()

    def startApplyModel(self, progressCallback=None) -> FewShotSAMJob:
        """Segment the open scan with the adapted model, into a new segmentation that the editor then shows."""
        self.ensureIdle("apply a model")
        if self.volumeNode is None:
            raise FewShotSAMSlicerError("Open the scan to segment first.")
        if not self.modelPath:
            raise FewShotSAMSlicerError("No adapted model yet: press Save model (or load a .fsam) first.")
        self.accept()
        volume = self.volumeNode

        def showResult(job):
            if job.status == "succeeded":
                editor = self.slicerApp.segmentation_editor
                editor.set_active_segmentation(job.result["segmentationNode"], volume)

        self.job = self.logic.startApply(self.modelPath, volume, device=self.device,
                                         progressCallback=progressCallback, finishedCallback=showResult)
        return self.job

    def _stem(self) -> str:
        name = self.volumeNode.GetName() if self.volumeNode is not None else ""
        for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
            if name.lower().endswith(suffix):
                name = name[:-len(suffix)]
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "scan"

    def segmentVoxelCounts(self) -> dict[str, int]:
        """Segment name -> number of voxels (the page shows it; it settles once every brush stroke is applied)."""
        if self.volumeNode is None or self.segmentationNode is None:
            return {}
        segmentation = self.segmentationNode.GetSegmentation()
        ids = mc.segmentIds(self.segmentationNode)
        masks = mc.segmentMasks(self.segmentationNode, ids, self.volumeNode) if ids else {}
        return {segmentation.GetSegment(i).GetName(): int(masks[i].sum()) for i in ids}

    def paintedSlices(self) -> dict[str, list[int]]:
        """Segment name -> the slices (along the propagation axis) that hold the user's painting."""
        return self.paintedAndPropagatedSlices()[0]

    def paintedAndPropagatedSlices(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Per segment name: the slices the user painted, and the other non-empty slices (filled in by a run)."""
        if self.volumeNode is None or self.segmentationNode is None:
            return {}, {}
        segmentation = self.segmentationNode.GetSegmentation()
        ids = mc.segmentIds(self.segmentationNode)
        if not ids:
            return {}, {}
        axis = self.logic.sliceAxis(self.volumeNode)
        grid = mc.gridFingerprint(self.volumeNode)
        masks = mc.segmentMasks(self.segmentationNode, ids, self.volumeNode)
        painted, propagated = {}, {}
        for i in ids:
            name = segmentation.GetSegment(i).GetName()
            painted[name] = ps.paintedSlices(masks[i], axis, grid, ps.readRecord(segmentation.GetSegment(i)))
            propagated[name] = [k for k in ps.nonEmptySlices(masks[i], axis) if k not in painted[name]]
        return painted, propagated

    # -- export --------------------------------------------------------------------------------------------------
    def exportFile(self, kind: str) -> tuple[str, bytes]:
        """(file name, content) of the segmentation as .seg.nrrd, or as a labelmap .nrrd / .nii.gz."""
        if kind not in EXPORTS:
            raise FewShotSAMSlicerError(f"Unknown export type '{kind}'; use one of {', '.join(EXPORTS)}.")
        if self.volumeNode is None or self.segmentationNode is None:
            raise FewShotSAMSlicerError("Open a scan and segment it before exporting.")
        stem = self.volumeNode.GetName() or "scan"
        name = f"{stem}-fewshotsam.{kind}" if kind == "seg.nrrd" else f"{stem}-fewshotsam-labels.{kind}"
        folder = tempfile.mkdtemp(prefix="export-", dir=self._folder("exports"))
        try:
            path = os.path.join(folder, name)
            if EXPORTS[kind][1] == "segmentation":
                exportModule.exportSegmentation(self.segmentationNode, self.volumeNode, segmentationPath=path)
            else:
                exportModule.exportSegmentation(self.segmentationNode, self.volumeNode, labelmapPath=path)
            return name, Path(path).read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- geometry published to the page ---------------------------------------------------------------------------
    def axialViewGeometry(self) -> dict | None:
        """Where the volume's voxels are in the axial view: slice index and a voxel (i, j, k) -> view pixel map.

        The page shows the current slice and whether it is painted; the browser test uses the map to paint with
        real mouse drags. View pixels have their origin at the bottom left, as VTK's display coordinates. "slice"
        counts along the array axis the propagation uses (taken from the direction matrix, as the logic does).
        """
        view = self.axialView()
        if view is None or self.volumeNode is None:
            return None
        xyToRas = mc.matrixToArray(self._sliceNode(view).GetXYToRAS())
        ijkToRas = mc.ijkToRas(self.volumeNode)
        ijkToXy = np.linalg.inv(xyToRas) @ ijkToRas
        centerIjk = np.linalg.inv(ijkToRas) @ xyToRas @ np.array([0, 0, 0, 1.0])
        axis = self.logic.sliceAxis(self.volumeNode)
        width, height = view.render_window().GetSize()
        return {"ijkToXy": [round(float(v), 6) for v in ijkToXy[:2].ravel()], "size": [int(width), int(height)],
                "axis": axis, "slice": int(round(centerIjk[2 - axis])),
                "slices": int(mc.volumeShape(self.volumeNode)[axis])}

    def _sliceNode(self, view):
        return self.scene.GetNodeByID(view.get_view_node_id())

    def axialView(self):
        """The slice view that looks along the superior axis (after a scene reset trame-slicer names every view's
        orientation "Reformat", so it is found by its slice normal, not by name)."""
        def alignment(view):
            sliceToRas = self._sliceNode(view).GetSliceToRAS()
            return abs(sliceToRas.GetElement(2, 2))

        views = [view for view in self.slicerApp.view_manager.get_slice_views() if self._sliceNode(view) is not None]
        return max(views, key=alignment) if views else None

    def showSlice(self, index: int) -> None:
        """Move the axial view to slice `index` along the propagation's slice axis, through the volume's centre."""
        view = self.axialView()
        if view is None or self.volumeNode is None:
            return
        shape = mc.volumeShape(self.volumeNode)
        axis = self.logic.sliceAxis(self.volumeNode)
        if not 0 <= int(index) < shape[axis]:
            raise FewShotSAMSlicerError(f"Slice {index} is outside the scan (0 to {shape[axis] - 1}).")
        centerKji = [(n - 1) / 2 for n in shape]
        centerKji[axis] = int(index)
        center = mc.ijkToRas(self.volumeNode) @ np.array([centerKji[2], centerKji[1], centerKji[0], 1.0])
        normal = mc.matrixToArray(self._sliceNode(view).GetSliceToRAS())[:3, 2]
        # Through the view's slice logic, as its own slider does, so that the effects follow the new slice at once.
        view.set_slice_value(float(normal @ center[:3]))
        view.render()
