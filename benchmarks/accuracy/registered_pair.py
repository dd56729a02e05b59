"""The liver-and-spleen model of CHAOS 2 applied to CHAOS 3, with and without registering the support to the query.

    python -m benchmarks.accuracy.registered_pair [--cache-dir DIR] [--data-dir DIR] [--threads 1] [--out FILE]

The Slicer and web save-and-apply tests make this model (Testing/test_slicer_propagation_e2e.py: liver and spleen
each painted on the same 3 slices, spread over the slices that hold both, at 1/4, 1/2, 3/4) and apply it to CHAOS 3;
the body frame lost that liver (0.814 -> 0.620), which is why it is not apply's default. Prints JSON (and writes it
to --out) and a markdown table: Dice inside the reference extent and whole-volume Dice per organ, second pass on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from FewShotSAMLib.atomic_write import write_text_atomically
from FewShotSAMLib.metrics import dice_inside_reference_extent
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.volume import LabelVolume, Segment
from FewShotSAMLib.volume_io import read_labels, read_volume

from ..shared_data import default_data_dir
from .run import DEFAULT_CACHE_DIR, registration_listener

SUPPORT, QUERY = 2, 3
ORGANS = [Segment("liver", 1, (0.87, 0.51, 0.4)), Segment("spleen", 4, (0.62, 0.42, 0.64))]


def shared_slices(reference: np.ndarray, values: list[int], count: int = 3) -> list[int]:
    """`count` slices (along array axis 0, CHAOS's slice axis) at 1/4, 1/2, 3/4 of those holding every value."""
    common = sorted(set.intersection(*[set(np.flatnonzero((reference == v).any(axis=(1, 2))).tolist())
                                       for v in values]))
    return [common[round((n + 1) * (len(common) - 1) / (count + 1))] for n in range(count)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


def measure(engine: Engine, data: Path) -> dict:
    volume = read_volume(data / f"image_{SUPPORT}.nii.gz")
    reference = read_labels(data / f"label_{SUPPORT}.nii.gz", volume).array
    chosen = shared_slices(reference, [organ.label_value for organ in ORGANS])
    painted = np.zeros_like(reference)
    for organ in ORGANS:
        painted[chosen] = np.where(reference[chosen] == organ.label_value, organ.label_value, painted[chosen])
    engine.options.register = True  # adapt keeps the support copy only when asked
    adapter = engine.adapt([(volume, LabelVolume(painted, volume.geometry, ORGANS))])
    query = read_volume(data / f"image_{QUERY}.nii.gz")
    truth = read_labels(data / f"label_{QUERY}.nii.gz", query).array
    rows = {}
    for register in (False, True):
        engine.options.register = register
        said = []
        start = time.perf_counter()
        result = engine.apply(adapter, query, Progress(registration_listener(said)))
        seconds = time.perf_counter() - start
        rows["registered" if register else "image"] = {
            "organs": {organ.name: {"in_extent": dice_inside_reference_extent(result.array == organ.label_value,
                                                                              truth == organ.label_value),
                                    "whole_volume": dice(result.array == organ.label_value,
                                                         truth == organ.label_value)} for organ in ORGANS},
            "apply_seconds": round(seconds, 1), "registration": said[-1] if said else None}
    return {"support": SUPPORT, "query": QUERY, "painted_slices": chosen, "results": rows}


def markdown(result: dict) -> str:
    lines = [f"CHAOS {result['support']} -> {result['query']}, liver and spleen painted on slices "
             f"{', '.join(map(str, result['painted_slices']))} (as the Slicer and web save-and-apply tests):", "",
             "| positions | liver in extent | liver whole volume | spleen in extent | spleen whole volume | apply s |",
             "|---|---|---|---|---|---|"]
    for frame, row in result["results"].items():
        organs = row["organs"]
        lines.append(f"| {frame} | " + " | ".join(f"{organs[o][m]:.3f}" for o in ("liver", "spleen")
                                                   for m in ("in_extent", "whole_volume"))
                     + f" | {row['apply_seconds']} |")
    said = result["results"]["registered"]["registration"]
    return "\n".join(lines + ["", f"Registration: {said}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.registered_pair",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--data-dir", type=Path, default=None, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine(EngineOptions(cache_dir=str(args.cache_dir), device="cpu", warm_start=False))
    result = measure(engine, (args.data_dir or default_data_dir()) / "chaos_t2_mri")
    result["command"] = "python -m benchmarks.accuracy.registered_pair " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv)
    text = json.dumps(result, indent=1)
    if args.out:
        write_text_atomically(args.out, text + "\n")
    print(text)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
