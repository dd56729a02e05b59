"""The engine end to end on real CHAOS scans with the real LiteMedSAM weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from FewShotSAMLib.adapter import AdaptOptions, FewShotAdapter
from FewShotSAMLib.metrics import dice, false_positive_slices
from FewShotSAMLib.orientation import to_slices
from FewShotSAMLib.pipeline import Engine, EngineOptions, adapt_files, apply_files, propagate_files
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import Geometry, LabelVolume, Segment, Volume
from FewShotSAMLib.volume_io import read_labels, read_volume, write_segmentation

ORGANS = [Segment("liver", 1, (0.87, 0.51, 0.4)), Segment("right kidney", 2, (0.73, 0.4, 0.33)),
          Segment("left kidney", 3, (0.96, 0.78, 0.35)), Segment("spleen", 4, (0.62, 0.42, 0.64))]
# Measured on CHAOS case 2 with 3 labelled slices per organ: Dice 0.94-0.96 per organ (mean 0.948).
DICE_FLOOR_K3 = 0.85
# False-positive slices per organ (slices predicted to hold an organ absent there): at most 2 with fp32 embeddings,
# 3 for the liver with the default bf16 compiled encoder (benchmark mean over 12 scans: 1.1 per organ).
MAX_FALSE_POSITIVE_SLICES = 3


def engine_options(cache_dir) -> EngineOptions:
    # No warm start: a run record left by another test on the same scan would make results depend on test order
    # (tests/test_warm_start.py covers warm starts). ONNX Runtime: one fixed encoder path, not the one `auto` measures.
    return EngineOptions(cache_dir=str(cache_dir), device="cpu", warm_start=False, encoder="onnx")


@pytest.fixture(scope="module")
def engine(engine_cache_dir):
    return Engine(engine_options(engine_cache_dir))


@pytest.fixture(scope="module")
def exact_engine(cache_with_shared_encoders):
    """An engine whose embeddings all come from one encoder in this module, for tests that compare two runs voxel for
    voxel: the session cache is keyed by model and voxels, not by backend, so another test file may have filled it
    through OpenVINO, whose embeddings agree with ONNX Runtime's to ~1e-3, not bit for bit."""
    return Engine(engine_options(cache_with_shared_encoders("exact-engine-cache")))


def painted_file(tmp_path, image_path, label_path, k, name="painted.seg.nrrd"):
    image = read_volume(image_path)
    reference = read_labels(label_path, image).array
    painted = few_shot_labels(reference, 0, k, [1, 2, 3, 4])
    path = write_segmentation(tmp_path / name, LabelVolume(painted, image.geometry, ORGANS))
    return path, painted, reference


@pytest.fixture(scope="module")
def propagated_case2(tmp_path_factory, chaos_scan, exact_engine):
    tmp_path = tmp_path_factory.mktemp("case2")
    image_path, label_path = chaos_scan(2)
    painted_path, painted, reference = painted_file(tmp_path, image_path, label_path, 3)
    out = propagate_files(image_path, painted_path, tmp_path / "result.seg.nrrd", engine=exact_engine)
    return image_path, painted, reference, out


def test_propagate_reaches_the_dice_floor_on_a_real_scan(propagated_case2):
    image_path, painted, reference, out = propagated_case2
    result = read_labels(out, read_volume(image_path))
    for organ in ORGANS:
        score = dice(result.array == organ.label_value, reference == organ.label_value)
        assert score >= DICE_FLOOR_K3, f"{organ.name}: Dice {score:.3f}"
        # Slices far outside the organ must come out empty.
        extra = false_positive_slices(result.array == organ.label_value, reference == organ.label_value, 0)
        assert extra <= MAX_FALSE_POSITIVE_SLICES, f"{organ.name}: {extra} false-positive slices"


def test_output_keeps_names_colours_values_and_painted_slices(propagated_case2):
    image_path, painted, reference, out = propagated_case2
    image = read_volume(image_path)
    result = read_labels(out, image)
    assert [(s.name, s.label_value) for s in result.segments] == [(s.name, s.label_value) for s in ORGANS]
    assert np.allclose([s.color for s in result.segments], [s.color for s in ORGANS], atol=1e-3)
    labelled = np.flatnonzero(painted.any(axis=(1, 2)))
    assert np.array_equal(result.array[labelled], painted[labelled])
    assert result.geometry.same_grid(image.geometry)
    assert set(np.unique(result.array)) <= {0, 1, 2, 3, 4}


def test_adapt_then_apply_segments_a_second_scan_without_labels(tmp_path, chaos_scan, engine):
    image_a, label_a = chaos_scan(2)
    image_b, label_b = chaos_scan(15)
    painted_path, _, _ = painted_file(tmp_path, image_a, label_a, 3)
    model_path = adapt_files([(image_a, painted_path)], tmp_path / "abdomen.fsam", engine=engine)
    adapter = FewShotAdapter.load(model_path)
    assert [s.name for s in adapter.segments] == [s.name for s in ORGANS]
    (written,) = apply_files(model_path, [str(image_b)], tmp_path / "applied", engine=engine)
    result = read_labels(written, read_volume(image_b)).array
    reference = read_labels(label_b, read_volume(image_b)).array
    # Measured (case 2 -> case 15, 3 slices per organ): kidneys 0.94 and 0.89; liver and spleen fail across
    # scans (Dice ~0: the pixel prompts do not transfer for them), a known limitation noted in the README.
    kidneys = [dice(result == value, reference == value) for value in (2, 3)]
    assert min(kidneys) >= 0.75, f"kidney Dice on an unlabelled scan: {kidneys}"


def test_same_seed_gives_the_same_adapter(tmp_path, chaos_scan, engine):
    image_path, label_path = chaos_scan(2)
    volume = read_volume(image_path)
    painted = few_shot_labels(read_labels(label_path, volume).array, 0, 1, [1, 2, 3, 4])
    labels = LabelVolume(painted, volume.geometry, ORGANS)
    engine.options.adapt = AdaptOptions(decoder_steps=3, prompt_steps=20, seed=7)
    try:
        first = engine.adapt([(volume, labels)])
        second = engine.adapt([(volume, labels)])
        engine.options.adapt = AdaptOptions(decoder_steps=3, prompt_steps=20, seed=8)
        other = engine.adapt([(volume, labels)])
    finally:
        engine.options.adapt = AdaptOptions()
    for name, weights in first.decoder_state.items():
        assert torch.equal(weights, second.decoder_state[name]), name
    assert any(not torch.equal(w, other.decoder_state[n]) for n, w in first.decoder_state.items())
    assert torch.equal(first.tokens, second.tokens)


def test_painted_slices_are_found_along_the_derived_axis(chaos_scan, engine):
    image_path, _ = chaos_scan(2)
    encoded = engine.encode(read_volume(image_path))
    assert encoded.axis == 0
    assert encoded.embeddings.shape == (31, 256, 64, 64)
    assert to_slices(encoded.volume.array, encoded.axis).shape[0] == 31


def test_slice_axis_comes_from_the_direction_matrix_not_the_array_layout(propagated_case2, exact_engine):
    """The same scan stored with its voxel axes permuted (axial slices along the array's last axis, with the
    direction matrix saying so) must give the same segmentation, voxel for voxel, on its own grid."""
    image_path, painted, _, out = propagated_case2
    volume = read_volume(image_path)
    geometry = volume.geometry
    # new voxel axes (i', j', k') = old (k, i, j): new_array[k', j', i'] = old_array[i', k', j']
    permuted_array = np.ascontiguousarray(volume.array.transpose(1, 2, 0))
    direction = np.asarray(geometry.direction)[:, [2, 0, 1]]
    spacing = (geometry.spacing[2], geometry.spacing[0], geometry.spacing[1])
    permuted_geometry = dataclasses.replace(geometry, spacing=spacing, direction=direction,
                                            shape=permuted_array.shape)
    permuted = dataclasses.replace(volume, array=permuted_array, geometry=permuted_geometry)
    permuted_painted = np.ascontiguousarray(painted.transpose(1, 2, 0))
    entries = [entry.key for entry in exact_engine.cache.entries()]
    result = exact_engine.propagate(permuted, LabelVolume(permuted_painted, permuted_geometry, ORGANS))
    assert exact_engine.encode(permuted).axis == 2
    # The same slices under another array layout: their embeddings come from the original's cache entry.
    assert sorted(entry.key for entry in exact_engine.cache.entries()) == sorted(entries)
    expected = read_labels(out, volume).array
    assert np.array_equal(result.array.transpose(2, 0, 1), expected)
    # Same voxel -> same patient position on both grids.
    assert np.allclose(permuted_geometry.ijk_to_lps() @ [3, 5, 7, 1], geometry.ijk_to_lps() @ [5, 7, 3, 1])


def test_a_scan_stored_with_its_slices_reversed_shares_their_embeddings(chaos_scan, engine):
    """Slicer saves a scan it loaded with its slice axis flipped (the direction's k column negated, the voxels
    reversed along k): the same slices in reverse order, read from the first scan's cache entry, none encoded again."""
    image_path, _ = chaos_scan(2)
    volume = read_volume(image_path)
    geometry, n_slices = volume.geometry, volume.array.shape[0]
    original = engine.encode(volume)
    direction = np.array(geometry.direction, dtype=float)
    direction[:, 2] *= -1
    origin = np.asarray(geometry.origin) + np.asarray(geometry.direction)[:, 2] * geometry.spacing[2] * (n_slices - 1)
    flipped_geometry = dataclasses.replace(geometry, direction=direction, origin=tuple(origin))
    flipped = dataclasses.replace(volume, array=np.ascontiguousarray(volume.array[::-1]), geometry=flipped_geometry)
    # Same voxel -> same patient position on both grids.
    assert np.allclose(flipped_geometry.ijk_to_lps() @ [3, 5, 0, 1], geometry.ijk_to_lps() @ [3, 5, n_slices - 1, 1])
    entries = sorted(entry.key for entry in engine.cache.entries())
    events = []
    encoded = engine.encode(flipped, Progress(events.append))
    assert encoded.axis == 0
    assert sorted(entry.key for entry in engine.cache.entries()) == entries
    encoding = [(event.done, event.total) for event in events if event.stage == "encode"]
    assert encoding and all(done == total == n_slices for done, total in encoding), encoding  # nothing to encode
    np.testing.assert_array_equal(encoded.embeddings, original.embeddings[::-1])


def test_slices_resampled_to_square_pixels_get_their_own_embeddings(engine):
    """The same voxels with another in-plane spacing ratio make other model images (resampled to square pixels), so
    they must not share a cache entry; the same ratio at another scale makes the same images and shares one."""
    rng = np.random.default_rng(0)
    square = Volume(rng.integers(0, 1000, (2, 48, 64)).astype(np.int16), Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0),
                                                                                 shape=(2, 48, 64)))
    variants = {"square": square,
                "square, coarser": dataclasses.replace(square, geometry=dataclasses.replace(
                    square.geometry, spacing=(2.0, 2.0, 3.0))),
                "tall pixels": dataclasses.replace(square, geometry=dataclasses.replace(
                    square.geometry, spacing=(1.0, 2.0, 3.0)))}
    encodings = {name: engine.open_encoding(volume) for name, volume in variants.items()}
    keys = {name: encoding.entry.key for name, encoding in encodings.items()}
    assert encodings["tall pixels"].resize.resized_shape != encodings["square"].resize.resized_shape
    assert keys["square, coarser"] == keys["square"] != keys["tall pixels"]


def test_a_slice_range_encodes_and_predicts_only_those_slices(cache_with_shared_encoders, chaos_scan):
    """With a slice range, only the range and the labelled slices are encoded (the rest is never computed)."""
    image_path, label_path = chaos_scan(2)
    volume = read_volume(image_path)
    reference = read_labels(label_path, volume).array
    painted = few_shot_labels(reference, 0, 1, [1, 2, 3, 4])
    labelled = set(np.flatnonzero(painted.any(axis=(1, 2))).tolist())
    options = EngineOptions(cache_dir=str(cache_with_shared_encoders("slice-range-cache")), device="cpu")
    options.propagation.slice_range = (12, 17)
    engine = Engine(options)
    result = engine.propagate(volume, LabelVolume(painted, volume.geometry, ORGANS)).array
    encoded = labelled | set(range(12, 18))
    (entry,) = engine.cache.entries()
    assert entry.n_done == len(encoded) < volume.array.shape[0]
    outside = [z for z in range(volume.array.shape[0]) if z not in encoded]
    assert not result[outside].any()
    inside = slice(12, 18)
    score = dice(result[inside] == 1, reference[inside] == 1)
    assert score > 0.8, f"liver Dice inside the slice range: {score:.3f}"
