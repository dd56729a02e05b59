"""Protocol 2 with positions in the image frame and in the body frame (FewShotSAMLib/body_frame.py), side by side.

    python -m benchmarks.accuracy.body_frame_report --image DIR... --body DIR... \
        [--p1-image DIR --p1-body DIR] [--out benchmarks/results] [--note TEXT]...

DIR: the --out folders of `python -m benchmarks.accuracy.run --protocols 2 --datasets chaos --methods fewshotsam`
runs with --position-frame image and body (either may be split into --scans runs over several folders).
--p1-image/--p1-body: protocol 1 runs (`--protocols 1 --methods fewshotsam`) of both frames, the check that
segmenting a scan from its own painted slices loses nothing. Writes protocol2_body_frame.json and .md into --out
and prints the markdown: Dice inside the reference extent per organ over all 12 queries, the held-out and the
development queries (settings were chosen on pairs whose query is CHAOS 1, 2, 3 or 5), every pair, the failing
pairs, protocol 1 per scan and k, and whether the change meets issue 12's adoption rule.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .comparison import (
    DEVELOPMENT,
    HELD_OUT,
    RUN_KEYS,
    Sides,
    closing_lines,
    compare,
    comparison_lines,
    report_parser,
    write_report,
)
from .report import FEWSHOTSAM
from .run import JSON_NAME

NAME = "protocol2_body_frame"
FRAMES = ("image", "body")
SIDES = Sides(FRAMES, "frame", ("image frame", "body frame"), "image / body frame")
MAX_PROTOCOL1_DROP = 0.005  # adoption rule: protocol 1 (k = 1 and 3, development scans) within this of before
METRICS = {"in extent": "dice_inside_reference_extent", "whole volume": "dice"}


def protocol1_means(folder: Path) -> tuple[dict, dict[str, dict[str, float]]]:
    """The run section and {"scan k=K": {metric: mean over organs}} of FewShotSAM's protocol-1 records."""
    result = json.loads((folder / JSON_NAME).read_text())
    means = {f"{r['scan']} k={r['k']}": {name: float(np.mean([s[key] for s in r["structures"].values()]))
                                         for name, key in METRICS.items()}
             for r in result["records"] if r["protocol"] == 1 and r["method"] == FEWSHOTSAM}
    if not means:
        raise SystemExit(f"{folder / JSON_NAME}: no FewShotSAM protocol-1 records")
    return result["run"], means


def protocol1(image_dir: Path, body_dir: Path) -> dict:
    """Protocol 1 per scan and k in both frames, the means per k, and whether the body frame holds (no mean of
    either metric falls by more than MAX_PROTOCOL1_DROP)."""
    runs, means = {}, {}
    for frame, folder in zip(FRAMES, (image_dir, body_dir)):
        run, means[frame] = protocol1_means(folder)
        runs[frame] = [{key: run.get(key) for key in RUN_KEYS}]
    cases = sorted(set(means["image"]) & set(means["body"]), key=lambda c: (int(c.split()[0]), c))
    per_k = {}
    for k in sorted({case.split("=")[1] for case in cases}):
        chosen = [c for c in cases if c.endswith(f"k={k}")]
        per_k[k] = {frame: {name: float(np.mean([means[frame][c][name] for c in chosen])) for name in METRICS}
                    for frame in FRAMES}
    holds = all(row["body"][name] >= row["image"][name] - MAX_PROTOCOL1_DROP
                for row in per_k.values() for name in METRICS)
    return {"runs": runs, "cases": {c: {f: means[f][c] for f in FRAMES} for c in cases}, "per_k": per_k,
            "holds": holds}


def markdown(result: dict) -> str:
    lines = ["# Protocol 2 (CHAOS, one support scan, 3 slices per organ): positions in the body frame", "",
             "Dice inside the reference extent (`metrics.dice_inside_reference_extent`), FewShotSAM with apply's "
             "second pass, folds of `benchmarks.accuracy.run` protocol 2. Image frame: the pixel prompts' (x, y) "
             "and the footprints are positions in the model-input square. Body frame: relative to the body's "
             "bounding box on each slice (an Otsu threshold between air and tissue, largest region; "
             "FewShotSAMLib/body_frame.py), at adapt and apply time (the classifier keeps its frame through the second "
             "pass). Choices were made on the pairs whose query is CHAOS "
             f"{', '.join(DEVELOPMENT)} (development); queries {', '.join(HELD_OUT)} are held out.", ""]
    lines += comparison_lines(result, SIDES)
    check = result.get("protocol1")
    if check:
        lines += ["", "Protocol 1 (painted slices of the same scan, `Engine.propagate` with the body frame forced), "
                      "mean Dice over organs:", ""]
        for frame in FRAMES:
            for run in check["runs"][frame]:
                lines.append(f"- {frame} frame: `{run['command']}` (commit `{run['commit']}`)")
        lines += ["", "| scan, k | in extent: image | body | whole volume: image | body |", "|---|---|---|---|---|"]
        for case, row in check["cases"].items():
            lines.append(f"| {case} | " + " | ".join(f"{row[frame][name]:.3f}" for name in METRICS
                                                      for frame in FRAMES) + " |")
        for k, row in check["per_k"].items():
            lines.append(f"| **mean k={k}** | " + " | ".join(f"**{row[frame][name]:.3f}**" for name in METRICS
                                                              for frame in FRAMES) + " |")
        lines += ["", f"Protocol 1 holds in the body frame (every k and metric within {MAX_PROTOCOL1_DROP}): "
                      f"**{'yes' if check['holds'] else 'no'}**."]
    lines += closing_lines(result)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser("benchmarks.accuracy.body_frame_report", __doc__.splitlines()[0],
                           ("--image", "--out folder(s) of the protocol-2 run(s) with --position-frame image"),
                           ("--body", "--out folder(s) of the protocol-2 run(s) with --position-frame body"))
    parser.add_argument("--p1-image", type=Path, default=None, help="--out folder of a protocol-1 image-frame run")
    parser.add_argument("--p1-body", type=Path, default=None, help="--out folder of a protocol-1 body-frame run")
    args = parser.parse_args(argv)
    result = compare(args.before, args.after, SIDES, protocol=2)
    if args.p1_image and args.p1_body:
        result["protocol1"] = protocol1(args.p1_image, args.p1_body)
    print(write_report(result, markdown, "benchmarks.accuracy.body_frame_report", argv, args.note, args.out, NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
