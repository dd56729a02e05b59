"""A fast stand-in for ``python -m FewShotSAMLib propagate`` used by the Slicer-side tests of the write path.

It is run as a real child process, reads the real files the Slicer logic wrote (image + painted labels, NRRD in
LPS), resolves ``--axis`` with the engine's own orientation code, and writes a real result file on the image's
grid: every slice between a label's first and last painted slice gets the nearest painted slice of that label.
The model is not what these tests are about (test_slicer_propagation_e2e.py runs the real engine); where the
result lands in the segmentation is.

Usage (as the engine): fill_worker.py propagate IMAGE --labels LABELS --out OUT [--axis NAME] [...ignored]
"""

import argparse
import json
import sys

import numpy as np
import SimpleITK as sitk


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("subcommand")
    parser.add_argument("image")
    parser.add_argument("--labels", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--axis", default="auto")
    arguments, _ = parser.parse_known_args(argv)

    from FewShotSAMLib import orientation, volume_io

    image = sitk.ReadImage(arguments.image)
    axis = orientation.slice_axis(volume_io.geometry_from_image(image), arguments.axis)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(arguments.labels))
    result = np.zeros_like(labels)
    moved = np.moveaxis(labels, axis, 0)
    out = np.moveaxis(result, axis, 0)
    for value in [int(v) for v in np.unique(labels) if v]:
        painted = [i for i in range(moved.shape[0]) if (moved[i] == value).any()]
        for index in range(painted[0], painted[-1] + 1):
            nearest = min(painted, key=lambda p: abs(p - index))
            out[index][moved[nearest] == value] = value
    print(json.dumps({"stage": "propagate", "done": 1, "total": 1, "fraction": 1.0, "message": "filled"}),
          flush=True)
    written = sitk.GetImageFromArray(result)
    written.CopyInformation(image)
    sitk.WriteImage(written, arguments.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
