"""Errors the Slicer side of FewShotSAM shows to the user as one readable message (never a traceback)."""

from __future__ import annotations


class FewShotSAMSlicerError(Exception):
    """A problem with the user's input, the scene or the worker, explained in one or two sentences."""


class WorkerFailed(FewShotSAMSlicerError):
    """The worker process exited with an error; the message is the worker's own one-line explanation."""

    def __init__(self, message: str, returnCode: int | None = None, details: str = ""):
        super().__init__(message)
        self.returnCode = returnCode
        self.details = details  # full stderr of the worker, for the log


class JobCancelled(FewShotSAMSlicerError):
    """The user cancelled a running job; nothing in the scene was changed."""

    def __init__(self, message: str = "Cancelled by the user; the segmentation was not changed."):
        super().__init__(message)
