"""Helpers shared by the geometry tests."""

import numpy as np


def rotation(axis: str, degrees: float) -> np.ndarray:
    """A 3x3 rotation about x, y or z: for oblique direction matrices in geometry tests."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]
