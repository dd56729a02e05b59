"""Slicer-side code of the FewShotSAM extension that needs no Qt: MRML conversion, worker handling, logic.

Importable in the Slicer application and in plain Python with the slicer-core wheel (for tests).

The menus and checks here read the engine's torch-free catalogue (FewShotSAMLib.catalog), so the engine package is
made importable first: from a source checkout it sits one level above the module folder, in a built extension next
to the module (see dependencies.ensureEngineImportable).
"""

import os as _os

from . import dependencies as _dependencies

_dependencies.ensureEngineImportable(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from .errors import FewShotSAMSlicerError, JobCancelled, WorkerFailed  # noqa: E402, F401  (after the engine is importable)
from .logic import FewShotSAMJob, FewShotSAMSlicerLogic, PaintedInput  # noqa: E402, F401  (after the engine is importable)
from .parameters import FewShotSAMParameters  # noqa: E402, F401  (after the engine is importable)
