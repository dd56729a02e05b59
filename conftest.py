"""pytest fixtures shared by the engine's tests (tests/) and the Slicer-side tests (Testing/)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def engine_cache_dir(tmp_path_factory) -> Path:
    """One embedding cache for the whole test session: each real scan is encoded once, then reused."""
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture(scope="session")
def cache_with_shared_encoders(tmp_path_factory, engine_cache_dir):
    """A function (name) -> a new, empty embedding cache folder whose built encoders (the ONNX export, the OpenVINO
    model, the `auto` probe's verdict) are the session cache's: a test that needs its own embeddings then does not
    pay for building and probing the encoders again (~15 s each time on 2 cores)."""
    from FewShotSAMLib.embedding_cache import EmbeddingCache

    def make(name: str) -> Path:
        folder = tmp_path_factory.mktemp(name)
        shared = EmbeddingCache(engine_cache_dir).encoders_dir
        shared.mkdir(parents=True, exist_ok=True)
        EmbeddingCache(folder).encoders_dir.symlink_to(shared, target_is_directory=True)
        return folder

    return make
