"""The Dask worker plugin of a cohort run (its own module: importing it needs dask.distributed)."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from .cohort import _loaded, loaded_model
from .pipeline import EngineOptions


class ModelPlugin(WorkerPlugin):
    """Loads the model when a worker starts (and when Dask replaces a dead one), so that its first scan does not
    pay for it; sets the worker's PyTorch threads (Dask's nanny starts workers with OMP_NUM_THREADS=1)."""

    name = "fewshotsam-model"

    def __init__(self, model_path: str, options: EngineOptions, torch_threads: int | None = None):
        self.model_path, self.options, self.torch_threads = model_path, options, torch_threads

    def setup(self, worker=None):
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        try:
            loaded_model(self.model_path, self.options)
        except Exception:  # noqa: BLE001 - each scan then reports the same error in its own row
            pass

    def teardown(self, worker=None):
        _loaded.clear()
