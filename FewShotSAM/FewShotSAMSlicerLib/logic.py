"""FewShotSAM's Slicer logic: scene -> worker files -> worker process -> scene.

``FewShotSAMSlicerLogic`` turns the user's choices into a job:

1. checks the inputs (scalar source volume, segmentation, parent transforms: refused unless
   ``hardenTransforms=True``, checkpoint file for the SAM/MedSAM models);
2. finds, per segment, the slices the user painted (see painted_slices.py) along the slice axis the engine will
   use, and writes the source volume (image.nrrd) and those painted slices (labels-N.nrrd, one label value per
   segment) on the segmentation's reference geometry (the grid the Segment Editor paints on; usually the source
   volume's, see mrml_conversion.workingGrid) into a fresh temporary folder, through Slicer's storage nodes;
3. starts ``python -m FewShotSAMLib propagate ... --progress json`` in its own process (see worker.py) with the
   same ``--cache-dir`` every time, so the image embeddings computed on the first click are reused. The engine
   takes every painted slice as showing every structure it propagates; since a Slicer user paints each segment
   on its own slices, segments painted on different slices are propagated in separate runs, one after the other
   (``paintedSlicesComplete=True`` runs them all at once when the user painted every structure on each slice);
4. returns a ``FewShotSAMJob`` that the caller polls from the GUI thread (a QTimer) or waits for (scripts, tests).
   When the worker succeeds, the job writes the propagated masks into the propagated segments only (or into a
   preview node, committed later), puts the painted slices back exactly as painted, and records what it wrote.
   On error or Cancel the segmentation is left exactly as it was.

"Save adapted model" (``fewshotsam adapt``) and "Apply to volume" (``fewshotsam apply``) run the same way.

Everything here imports ``slicer``/``vtk`` only (no ``qt``), so it runs in plain Python with the slicer-core wheel.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import slicer

from FewShotSAMLib.atomic_write import write_atomically

from . import export as exportModule
from . import mrml_conversion as mc
from . import painted_slices as ps
from . import worker as wk
from .errors import FewShotSAMSlicerError, JobCancelled, WorkerFailed
from .parameters import DEVICES, MODELS, MODELS_NEEDING_CHECKPOINT
from .suggestions import suggestionsFromReports

ProgressCallback = Callable[[float, str], None]
# resultWriter(segmentationNode, segmentId, mask [k, j, i] bool, gridNode): writes one segment's result
ResultWriter = Callable[[object, str, np.ndarray, object], None]

PROPAGATE = "propagate"
ADAPT = "adapt"
APPLY = "apply"

RUNNING = wk.RUNNING
SUCCEEDED = wk.SUCCEEDED
FAILED = wk.FAILED
CANCELLED = wk.CANCELLED

# Jobs whose worker may still run, so that application exit can stop them all (see shutdownAllJobs).
_RUNNING_JOBS: weakref.WeakSet = weakref.WeakSet()
# One engine process waiting for the next job, shared by the module, the Segment Editor effect and the web app.
STANDBY_WORKERS = wk.StandbyProcessFactory()

MODEL_VALUES = tuple(value for value, _ in MODELS)
DEVICE_VALUES = tuple(value for value, _ in DEVICES)


def defaultCacheDirectory() -> str | None:
    """<Slicer cache>/FewShotSAM inside Slicer; None elsewhere (the engine then uses its own default folder)."""
    app = getattr(slicer, "app", None)
    cachePath = getattr(app, "cachePath", None) if app is not None else None
    if callable(cachePath):
        cachePath = cachePath()
    return os.path.join(str(cachePath), "FewShotSAM") if cachePath else None


def defaultTemporaryDirectory() -> str:
    app = getattr(slicer, "app", None)
    temporaryPath = getattr(app, "temporaryPath", None) if app is not None else None
    if callable(temporaryPath):
        temporaryPath = temporaryPath()
    return str(temporaryPath) if temporaryPath else tempfile.gettempdir()


@dataclass
class PaintedInput:
    """What goes to the worker: the painted slices of each segment, as one labelmap."""

    axis: int
    grid: str
    segmentIds: list[str]  # label value n (1-based) = segmentIds[n - 1]
    painted: dict[str, list[int]]
    masks: dict[str, np.ndarray]  # each segment's full mask when the job started
    labels: np.ndarray
    skipped: list[str] = field(default_factory=list)  # segments without painted slices (left untouched)
    orientation: str = "auto"  # the slice orientation passed to the engine (names the plane `axis` stands for)


@dataclass
class WorkerStep:
    """One worker command of a job, and a label for its progress messages (e.g. the segments it propagates)."""

    command: list[str]
    env: dict
    label: str = ""


class FewShotSAMJob:
    """One or more worker runs, one after the other, and what happens with their output.

    Poll it from the GUI thread (never blocks), or ``wait()`` for it. ``status`` is "running", then "succeeded",
    "failed" (``errorMessage`` says why, in one readable line) or "cancelled". ``result`` holds what the job produced
    (the updated segment IDs, the saved model, the output node). The scene is only changed at the very end, after
    every run succeeded, in the thread that polls.
    """

    def __init__(self, kind: str, steps: list[WorkerStep], processFactory, temporaryDirectory: str, onSuccess,
                 description: str = "", progressCallback: ProgressCallback | None = None, finishedCallback=None,
                 keepFiles: bool = False, logCallback=None):
        self.kind = kind
        self.steps = list(steps)
        self.processFactory = processFactory
        self.temporaryDirectory = temporaryDirectory
        self.description = description
        self.progressCallback = progressCallback
        self.finishedCallback = finishedCallback
        self.keepFiles = keepFiles
        self.logCallback = logCallback
        self._onSuccess = onSuccess
        self._cancelRequested = False
        self.status = RUNNING
        self.errorMessage = ""
        self.errorDetails = ""
        self.result = None
        self.paintedInput: PaintedInput | None = None
        self.stepIndex = 0
        self.run: wk.WorkerRun | None = None
        self.runs: list[wk.WorkerRun] = []
        self.startedAt = time.monotonic()
        self.elapsedSeconds: float | None = None
        _RUNNING_JOBS.add(self)
        self._startStep()

    @property
    def command(self) -> list[str]:
        return self.steps[0].command if self.steps else []

    @property
    def commands(self) -> list[list[str]]:
        return [step.command for step in self.steps]

    @property
    def isRunning(self) -> bool:
        return self.status == RUNNING

    @property
    def pid(self) -> int | None:
        return self.run.process.pid if self.run is not None else None

    def _startStep(self) -> None:
        step = self.steps[self.stepIndex]
        logging.info("FewShotSAM: %s", " ".join(step.command))
        self.run = wk.WorkerRun(self.processFactory(step.command, step.env), progressCallback=self._onWorkerProgress,
                                logCallback=self.logCallback).start()
        self.runs.append(self.run)
        if self.run.status != RUNNING:  # the process could not even start
            self._conclude(FAILED, self.run.errorMessage)

    def _onWorkerProgress(self, progress: wk.Progress) -> None:
        message = progress.message or (f"{progress.stage} {progress.done}/{progress.total}"
                                       if progress.total else progress.stage)
        count = len(self.steps)
        if count > 1:
            label = self.steps[self.stepIndex].label
            message = f"[{self.stepIndex + 1}/{count}{' ' + label if label else ''}] {message}"
        overall = (self.stepIndex + progress.fraction) / max(1, count)
        self.report(0.02 + 0.96 * overall, message)

    def report(self, fraction: float, message: str) -> None:
        if self.progressCallback is not None:
            try:
                self.progressCallback(float(fraction), message)
            except Exception:  # a broken progress display must not break the job
                logging.exception("FewShotSAM: progress callback failed")

    def cancel(self) -> None:
        """Stop the worker (its whole process tree); the scene is not changed."""
        if self.status != RUNNING:
            return
        self._cancelRequested = True
        self.run.cancel()

    def shutdown(self, grace: float = wk.KILL_GRACE_SECONDS) -> None:
        """Stop now, for application exit or module cleanup: SIGTERM, then SIGKILL after `grace` seconds (this
        blocks at most that long: no timer will poll again), then the temporary folder is removed. The scene is
        not changed and no callback runs."""
        if self.status != RUNNING:
            return
        self._cancelRequested = True
        self.progressCallback = self.finishedCallback = None
        if self.run is not None:
            self.run.process.stop(grace)
        self._conclude(CANCELLED, JobCancelled().args[0])

    def poll(self) -> bool:
        """Never blocks. Returns True while the job is running; finishes the job (in this thread) when it ends."""
        if self.status != RUNNING:
            return False
        if self.run.poll():
            return True
        self._prepareNextWorker()
        if self._cancelRequested or self.run.status == CANCELLED:
            self._conclude(CANCELLED, JobCancelled().args[0])
        elif self.run.status == SUCCEEDED and self.stepIndex + 1 < len(self.steps):
            self.stepIndex += 1
            self._startStep()
            return self.status == RUNNING
        elif self.run.status == SUCCEEDED:
            try:
                self.report(0.99, "Writing the result")
                self.result = self._onSuccess(self)
            except FewShotSAMSlicerError as error:
                self._conclude(FAILED, str(error))
                return False
            except Exception as error:  # an internal bug: readable line for the user, traceback for the log
                self.errorDetails = traceback.format_exc()
                logging.error("FewShotSAM: %s", self.errorDetails)
                self._conclude(FAILED, f"Internal error while writing the result: {error}")
                return False
            self._conclude(SUCCEEDED, "")
        else:
            self.errorDetails = self.run.stderrText
            if self.errorDetails:
                logging.warning("FewShotSAM worker output:\n%s", self.errorDetails)
            self._conclude(FAILED, self.run.errorMessage)
        return False

    def _prepareNextWorker(self) -> None:
        # The worker has ended, so the next one (this job's next step, or the next job) can start its imports
        # without taking CPU from it.
        prepare = getattr(self.processFactory, "prepare", None)
        if prepare is not None:
            step = self.steps[self.stepIndex]
            prepare(step.command[0], step.env)

    def _conclude(self, status: str, message: str) -> None:
        _RUNNING_JOBS.discard(self)
        self.status = status
        self.errorMessage = message
        self.elapsedSeconds = time.monotonic() - self.startedAt
        if status == SUCCEEDED:
            self.report(1.0, "Done")
        if not self.keepFiles and self.temporaryDirectory:
            shutil.rmtree(self.temporaryDirectory, ignore_errors=True)
        if self.finishedCallback is not None:
            try:
                self.finishedCallback(self)
            except Exception:
                logging.exception("FewShotSAM: finished callback failed")

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> str:
        """Block until the job ends (scripts and tests; the GUI polls instead). Returns the status."""
        wk.waitWhile(self.poll, timeout, interval)
        return self.status

    def raiseIfFailed(self) -> "FewShotSAMJob":
        if self.status == FAILED:
            raise WorkerFailed(self.errorMessage, self.run.process.returnCode if self.run else None,
                               self.errorDetails)
        if self.status == CANCELLED:
            raise JobCancelled(self.errorMessage)
        return self


def shutdownAllJobs() -> int:
    """Stop every running job and the standby worker now (application exit: Slicer's aboutToQuit). Returns how
    many jobs were stopped."""
    jobs = [job for job in list(_RUNNING_JOBS) if job.isRunning]
    for job in jobs:
        job.shutdown()
    STANDBY_WORKERS.close()
    return len(jobs)


def groupSegmentsBySlices(painted: dict[str, list[int]], order: list[str]) -> list[list[str]]:
    """Segments painted on exactly the same slices, together; in the order of `order`.

    The engine takes each painted slice as showing every structure it propagates (a structure not painted on a
    painted slice is learned as absent there). Segments painted on different slices therefore go to separate runs,
    so that painting the spleen on a slice never teaches that the liver is absent from it.
    """
    groups: dict[tuple[int, ...], list[str]] = {}
    for segmentId in order:
        groups.setdefault(tuple(sorted(painted[segmentId])), []).append(segmentId)
    return list(groups.values())


class PendingResult:
    """A propagation result not yet in the segmentation: shown as a preview, then committed (or dropped).

    ``masks`` are on ``gridNode``'s voxel grid (the segmentation's reference geometry); ``painted`` holds each
    segment's painted slices, recorded with the result so that the next run knows which slices the user painted.
    """

    def __init__(self, segmentationNode, gridNode, axis: int, grid: str, skipped=()):
        self.segmentationNode = segmentationNode
        self.scene = segmentationNode.GetScene()
        self.gridNode = gridNode
        self.axis = axis
        self.grid = grid
        self.skipped = list(skipped)
        self.masks: dict[str, np.ndarray] = {}
        self.painted: dict[str, tuple[int, ...]] = {}

    def showIn(self, previewNode) -> None:
        """Write the result into a separate segmentation node (same segment IDs, names and colours)."""
        source = self.segmentationNode.GetSegmentation()
        target = previewNode.GetSegmentation()
        wasModifying = previewNode.StartModify()
        try:
            for index in reversed(range(target.GetNumberOfSegments())):  # a previous preview's other segments
                if target.GetNthSegmentID(index) not in self.masks:
                    target.RemoveSegment(target.GetNthSegmentID(index))
            for segmentId, mask in self.masks.items():
                if target.GetSegment(segmentId) is None:
                    segment = slicer.vtkSegment()
                    segment.SetName(source.GetSegment(segmentId).GetName())
                    segment.SetColor(source.GetSegment(segmentId).GetColor())
                    target.AddSegment(segment, segmentId)
                mc.setSegmentMask(previewNode, segmentId, mask, self.gridNode)
        finally:
            previewNode.EndModify(wasModifying)

    def commit(self, resultWriter: ResultWriter | None = None, beforeModifyCallback=None) -> dict:
        """Write the result into the segmentation, as one modification (one undo step when the caller saves the
        editor's undo state in beforeModifyCallback). Segments deleted meanwhile are left out."""
        segmentationNode = self.segmentationNode
        if self.scene is not None and segmentationNode.GetScene() is not self.scene:
            raise FewShotSAMSlicerError("The segmentation was removed (or the scene was closed); nothing was written.")
        segmentation = segmentationNode.GetSegmentation()
        ids = [i for i in self.masks if segmentation.GetSegment(i) is not None]
        if not ids:
            raise FewShotSAMSlicerError("The propagated segments were deleted; nothing was written.")
        if beforeModifyCallback is not None:
            beforeModifyCallback()
        write = resultWriter or mc.setSegmentMask
        painted = {}
        wasModifying = segmentationNode.StartModify()
        try:
            for segmentId in ids:
                write(segmentationNode, segmentId, self.masks[segmentId], self.gridNode)
                # What is there now (an editable area may have kept some voxels out) is what FewShotSAM wrote.
                written = mc.segmentMask(segmentationNode, segmentId, self.gridNode)
                record = ps.PropagationRecord(axis=self.axis, grid=self.grid, painted=self.painted[segmentId],
                                              written=ps.sliceChecksums(written, self.axis))
                ps.writeRecord(segmentation.GetSegment(segmentId), record)
                painted[segmentId] = list(record.painted)
        finally:
            segmentationNode.EndModify(wasModifying)
        return {"segmentIds": ids, "axis": self.axis, "painted": painted, "skipped": list(self.skipped)}


class FewShotSAMSlicerLogic:
    """Scene-level operations of FewShotSAM (no GUI).

    :param pythonExecutable: Python that runs ``-m FewShotSAMLib`` (default: PythonSlicer in Slicer).
    :param processFactory: ``factory(command, env) -> worker.WorkerProcess``, injected so that tests (or another
        process runner) can be used; default: STANDBY_WORKERS, which runs each job in its own process group, in an
        engine process started ahead of it where one is ready (see prepareWorker).
    :param cacheDirectory: the engine's embedding cache, passed as ``--cache-dir`` on every run so that a second
        run on the same volume reuses the embeddings (default: <Slicer cache>/FewShotSAM, or the engine's default).
    """

    def __init__(self, pythonExecutable: str | None = None, processFactory=None, cacheDirectory: str | None = None,
                 temporaryDirectory: str | None = None, environment: dict | None = None,
                 logCallback: Callable[[str], None] | None = None, keepFiles: bool | None = None):
        mc.ensureSegmentationConverterRules()
        self.pythonExecutable = pythonExecutable or wk.defaultPythonExecutable()
        self.processFactory = processFactory or STANDBY_WORKERS
        self.cacheDirectory = cacheDirectory or defaultCacheDirectory()
        self.temporaryDirectory = temporaryDirectory or defaultTemporaryDirectory()
        self.environment = environment
        self.logCallback = logCallback or (lambda line: logging.debug("FewShotSAM worker: %s", line))
        self.keepFiles = bool(os.environ.get("FEWSHOTSAM_KEEP_FILES")) if keepFiles is None else keepFiles

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------
    def sliceAxis(self, volumeNode, orientation: str = "auto") -> int:
        return mc.sliceAxis(mc.ijkToRas(volumeNode), orientation)

    def paintedInput(self, volumeNode, segmentationNode, segmentIds=None, orientation: str = "auto") -> PaintedInput:
        """The painted slices of the chosen segments (default: every segment that has painted slices)."""
        mc.checkScalarVolume(volumeNode)
        if segmentationNode is None:
            raise FewShotSAMSlicerError("Select a segmentation that has some painted slices.")
        allIds = mc.segmentIds(segmentationNode)
        explicit = bool(segmentIds)
        ids = list(segmentIds) if explicit else allIds
        unknown = [i for i in ids if i not in allIds]
        if unknown:
            raise FewShotSAMSlicerError(
                f"The segmentation '{segmentationNode.GetName()}' has no segment with ID {', '.join(unknown)}.")
        if not ids:
            raise FewShotSAMSlicerError(
                f"The segmentation '{segmentationNode.GetName()}' has no segments. Add a segment and paint it on a "
                "few slices (Segment Editor), then try again.")
        grid = mc.gridFingerprint(volumeNode)
        masks = mc.segmentMasks(segmentationNode, ids, volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        axis, orientation = self._paintedAxis(volumeNode, orientation, masks,
                                              [ps.readRecord(segmentation.GetSegment(i)) for i in ids], grid)
        painted, used, skipped = {}, [], []
        for segmentId in ids:
            record = ps.readRecord(segmentation.GetSegment(segmentId))
            indices = ps.paintedSlices(masks[segmentId], axis, grid, record)
            if indices:
                painted[segmentId] = indices
                used.append(segmentId)
            else:
                skipped.append(segmentId)
        names = {i: segmentation.GetSegment(i).GetName() for i in ids}
        if explicit and skipped:
            raise FewShotSAMSlicerError(
                f"{', '.join(repr(names[i]) for i in skipped)} {'has' if len(skipped) == 1 else 'have'} no painted "
                "slice. Paint at least one slice of each selected segment, then try again.")
        if not used:
            raise FewShotSAMSlicerError(
                "No painted slices found. Paint each structure on a few slices (Segment Editor), then try again.")
        labels = np.zeros(mc.volumeShape(volumeNode), dtype=np.uint8 if len(used) < 256 else np.uint16)
        for value, segmentId in enumerate(used, start=1):
            labels[ps.onlySlices(masks[segmentId], axis, painted[segmentId])] = value
        return PaintedInput(axis=axis, grid=grid, segmentIds=used, painted=painted,
                            masks={i: masks[i] for i in used}, labels=labels, skipped=skipped,
                            orientation=orientation)

    def _paintedAxis(self, volumeNode, orientation: str, masks: dict, records: list, grid: str) -> tuple[int, str]:
        """(array axis, orientation name for the engine). "auto" means the plane the user painted in.

        A segment propagated before keeps the axis it was propagated along. Otherwise the painted plane is the
        axis along which the painted voxels occupy the fewest slices: strokes painted in the coronal view fill a
        few coronal slices but cross many axial ones. A tie (e.g. one painted blob) keeps the axial default.
        """
        ijkToRasMatrix = mc.ijkToRas(volumeNode)
        if str(orientation).strip().lower() != "auto":
            return mc.sliceAxis(ijkToRasMatrix, orientation), orientation
        default = mc.sliceAxis(ijkToRasMatrix, "auto")
        for record in records:
            if record is not None and record.grid == grid:
                axis = record.axis
                break
        else:
            counts = [sum(len(ps.nonEmptySlices(mask, a)) for mask in masks.values()) for a in range(3)]
            axis = default if counts[default] <= min(counts) else int(np.argmin(counts))
        if axis == default:
            return axis, "auto"
        for name in ("axial", "coronal", "sagittal"):
            if mc.sliceAxis(ijkToRasMatrix, name) == axis:
                return axis, name
        return default, "auto"  # an oblique grid where no named plane maps to that axis: keep the default

    def _checkModel(self, model: str, checkpoint: str | None, device: str) -> None:
        if model not in MODEL_VALUES:
            raise FewShotSAMSlicerError(f"Unknown model '{model}'; use one of {', '.join(MODEL_VALUES)}.")
        if device not in DEVICE_VALUES:
            raise FewShotSAMSlicerError(f"Unknown device '{device}'; use one of {', '.join(DEVICE_VALUES)}.")
        if checkpoint:
            if not os.path.isfile(checkpoint):
                raise FewShotSAMSlicerError(f"The checkpoint file {checkpoint} does not exist.")
        elif model in MODELS_NEEDING_CHECKPOINT:
            raise FewShotSAMSlicerError(
                f"The model {model} needs its checkpoint (.pth) file: choose it under 'Checkpoint', or use LiteMedSAM.")

    def _workerEnvironment(self) -> dict:
        return wk.workerEnvironment(self.environment, wk.engineParentDirectory())

    def prepareWorker(self) -> None:
        """Start the next job's engine process ahead, where the process factory keeps one in standby: it imports
        torch and the model code (seconds) while the user paints, instead of after "Adapt & Propagate"."""
        prepare = getattr(self.processFactory, "prepare", None)
        if prepare is not None:
            prepare(self.pythonExecutable, self._workerEnvironment())

    def _newFolder(self, kind: str) -> str:
        os.makedirs(self.temporaryDirectory, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"FewShotSAM-{kind}-", dir=self.temporaryDirectory)

    def _startWorker(self, kind: str, runs, folder: str, onSuccess, description: str, progressCallback,
                     finishedCallback) -> FewShotSAMJob:
        """runs: [(subcommand, arguments, label)], executed one after the other."""
        env = self._workerEnvironment()
        steps = [WorkerStep(wk.engineCommand(self.pythonExecutable, subcommand, arguments), env, label)
                 for subcommand, arguments, label in runs]
        return FewShotSAMJob(kind, steps, self.processFactory, folder, onSuccess, description, progressCallback,
                             finishedCallback, keepFiles=self.keepFiles, logCallback=self.logCallback)

    # ------------------------------------------------------------------------------------------------------------
    # Adapt & Propagate
    # ------------------------------------------------------------------------------------------------------------
    def startPropagation(self, volumeNode, segmentationNode, segmentIds=None, model: str = "litemedsam",
                         checkpoint: str | None = None, device: str = "auto", orientation: str = "auto",
                         hardenTransforms: bool = False, paintedSlicesComplete: bool = False,
                         seed: int | None = None, progressCallback: ProgressCallback | None = None,
                         finishedCallback=None, beforeModifyCallback: Callable[[], None] | None = None,
                         resultWriter: ResultWriter | None = None, previewNode=None) -> FewShotSAMJob:
        """Start "Adapt & Propagate" and return its job (poll it, or ``wait()``).

        paintedSlicesComplete: False (default) - a segment is known only on the slices where it is painted, as in
            Slicer's other tools: segments painted on different slices are propagated in separate worker runs
            (sharing the embedding cache). True - every painted slice shows every selected structure that is
            visible on it: one run for all segments (faster; a structure not painted on a painted slice is
            learned as absent there).
        beforeModifyCallback runs right before the segmentation is modified (the Segment Editor effect saves its
            undo state there, so the whole write-back is one undo step).
        resultWriter(segmentationNode, segmentId, mask, gridNode) writes one segment's result (default:
            mrml_conversion.setSegmentMask); the Segment Editor effect writes through the editor's
            modifySegmentByLabelmap so that the editable area and overwrite settings apply.
        previewNode: a segmentation node that receives the result instead; the segmentation is not changed and
            ``job.result["pending"].commit(...)`` writes it later (the effect's preview, Apply and Cancel).

        The work happens on the segmentation's reference geometry (see mrml_conversion.workingGrid).
        """
        self._checkModel(model, checkpoint, device)
        mc.checkScalarVolume(volumeNode)
        if segmentationNode is None:
            raise FewShotSAMSlicerError("Select a segmentation that has some painted slices.")
        mc.ensureNoParentTransforms([volumeNode, segmentationNode], hardenTransforms)
        gridNode = mc.workingGrid(volumeNode, segmentationNode)
        scene = segmentationNode.GetScene()  # a scene closed meanwhile must not get the result
        painted = self.paintedInput(gridNode, segmentationNode, segmentIds, orientation)
        if progressCallback is not None:
            progressCallback(0.0, "Preparing the volume and the painted slices")
        groups = ([list(painted.segmentIds)] if paintedSlicesComplete
                  else groupSegmentsBySlices(painted.painted, painted.segmentIds))
        segmentation = segmentationNode.GetSegmentation()
        values = {segmentId: value for value, segmentId in enumerate(painted.segmentIds, start=1)}
        folder = self._newFolder(PROPAGATE)
        runs, resultPaths = [], []
        try:
            imagePath = mc.writeVolume(gridNode, os.path.join(folder, "image.nrrd"))
            for number, group in enumerate(groups, start=1):
                labels = painted.labels if len(groups) == 1 else np.where(
                    np.isin(painted.labels, [values[i] for i in group]), painted.labels, 0).astype(painted.labels.dtype)
                labelsPath = mc.writeLabelArray(labels, gridNode, os.path.join(folder, f"labels-{number}.nrrd"))
                resultPath = os.path.join(folder, f"result-{number}.nrrd")
                arguments = wk.propagateArguments(imagePath, labelsPath, resultPath, model=model,
                                                  checkpoint=checkpoint, device=device, axis=painted.orientation,
                                                  cacheDir=self.cacheDirectory, seed=seed,
                                                  report=os.path.join(folder, f"report-{number}.json"))
                runs.append(("propagate", arguments, ", ".join(segmentation.GetSegment(i).GetName() for i in group)))
                resultPaths.append((resultPath, group))
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise

        def onSuccess(job):
            result = self._writePropagationResult(volumeNode, segmentationNode, painted, resultPaths,
                                                  beforeModifyCallback, gridNode, resultWriter, scene, previewNode)
            names = {i: segmentation.GetSegment(i).GetName() for i in painted.segmentIds
                     if segmentation.GetSegment(i) is not None}
            result["suggestions"] = suggestionsFromReports([run.result.get("report") for run in job.runs],
                                                           painted.segmentIds, names, gridNode, painted.axis)
            return result

        names = [segmentation.GetSegment(i).GetName() for i in painted.segmentIds]
        job = self._startWorker(PROPAGATE, runs, folder, onSuccess, f"Propagating {', '.join(names)}",
                                progressCallback, finishedCallback)
        job.paintedInput = painted
        job.groups = groups
        job.gridNode = gridNode
        job.segmentationNode = segmentationNode
        return job

    def propagate(self, volumeNode, segmentationNode, timeout: float | None = None, **options) -> FewShotSAMJob:
        """Blocking "Adapt & Propagate" for scripts and tests; raises WorkerFailed / JobCancelled on failure."""
        job = self.startPropagation(volumeNode, segmentationNode, **options)
        job.wait(timeout)
        if job.isRunning:
            job.cancel()
            job.wait(30)
            raise FewShotSAMSlicerError(f"Propagation did not finish within {timeout} s; it was cancelled.")
        return job.raiseIfFailed()

    def _writePropagationResult(self, volumeNode, segmentationNode, painted: PaintedInput, resultPaths,
                                beforeModifyCallback, gridNode=None, resultWriter: ResultWriter | None = None,
                                scene=None, previewNode=None) -> dict:
        gridNode = volumeNode if gridNode is None else gridNode
        if segmentationNode.GetScene() is None and scene is not None:
            raise FewShotSAMSlicerError("The segmentation was removed (or the scene was closed) while FewShotSAM was "
                                        "running; nothing was written.")
        if volumeNode.GetScene() is None and segmentationNode.GetScene() is not None:
            raise FewShotSAMSlicerError("The source volume was removed while FewShotSAM was running.")
        resultOf = {}
        for resultPath, group in resultPaths:
            array, _ = mc.readLabelArray(resultPath, gridNode)
            resultOf.update({segmentId: array for segmentId in group})
        segmentation = segmentationNode.GetSegmentation()
        present = [i for i in painted.segmentIds if segmentation.GetSegment(i) is not None]
        if not present:
            raise FewShotSAMSlicerError("The propagated segments were deleted while FewShotSAM was running.")
        axis = painted.axis
        current = mc.segmentMasks(segmentationNode, present, gridNode)
        pending = PendingResult(segmentationNode, gridNode, axis, painted.grid, list(painted.skipped))
        for value, segmentId in enumerate(painted.segmentIds, start=1):
            if segmentId not in present:
                continue
            mask = resultOf[segmentId] == value
            # The engine keeps painted slices as painted; put them back anyway, bit for bit.
            paintedIndices = list(painted.painted[segmentId])
            ps.copySlices(mask, painted.masks[segmentId], axis, paintedIndices)
            # Slices the user changed while the worker ran are kept as the user left them (and count as painted).
            editedMeanwhile = ps.changedSlices(painted.masks[segmentId], current[segmentId], axis)
            ps.copySlices(mask, current[segmentId], axis, editedMeanwhile)
            paintedNow = sorted(set(paintedIndices) | {i for i in editedMeanwhile if current[segmentId][
                ps.sliceIndex(axis, i)].any()})
            pending.masks[segmentId] = mask
            pending.painted[segmentId] = tuple(paintedNow)
        if previewNode is not None:
            pending.showIn(previewNode)
            return {"segmentIds": list(pending.masks), "axis": axis, "skipped": list(painted.skipped),
                    "pending": pending, "previewNode": previewNode}
        return pending.commit(resultWriter, beforeModifyCallback)

    # ------------------------------------------------------------------------------------------------------------
    # Save adapted model / Apply to volume
    # ------------------------------------------------------------------------------------------------------------
    def startAdapt(self, volumeNode, segmentationNode, modelPath: str, segmentIds=None, model: str = "litemedsam",
                   checkpoint: str | None = None, device: str = "auto", orientation: str = "auto",
                   hardenTransforms: bool = False, overwrite: bool = False, seed: int | None = None,
                   progressCallback: ProgressCallback | None = None, finishedCallback=None) -> FewShotSAMJob:
        """Start "Save adapted model": adapt the model to the painted slices and save it as a .fsam file.

        One adapted model holds all the chosen structures, so here every painted slice is taken as showing every
        chosen structure that is visible on it (paint them all on the slices you paint).
        """
        self._checkModel(model, checkpoint, device)
        if not modelPath:
            raise FewShotSAMSlicerError("Choose where to save the adapted model (.fsam).")
        modelPath = os.path.abspath(modelPath)
        if not modelPath.lower().endswith(".fsam"):
            modelPath += ".fsam"
        if os.path.exists(modelPath) and not overwrite:
            raise FewShotSAMSlicerError(f"{modelPath} already exists; choose another name or allow overwriting.")
        if not os.path.isdir(os.path.dirname(modelPath)):
            raise FewShotSAMSlicerError(f"The folder {os.path.dirname(modelPath)} does not exist.")
        mc.checkScalarVolume(volumeNode)
        if segmentationNode is None:
            raise FewShotSAMSlicerError("Select a segmentation that has some painted slices.")
        mc.ensureNoParentTransforms([volumeNode, segmentationNode], hardenTransforms)
        painted = self.paintedInput(volumeNode, segmentationNode, segmentIds, orientation)
        if progressCallback is not None:
            progressCallback(0.0, "Preparing the volume and the painted slices")
        folder = self._newFolder(ADAPT)
        try:
            imagePath = mc.writeVolume(volumeNode, os.path.join(folder, "image.nrrd"))
            # As .seg.nrrd, so that the adapted model knows the segments' names and colours.
            labelsPath = os.path.join(folder, "labels.seg.nrrd")
            node = exportModule.segmentationNodeFromLabels(painted.labels, volumeNode,
                                                           segmentationNode.GetSegmentation(), painted.segmentIds)
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(labelsPath)
            if not storage.WriteData(node):
                raise FewShotSAMSlicerError(f"Could not write {labelsPath}.")
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        temporaryModel = os.path.join(folder, "adapted.fsam")
        arguments = wk.adaptArguments([(imagePath, labelsPath)], temporaryModel, model=model, checkpoint=checkpoint,
                                      device=device, axis=orientation, cacheDir=self.cacheDirectory, seed=seed)

        def onSuccess(job):
            if not os.path.isfile(temporaryModel):
                raise FewShotSAMSlicerError("The worker did not write the adapted model.")
            try:
                write_atomically(modelPath, lambda partial: shutil.copyfile(temporaryModel, partial),
                                 overwrite=overwrite)
            except FileExistsError:
                raise FewShotSAMSlicerError(
                    f"{modelPath} already exists; choose another name or allow overwriting.") from None
            return {"modelPath": modelPath, "segmentIds": list(painted.segmentIds)}

        return self._startWorker(ADAPT, [("adapt", arguments, "")], folder, onSuccess,
                                 f"Adapting to '{volumeNode.GetName()}'", progressCallback, finishedCallback)

    def startApply(self, modelPath: str, targetVolumeNode, model: str = "litemedsam", checkpoint: str | None = None,
                   device: str = "auto", orientation: str = "auto", outputName: str | None = None,
                   hardenTransforms: bool = False, progressCallback: ProgressCallback | None = None,
                   finishedCallback=None) -> FewShotSAMJob:
        """Start "Apply to volume": segment another volume with a saved adapted model, into a new segmentation.

        model/checkpoint must be the ones the adapted model was made with (the engine checks it).
        """
        if not modelPath or not os.path.isfile(modelPath):
            raise FewShotSAMSlicerError("Choose an adapted model file (.fsam) first (Save adapted model).")
        self._checkModel(model, checkpoint, device)
        mc.checkScalarVolume(targetVolumeNode, "target volume")
        mc.ensureNoParentTransforms([targetVolumeNode], hardenTransforms)
        scene = targetVolumeNode.GetScene()
        if progressCallback is not None:
            progressCallback(0.0, f"Preparing '{targetVolumeNode.GetName()}'")
        folder = self._newFolder(APPLY)
        outDirectory = os.path.join(folder, "out")
        try:
            os.makedirs(outDirectory)
            imagePath = mc.writeVolume(targetVolumeNode, os.path.join(folder, "target.nrrd"))
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        arguments = wk.applyArguments(modelPath, [imagePath], outDirectory, model=model, checkpoint=checkpoint,
                                      device=device, axis=orientation, cacheDir=self.cacheDirectory)

        def onSuccess(job):
            return self._loadApplyResult(scene, targetVolumeNode, outDirectory,
                                         outputName or f"{targetVolumeNode.GetName()} FewShotSAM")

        return self._startWorker(APPLY, [("apply", arguments, "")], folder, onSuccess,
                                 f"Applying the adapted model to '{targetVolumeNode.GetName()}'",
                                 progressCallback, finishedCallback)

    def _loadApplyResult(self, scene, targetVolumeNode, outDirectory: str, outputName: str) -> dict:
        produced = sorted(os.path.join(outDirectory, f) for f in os.listdir(outDirectory)
                          if f.lower().endswith((".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha")))
        if not produced:
            raise FewShotSAMSlicerError("The worker did not write a segmentation for the target volume.")
        segFiles = [p for p in produced if p.lower().endswith(".seg.nrrd")]
        path = segFiles[0] if segFiles else produced[0]
        output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", outputName) if scene is not None \
            else slicer.vtkMRMLSegmentationNode()
        if scene is not None:
            output.CreateDefaultDisplayNodes()
        output.SetReferenceImageGeometryParameterFromVolumeNode(targetVolumeNode)
        if path.lower().endswith(".seg.nrrd"):
            # read in a private scene: reading creates display nodes, which needs a scene, but not the user's
            privateScene = slicer.vtkMRMLScene()
            loaded = privateScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(path)
            if not storage.ReadData(loaded):
                raise FewShotSAMSlicerError(f"Could not read the result {os.path.basename(path)}.")
            source = loaded.GetSegmentation()
            order = [source.GetNthSegmentID(i) for i in range(source.GetNumberOfSegments())]
            masks = {i: mc.segmentMask(loaded, i, targetVolumeNode) for i in order}
            for segmentId in order:
                segment = slicer.vtkSegment()
                segment.DeepCopyMetadata(source.GetSegment(segmentId))
                output.GetSegmentation().AddSegment(segment, segmentId)
                mc.setSegmentMask(output, segmentId, masks[segmentId], targetVolumeNode)
        else:
            labels, _ = mc.readLabelArray(path, targetVolumeNode)
            for value in [int(v) for v in np.unique(labels) if v != 0]:
                segmentId = output.GetSegmentation().AddEmptySegment("", f"Segment {value}")
                mc.setSegmentMask(output, segmentId, labels == value, targetVolumeNode)
        return {"segmentationNode": output, "segmentIds": mc.segmentIds(output), "targetVolumeNode": targetVolumeNode}

    # ------------------------------------------------------------------------------------------------------------
    # Export
    # ------------------------------------------------------------------------------------------------------------
    def exportSegmentation(self, segmentationNode, referenceVolumeNode, segmentationPath: str | None = None,
                           labelmapPath: str | None = None, segmentIds=None, overwrite: bool = False) -> list[str]:
        return exportModule.exportSegmentation(segmentationNode, referenceVolumeNode, segmentationPath,
                                               labelmapPath, segmentIds, overwrite)
