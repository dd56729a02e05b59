"""The small-structure step's engine share (issue 12, part 1): is 0.3, chosen on two hippocampus scans, right
elsewhere, and does the engine's own certainty say where it should be larger?

    python -m benchmarks.accuracy.blend_weights [--datasets hippocampus,spinal_cord,totalseg_mr,totalseg_small]
                                                [--hippocampus-scans 20] [--ks 1,3,5] [--weights 0.3,0.5,0.7,1]
                                                [--out benchmarks/results] [--cache-dir DIR] [--render]

Per scan and k (protocol 1's painting, ``few_shot_labels``), the engine runs once without the step and records how
far its two predictors disagree (``confidence.ConfidenceRecorder``); the step (``small_structures.
blend_with_painted_shape``, the function the engine calls) is then applied to that same result with each engine
share (``model_weight``, ``model_weight_beyond``, ``model_weight_grown`` and ``thin_model_weight`` all set to it;
1 = the engine's outline alone). Rows: every structure the step treats as small or thin, with its Dice per share
and its agreement (1 - the decoder/pixel-prompt disagreement over the union of both, summed over the unpainted
slices). Writes ``<name>.json`` and ``<name>.md`` into ``--out`` (rewritten after every scan) and prints the
markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from FewShotSAMLib.atomic_write import write_text_atomically
from FewShotSAMLib.confidence import ConfidenceRecorder
from FewShotSAMLib.fewshot import labelled_slice_indices
from FewShotSAMLib.metrics import dice
from FewShotSAMLib.orientation import in_plane_spacing, to_slices
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.small_structures import ShapeBlendOptions, blend_with_painted_shape, is_small, is_thin

from ..shared_data import default_data_dir
from .datasets import DEVELOPMENT_SCANS, Scan, load_scan, scan_names
from .run import DEFAULT_CACHE_DIR, REPO_ROOT, git_commit, log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.blend_weights",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="hippocampus,spinal_cord,totalseg_mr,totalseg_small")
    parser.add_argument("--hippocampus-scans", type=int, default=20, help="first N in sorted order (default 20)")
    parser.add_argument("--ks", default="1,3,5")
    parser.add_argument("--weights", default="0.3,0.5,0.7,1", help="engine shares to compare (default 0.3 first)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="blend-weights")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--render", action="store_true",
                        help="only rewrite <name>.md from the saved <name>.json in --out (no engine run)")
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or default_data_dir()
    args.datasets = [name for name in args.datasets.split(",") if name]
    args.ks = [int(k) for k in args.ks.split(",")]
    args.weights = [float(w) for w in args.weights.split(",")]
    return args


def structure_rows(scan: Scan, k: int, engine: Engine, weights: list[float]) -> list[dict]:
    painted = few_shot_labels(scan.reference, scan.axis, k, list(scan.structures))
    recorder = ConfidenceRecorder()
    result = engine.propagate(scan.volume, scan.label_volume(painted), confidence=recorder).array
    painted_slices = to_slices(painted, scan.axis)
    labelled = labelled_slice_indices(painted_slices)
    unpainted = np.setdiff1d(np.arange(painted_slices.shape[0]), labelled)
    values = list(scan.structures)
    spacing = in_plane_spacing(scan.volume.geometry, scan.axis)
    blended = {w: blend_with_painted_shape(result, painted, labelled, scan.axis, values, spacing,
                                           dataclasses.replace(ShapeBlendOptions(), model_weight=w,
                                                               model_weight_beyond=w, model_weight_grown=w,
                                                               thin_model_weight=w),
                                           image=scan.volume.array)
               for w in weights}
    order = [segment.label_value for segment in recorder.segments]
    rows = []
    for value in values:
        kind = "small" if is_small(painted_slices, value) else "thin" if is_thin(painted_slices, value) else None
        if kind is None:
            continue
        column = order.index(value)
        union = recorder.union[unpainted, column].sum()
        agreement = 1 - recorder.disagreement[unpainted, column].sum() / union if union > 0 else 1.0
        rows.append({"dataset": scan.dataset, "scan": scan.name, "k": k, "structure": scan.structures[value],
                     "kind": kind,
                     "development": scan.name in DEVELOPMENT_SCANS.get(scan.dataset, []),
                     "agreement": round(float(agreement), 4),
                     "dice": {str(w): round(dice(blended[w] == value, scan.reference == value), 4) for w in weights}})
    return rows


def group_name(row: dict) -> str:
    name = row["dataset"] + (", thin structures" if row.get("kind") == "thin" else "")
    if row["dataset"] in DEVELOPMENT_SCANS:
        return f"{name} ({'development' if row['development'] else 'held out'})"
    return name


def markdown(result: dict) -> str:
    run, rows = result["run"], result["rows"]
    weights = [str(w) for w in run["weights"]]
    lines = ["# The small-structure step's engine share", "",
             f"`{run['command']}` (commit {run['commit']}, {run['status']}, {run['wall_seconds']} s). Mean Dice of "
             "the structures the step treats as small (or thin: own rows), per engine share (1 = the engine's "
             "outline alone); agreement: the engine's two predictors on the unpainted slices; best per structure: "
             "an oracle that picks each structure's best share (the most any per-structure choice of share could "
             "reach).", "",
             "| data | k | structures | agreement | " + " | ".join(f"share {w}" for w in weights)
             + " | best per structure |",
             "|---|---|---|---|" + "---|" * (len(weights) + 1)]
    for group in dict.fromkeys(group_name(row) for row in rows):
        for k in run["ks"]:
            mine = [row for row in rows if group_name(row) == group and row["k"] == k]
            if mine:
                means = [np.mean([row["dice"][w] for row in mine]) for w in weights]
                best = int(np.argmax(means))
                cells = [f"**{m:.3f}**" if i == best else f"{m:.3f}" for i, m in enumerate(means)]
                oracle = np.mean([max(row["dice"].values()) for row in mine])
                lines.append(f"| {group} | {k} | {len(mine)} | {np.mean([row['agreement'] for row in mine]):.3f} | "
                             + " | ".join(cells) + f" | {oracle:.3f} |")
    return "\n".join(lines)


def write_markdown(args: argparse.Namespace, result: dict) -> str:
    text = markdown(result)
    write_text_atomically(args.out / f"{args.name}.md", text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(write_markdown(args, json.loads((args.out / f"{args.name}.json").read_text())))
        return 0
    engine = Engine(EngineOptions(cache_dir=str(args.cache_dir), warm_start=False))
    engine.options.small_structures.enabled = False  # the step is applied here, once per share
    started, rows, status = time.time(), [], "partial: running (or stopped before the end)"

    def write() -> str:
        result = {"run": {"status": status, "commit": git_commit(), "weights": args.weights, "ks": args.ks,
                          "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
                          "wall_seconds": round(time.time() - started, 1),
                          "command": "python -m benchmarks.accuracy.blend_weights "
                                     + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))},
                  "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
        return write_markdown(args, result)

    for dataset in args.datasets:
        for name in scan_names(dataset, args.data_dir, False, args.hippocampus_scans):
            scan = load_scan(dataset, name, args.data_dir)
            for k in args.ks:
                rows += structure_rows(scan, k, engine, args.weights)
            log(f"[{dataset}] {name} done")
            write()
    status = "complete"
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
