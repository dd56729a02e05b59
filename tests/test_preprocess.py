import numpy as np
import pytest
import torch

from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.preprocess import (
    CT_WINDOW_PRESETS,
    choose_normalisation,
    describe_normalisation,
    mask_logits_to_slice,
    mask_logits_to_stack,
    normalize_volume,
    resize_longest_side,
    resize_stack_longest_side,
    resized_shape_for,
)
from FewShotSAMLib.volume import Geometry, Volume

GEOMETRY = Geometry(spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0), shape=(4, 5, 6))


def volume(array, modality) -> Volume:
    return Volume(np.asarray(array), GEOMETRY, modality)


# --------------------------------------------------------------------------------------------------------------------
# Intensity normalisation


def test_ct_default_is_the_soft_tissue_window():
    result = normalize_volume(volume(np.array([[[-1000, -160, 40, 240, 3000]]], np.int16), "CT"))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert "soft-tissue" in describe_normalisation(volume(np.zeros((2, 2, 2)), "CT"))


@pytest.mark.parametrize("preset", sorted(CT_WINDOW_PRESETS))
def test_ct_presets_centre_their_level(preset):
    level, width = CT_WINDOW_PRESETS[preset]
    values = np.array([[[level - width / 2, level, level + width / 2]]], np.float32)
    result = normalize_volume(volume(values, "CT"), preset=preset)
    np.testing.assert_allclose(result.ravel(), [0.0, 0.5, 1.0], atol=1e-5)


def test_liver_and_lung_presets_have_the_documented_windows():
    assert CT_WINDOW_PRESETS["liver"] == (80.0, 150.0)
    assert CT_WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert CT_WINDOW_PRESETS["bone"] == (400.0, 1800.0)
    assert CT_WINDOW_PRESETS["brain"] == (40.0, 80.0)


def test_user_window_is_used_even_for_mr():
    values = np.array([[[0.0, 100.0, 200.0]]])
    result = normalize_volume(volume(values, "MR"), window=(100, 200))
    np.testing.assert_allclose(result.ravel(), [0.0, 0.5, 1.0], atol=1e-6)
    assert describe_normalisation(volume(values, "MR"), window=(100, 200)) != describe_normalisation(
        volume(values, "MR"), window=(100, 300)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=(40, 400), preset="liver"), "not both"),
        (dict(preset="kidney"), "unknown CT window preset 'kidney'"),
        (dict(window=(40, 0)), "positive"),
    ],
)
def test_bad_window_requests(kwargs, message):
    with pytest.raises(FewShotSAMError, match=message):
        normalize_volume(volume(np.zeros((2, 2, 2)), "CT"), **kwargs)


def test_mr_uses_percentiles_of_the_whole_volume_ignoring_background():
    rng = np.random.default_rng(0)
    array = np.zeros((6, 40, 40), np.float32)  # mostly empty field of view
    # Each slice has its own intensity range; per-slice stretching would map 150 differently on each.
    for k in range(6):
        array[k, 10:30, 10:30] = rng.uniform(100 + 10 * k, 200 + 10 * k, size=(20, 20))
    array[0, 15, 15] = array[5, 15, 15] = 150.0
    normalisation = choose_normalisation(volume(array, "MR"))
    assert normalisation.method == "percentile"
    # Background (zeros, 75% of voxels) is left out: the low end sits in the tissue range, not at 0.
    assert 100 <= normalisation.low <= 110
    assert 240 <= normalisation.high <= 250
    result = normalize_volume(volume(array, "MR"))
    assert result.dtype == np.float32 and result.min() == 0.0 and result.max() == 1.0
    assert result[0, 15, 15] == result[5, 15, 15]  # same intensity, same value on every slice
    assert np.all(result[:, :5, :5] == 0.0)  # background stays black


def test_unknown_modality_is_normalised_like_mr_and_key_is_stable():
    array = np.linspace(0, 1000, 4 * 5 * 6).reshape(4, 5, 6)
    assert describe_normalisation(volume(array, "unknown")) == describe_normalisation(volume(array, "MR"))
    assert describe_normalisation(volume(array, "MR")) != describe_normalisation(volume(array * 2, "MR"))
    assert describe_normalisation(volume(array, "MR")).startswith("percentile:")


def test_constant_volume_gives_zeros_not_nan():
    result = normalize_volume(volume(np.full((3, 4, 5), 7.0), "MR"))
    assert np.all(result == 0.0)


# --------------------------------------------------------------------------------------------------------------------
# Resizing to the model input and back


@pytest.mark.parametrize(
    "shape, target, expected",
    [((256, 256), 1024, (1024, 1024)), ((300, 200), 1024, (1024, 683)), ((61, 97), 256, (161, 256))],
)
def test_resized_shape_matches_sam(shape, target, expected):
    # SAM ResizeLongestSide.get_preprocess_shape: scale = target / max(h, w); int(x * scale + 0.5)
    assert resized_shape_for(shape, target) == expected


def test_resize_longest_side_pads_bottom_right_and_repeats_grey():
    slice2d = np.random.default_rng(1).uniform(0.1, 1.0, size=(30, 50)).astype(np.float32)
    image, info = resize_longest_side(slice2d, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert info.resized_shape == (38, 64) and info.original_shape == (30, 50)
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert np.all(image[38:] == 0.0)  # padding
    assert np.all(image[:38] > 0.0)  # content fills the top rows
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_same_size_is_an_exact_identity():
    slice2d = np.random.default_rng(2).normal(size=(64, 40)).astype(np.float32)
    image, info = resize_longest_side(slice2d, 64)
    np.testing.assert_array_equal(image[:, :40, 0], slice2d)
    np.testing.assert_array_equal(mask_logits_to_slice(image[..., 0], info), slice2d)


def disk(shape, centre, radius, pixel_spacing=(1.0, 1.0)):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) * pixel_spacing[0]) ** 2 + ((cols - centre[1]) * pixel_spacing[1]) ** 2 <= radius**2


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


@pytest.mark.parametrize("target, logits_size", [(256, 256), (256, 64)])  # full size, and SAM-style low-res logits
def test_mask_round_trip_lands_on_the_original_pixels(target, logits_size):
    mask = disk((97, 61), centre=(40, 25), radius=18)
    image, info = resize_longest_side(mask.astype(np.float32), target)
    logits = torch.as_tensor(image[..., 0] * 20 - 10)[None, None]  # [1, 1, target, target]
    if logits_size != target:
        logits = torch.nn.functional.interpolate(logits, size=(logits_size, logits_size), mode="bilinear")
    back = mask_logits_to_slice(logits[0], info)
    assert back.shape == (97, 61)
    assert iou(back > 0, mask) > 0.95
    # centroid within half a pixel: no shift from the padding or the scale
    np.testing.assert_allclose(np.argwhere(back > 0).mean(axis=0), np.argwhere(mask).mean(axis=0), atol=0.5)


def test_anisotropic_pixels_become_square_and_invert_exactly():
    spacing = (2.5, 1.0)  # rows are 2.5 mm, cols 1 mm: a 40 x 100 slice is 100 mm x 100 mm
    mask = disk((40, 100), centre=(20, 50), radius=30, pixel_spacing=spacing)
    image, info = resize_longest_side(mask.astype(np.float32), 128, pixel_spacing=spacing)
    assert info.resized_shape == (128, 128)
    resized = image[..., 0] > 0.5
    rows, cols = np.nonzero(resized)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - width) <= 2  # the physical circle is a circle for the model
    back = mask_logits_to_slice(image[..., 0] - 0.5, info)
    assert back.shape == (40, 100)
    assert iou(back > 0, mask) > 0.95
    # Without the spacing the circle stays squashed
    _, plain_info = resize_longest_side(mask.astype(np.float32), 128)
    assert plain_info.resized_shape == (51, 128)


def test_equal_pixel_spacing_is_the_default_behaviour():
    slice2d = np.random.default_rng(3).uniform(size=(37, 53)).astype(np.float32)
    default, default_info = resize_longest_side(slice2d, 96)
    square, square_info = resize_longest_side(slice2d, 96, pixel_spacing=(0.7, 0.7))
    np.testing.assert_array_equal(default, square)
    assert default_info == square_info


def test_batched_versions_match_the_single_slice_ones():
    stack = np.random.default_rng(4).uniform(size=(3, 45, 30)).astype(np.float32)
    batch, info = resize_stack_longest_side(stack[:, ::-1], 64)  # a flipped view is accepted
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.float32
    for n in range(3):
        single, single_info = resize_longest_side(stack[n, ::-1], 64)
        np.testing.assert_allclose(batch[n].permute(1, 2, 0).numpy(), single, atol=1e-6)
        assert single_info == info
    back = mask_logits_to_stack(batch[:, :1], info)  # [n, 1, h, w] logits
    assert back.shape == (3, 45, 30)
    np.testing.assert_allclose(back[1].numpy(), mask_logits_to_slice(batch[1, 0], info), atol=1e-6)
