"""Fuzzing the readers (hypothesis, a bounded run): whatever the bytes of an image, label map, Slicer segmentation
or .fsam file, the result is a FewShotSAMError of one line or a valid result, never a traceback.

FEWSHOTSAM_FUZZ_EXAMPLES sets the number of damaged files tried (default 150: a few seconds).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_bad_input import geometry, mr_like, organ_labels, synthetic_adapter

from FewShotSAMLib.adapter import FewShotAdapter
from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.volume import LabelVolume, Segment, Volume
from FewShotSAMLib.volume_io import read_labels, read_volume, write_segmentation, write_volume

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st

FUZZ_SHAPE = (3, 8, 8)


def seed_files() -> dict[str, bytes]:
    """Valid small files of every format the readers take, to be damaged by the fuzzer."""
    seeds = {}
    with tempfile.TemporaryDirectory() as folder:
        grid = geometry(FUZZ_SHAPE)
        labels = organ_labels(FUZZ_SHAPE, slices=(1,))
        for suffix in (".nrrd", ".nii.gz", ".nii", ".mha"):
            path = write_volume(Path(folder) / f"scan{suffix}", Volume(mr_like(FUZZ_SHAPE), grid))
            seeds[suffix] = path.read_bytes()
        segments = [Segment("organ", 1, (1.0, 0.0, 0.0))]
        path = write_segmentation(Path(folder) / "l.seg.nrrd", LabelVolume(labels, grid, segments))
        seeds[".seg.nrrd"] = path.read_bytes()
        seeds[".fsam"] = synthetic_adapter().save(Path(folder) / "m.fsam").read_bytes()
    return seeds


SEEDS = seed_files()


@st.composite
def damaged_files(draw):
    suffix = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[suffix])
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
    elif kind == "splice":
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=64))
    else:
        data = bytearray(draw(st.binary(max_size=2048)))
    return suffix, bytes(data)


@settings(max_examples=int(os.environ.get("FEWSHOTSAM_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(damaged_files())
def test_readers_give_a_user_error_or_a_valid_result_for_any_bytes(damaged):
    suffix, data = damaged
    reference = Volume(mr_like(FUZZ_SHAPE), geometry(FUZZ_SHAPE))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(data)
        readers = {".fsam": FewShotAdapter.load, ".seg.nrrd": lambda p: read_labels(p, reference)}
        try:
            if suffix in readers:
                readers[suffix](path)
            else:
                volume = read_volume(path)
                assert np.all(np.isfinite(volume.array)) if volume.array.dtype.kind == "f" else True
                read_labels(path, reference)
        except FewShotSAMError as error:
            assert "\n" not in str(error)
