"""Registering an adapter's support scan to the query (FewShotSAMLib/registration.py), on real CHAOS scans."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FewShotSAMLib import registration
from FewShotSAMLib.orientation import in_plane_spacing, slice_axis, to_slices
from FewShotSAMLib.preprocess import apply_normalisation, choose_normalisation, resize_stack_longest_side
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.registration import STAGE, Registration, RegistrationFailed, check_plausible, support_image
from FewShotSAMLib.volume_io import read_volume


@pytest.fixture(scope="module")
def chaos_2(chaos_scan):
    """CHAOS 2's geometry, normalised slices, slice axis and resize (as the engine makes them) and its small copy."""
    volume = read_volume(chaos_scan(2)[0])
    axis = slice_axis(volume.geometry, "auto")
    normalised = apply_normalisation(volume.array, choose_normalisation(volume))
    slices = to_slices(normalised, axis)
    _, resize = resize_stack_longest_side(slices[:1], 256, in_plane_spacing(volume.geometry, axis))
    return volume.geometry, normalised, axis, resize, support_image(slices, volume.geometry, axis, resize, [[5, 20]])


def test_the_support_copy_is_small_and_registered_to_itself_gives_the_image_frame(chaos_2):
    geometry, normalised, axis, resize, support = chaos_2
    assert max(support.image.shape) <= 96 and support.image.nbytes < 400_000
    identity = Registration(np.eye(3), np.zeros(3), np.zeros(3), 0.0, -1.0, 0.0)
    positions = registration.registered_positions(support, identity, geometry, axis, resize, normalised.shape[axis], 64)
    image_frame = torch.linspace(-1, 1, 64)  # prompts.embedding_features' positions of the 64 grid cells
    assert torch.allclose(positions[..., 0], image_frame[None, None, :], atol=1e-5)
    assert torch.allclose(positions[..., 1], image_frame[None, :, None], atol=1e-5)
    assert torch.allclose(positions[:, 0, 0, 2], torch.arange(normalised.shape[axis], dtype=torch.float32))


def test_registration_recovers_a_known_shift_and_scale(chaos_2):
    geometry, normalised, _, _, support = chaos_2
    full = sitk.GetImageFromArray(normalised)
    full.SetSpacing(geometry.spacing), full.SetOrigin(geometry.origin), full.SetDirection(geometry.direction.ravel())
    centre = np.array(full.TransformContinuousIndexToPhysicalPoint([size / 2 for size in full.GetSize()]))
    known = sitk.Similarity3DTransform()  # query point -> support point, as register() returns
    known.SetCenter(centre.tolist()), known.SetScale(1.1), known.SetTranslation([12.0, -8.0, 4.0])
    query = sitk.GetArrayFromImage(sitk.Resample(full, full, known, sitk.sitkLinear, 0.0))
    result = registration.register(support, registration.downsample(query, geometry))
    points = centre + np.random.default_rng(0).uniform(-80, 80, (200, 3)) * [1, 1, 0.5]  # within the abdomen
    expected = np.array([known.TransformPoint(point.tolist()) for point in points])
    error = np.linalg.norm(result.map_points(points) - expected, axis=1)
    # Measured: 0.08 mm mean, 0.16 mm at most; the copies' voxels are ~4 mm, so 2 mm is still well within one.
    assert error.max() < 2.0, f"{error.mean():.2f} mm mean, {error.max():.2f} mm at most"
    assert result.metric_end < result.metric_start


def test_a_failed_or_implausible_registration_falls_back_to_the_image_frame_and_says_so(chaos_2):
    geometry, normalised, axis, resize, support = chaos_2
    messages = []
    blank = np.zeros_like(to_slices(normalised, axis))  # nothing to register: SimpleITK finds no image mass
    said = Progress(messages.append)
    assert registration.positions_in_support(support, blank, geometry, axis, resize, 64, said) is None
    assert messages[-1].stage == STAGE and "registration failed (SimpleITK" in messages[-1].message
    assert "image frame" in messages[-1].message
    twice = Registration(2 * np.eye(3), np.zeros(3), np.zeros(3), -0.4, -0.5, 1.0)
    with pytest.raises(RegistrationFailed, match="implausible scale"):
        check_plausible(twice)
    worse = Registration(np.eye(3), np.zeros(3), np.zeros(3), -0.5, -0.4, 1.0)
    with pytest.raises(RegistrationFailed, match="metric did not improve"):
        check_plausible(worse)


def test_a_model_without_a_support_copy_applies_in_the_image_frame_and_says_so(chaos_2):
    """Models made before registration, on several scans or without `adapt --register` have no copy: apply reads
    no registered positions (the image-frame path, unchanged) and the progress says why."""
    geometry, normalised, axis, resize, _ = chaos_2
    messages = []
    slices = to_slices(normalised, axis)
    said = Progress(messages.append)
    assert registration.positions_in_support(None, slices, geometry, axis, resize, 64, said) is None
    assert messages[-1].stage == STAGE and "no support image" in messages[-1].message


def test_the_through_plane_prior_gives_a_structure_far_from_its_painted_slices_to_background():
    probabilities = torch.tensor([0.2, 0.5, 0.3]).reshape(1, 3, 1, 1).expand(4, 3, 1, 1)  # 4 slices, 1 cell each
    support_slices = torch.tensor([10.0, 16.0, 30.0, 60.0]).reshape(4, 1, 1)  # where each query slice lies
    extents = torch.tensor([[8.0, 16.0], [-1.0, -1.0]])  # structure 1 painted on slices 8-16, structure 2 never
    prior = registration.with_through_plane_prior(probabilities, support_slices, extents)
    assert torch.allclose(prior.sum(1), torch.ones(4, 1, 1))
    assert torch.allclose(prior[:2], probabilities[:2]), "within the painted slices nothing changes"
    assert prior[2, 1] < 0.5 * probabilities[2, 1] and prior[3, 1] < 1e-6, "beyond them the structure fades"
    assert torch.allclose(prior[:, 2], probabilities[:, 2]), "a structure never painted keeps its probability"
