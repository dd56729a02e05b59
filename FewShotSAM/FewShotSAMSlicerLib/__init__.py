"""Slicer-side code of the FewShotSAM extension that needs no Qt: MRML conversion, worker handling, logic.

Importable in the Slicer application and in plain Python with the slicer-core wheel (for tests).
"""

from .errors import FewShotSAMSlicerError, JobCancelled, WorkerFailed  # noqa: F401
from .logic import FewShotSAMJob, FewShotSAMSlicerLogic, PaintedInput  # noqa: F401
from .parameters import FewShotSAMParameters  # noqa: F401
