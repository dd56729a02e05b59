import numpy as np
import pytest
from geometry_helpers import rotation

from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.orientation import (
    from_slices,
    in_plane_spacing,
    slice_axis,
    slice_spacing,
    to_slices,
)
from FewShotSAMLib.volume import Geometry


def geometry(direction, spacing=(0.5, 0.7, 3.0)) -> Geometry:
    return Geometry(spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.asarray(direction, float), shape=(4, 5, 6))


# Columns are the i, j, k axes in LPS.
IDENTITY = np.eye(3)
# Coronal acquisition: i runs L, j runs head-to-foot (-S), k runs A-P.
CORONAL_STACK = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
OBLIQUE = rotation("x", 20) @ rotation("y", 20)
FLIPPED = np.diag([-1.0, 1.0, -1.0])


@pytest.mark.parametrize(
    "direction, expected_axial, expected_coronal, expected_sagittal",
    [
        (IDENTITY, 0, 1, 2),
        (CORONAL_STACK, 1, 0, 2),
        (OBLIQUE, 0, 1, 2),
        (FLIPPED, 0, 1, 2),
        (CORONAL_STACK @ rotation("x", 25) @ rotation("z", 15), 1, 0, 2),  # oblique coronal, axes reordered
        (np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], float), 1, 2, 0),  # sagittal stack: k along L-R (flipped)
    ],
    ids=["identity", "k-is-AP", "oblique", "flipped", "oblique-coronal", "k-is-LR"],
)
def test_slice_axis_follows_the_direction_matrix(direction, expected_axial, expected_coronal, expected_sagittal):
    g = geometry(direction)
    assert slice_axis(g) == expected_axial
    assert slice_axis(g, "auto") == expected_axial
    assert slice_axis(g, "axial") == expected_axial
    assert slice_axis(g, "Coronal") == expected_coronal
    assert slice_axis(g, "sagittal") == expected_sagittal


def test_slice_axis_prefers_k_on_an_exact_tie():
    # j and k both at 45 degrees to S: neither is "more axial", and k (array axis 0) is the acquired stack.
    tie = rotation("x", 45)
    assert slice_axis(geometry(tie)) == 0


def test_slice_axis_accepts_explicit_array_axes_and_refuses_unknown_choices():
    g = geometry(CORONAL_STACK)
    assert [slice_axis(g, a) for a in (0, 1, 2)] == [0, 1, 2]
    with pytest.raises(FewShotSAMError, match="unknown slice axis 'Red'"):
        slice_axis(g, "Red")  # a viewer name is never a slice axis
    with pytest.raises(FewShotSAMError, match="0, 1 or 2"):
        slice_axis(g, 3)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_to_slices_is_a_view_and_from_slices_inverts_it(axis):
    array = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    stack = to_slices(array, axis)
    assert stack.shape[0] == array.shape[axis]
    assert np.shares_memory(stack, array)
    # slice n of the stack is the array cut at index n along the axis
    np.testing.assert_array_equal(stack[2], np.take(array, 2, axis=axis))
    restored = from_slices(stack, axis)
    assert restored.shape == array.shape
    np.testing.assert_array_equal(restored, array)


def test_slice_and_in_plane_spacing_match_the_slice_layout():
    g = geometry(IDENTITY, spacing=(0.5, 0.7, 3.0))  # (i, j, k) mm
    assert slice_spacing(g, 0) == 3.0
    assert in_plane_spacing(g, 0) == (0.7, 0.5)  # rows are j, cols are i
    assert slice_spacing(g, 1) == 0.7
    assert in_plane_spacing(g, 1) == (3.0, 0.5)  # rows are k, cols are i
    assert slice_spacing(g, 2) == 0.5
    assert in_plane_spacing(g, 2) == (3.0, 0.7)  # rows are k, cols are j
    stack = to_slices(np.zeros((4, 5, 6)), 1)
    assert stack.shape[1:] == (4, 6)  # consistent with (rows=k, cols=i)
