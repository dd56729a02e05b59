"""Guided painting (issue 12, part 3): does "paint slice N next" beat painting at the chunk centres?

    python -m benchmarks.accuracy.guided [--datasets chaos,hippocampus] [--scans 2,15]
                                         [--hippocampus-scans 20] [--out benchmarks/results] [--cache-dir DIR]

Per scan, both protocols start from the same painting: 1 fully labelled slice per structure, the middle of its
extent (``slice_selection.few_shot_labels`` with k = 1).

- uniform k: today's protocol 1, k slices per structure at the centres of k equal chunks of its extent
  (k = 2: 1/4 and 3/4; k = 3: 1/6, 1/2, 5/6), chosen from the reference.
- guided k: after the run with k - 1 slices per structure, each structure's suggested slice
  (``FewShotSAMLib.confidence``, computed from the prediction alone, never the reference) is painted fully from the
  reference, as a user would, and FewShotSAM runs again.
- oracle k: as guided, but the same rule ranks slices by the oracle k - 1 prediction's true error (voxels it gets
  wrong, per slice and structure, against the reference) instead of the disagreement: the most that any suggestion
  of one slice per structure can be expected to give, the bound to judge the guided rows against.

Every painted slice is copied fully from the reference (all structures on it), as in protocol 1. Writes
``<name>.json`` and ``<name>.md`` into ``--out`` (rewritten after every scan) and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from FewShotSAMLib.atomic_write import write_text_atomically
from FewShotSAMLib.confidence import MIN_GAP, NEIGHBOURHOOD, ConfidenceRecorder, suggest_slice
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.slice_selection import few_shot_labels

from ..shared_data import default_data_dir
from .datasets import DATASET_TITLES, Scan, load_scan, scan_names
from .run import DEFAULT_CACHE_DIR, REPO_ROOT, git_commit, labelled_count, log, score

KS = (1, 2, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.guided", description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="chaos,hippocampus", help="comma list of chaos,hippocampus")
    parser.add_argument("--scans", default=None, help="only these scan names (e.g. 2,15 or hippocampus_001)")
    parser.add_argument("--hippocampus-scans", type=int, default=20,
                        help="first N hippocampus scans in sorted order (default 20)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="guided", help="results file names: NAME.json and NAME.md (default guided)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="shared data folder (default: $FEWSHOTSAM_DATA or <repo>/../shared/data)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="persistent embedding cache")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or default_data_dir()
    args.datasets = [name.strip() for name in args.datasets.split(",") if name.strip()]
    args.scans = [name.strip() for name in args.scans.split(",")] if args.scans else None
    for dataset in args.datasets:
        if dataset not in ("chaos", "hippocampus"):
            parser.error(f"unknown dataset {dataset!r}; use chaos, hippocampus")
    return args


def paint_slices(painted: np.ndarray, scan: Scan, slices) -> np.ndarray:
    """A copy of `painted` with each slice (along the scan's axis) copied fully from the reference."""
    painted = painted.copy()
    index = [slice(None)] * 3
    index[scan.axis] = sorted(set(slices))
    painted[tuple(index)] = scan.reference[tuple(index)]
    return painted


def mean_dice(record: dict) -> float:
    return float(np.mean([s["dice"] for s in record["structures"].values()]))


class GuidedBenchmark:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.time()
        self.commit = git_commit()
        # from scratch, as the uniform rows: a warm start from the k - 1 run would mix two effects
        self.engine = Engine(EngineOptions(device=args.device, cache_dir=str(args.cache_dir), warm_start=False))
        self.records: list[dict] = []
        self.status = "partial: running (or stopped before the end)"

    def propagate(self, scan: Scan, painted: np.ndarray, with_confidence: bool):
        """The record fields, the confidence report (when asked, else None) and the prediction."""
        recorder = ConfidenceRecorder() if with_confidence else None
        start = time.perf_counter()
        prediction = self.engine.propagate(scan.volume, scan.label_volume(painted), confidence=recorder).array
        fields = {"seconds": round(time.perf_counter() - start, 3),
                  "labelled_slices": labelled_count(painted, scan.axis), "structures": score(scan, prediction)}
        return fields, recorder.report() if recorder is not None else None, prediction

    def run_scan(self, scan: Scan) -> None:
        base = {"dataset": scan.dataset, "scan": scan.name}
        for k in KS:
            painted = few_shot_labels(scan.reference, scan.axis, k, list(scan.structures))
            fields, report, prediction = self.propagate(scan, painted, with_confidence=k == 1)
            self.records.append({**base, "protocol": "uniform", "k": k, **fields})
            log(f"    uniform k={k}: {mean_dice(self.records[-1]):.3f}")
            if k == 1:
                start = (painted, report, prediction)
        self.add_slices(scan, "guided", *start, lambda report, painted, prediction: report.suggestions())
        self.add_slices(scan, "oracle", *start,
                        lambda report, painted, prediction: oracle_suggestions(scan, painted, prediction))

    def add_slices(self, scan: Scan, protocol: str, painted: np.ndarray, report, prediction: np.ndarray,
                   choose) -> None:
        """From the k = 1 run, k = 2, 3, ...: paint the slices choose(report, painted, prediction) gives
        ({label value: slice}) for the run before, and run again."""
        for k in KS[1:]:
            suggestions = choose(report, painted, prediction)
            chosen = {scan.structures.get(value, str(value)): z for value, z in suggestions.items()}
            painted = paint_slices(painted, scan, suggestions.values())
            fields, report, prediction = self.propagate(scan, painted, with_confidence=protocol == "guided")
            missing = [name for value, name in scan.structures.items() if value not in suggestions]
            self.records.append({"dataset": scan.dataset, "scan": scan.name, "protocol": protocol, "k": k,
                                 "added_slices": chosen, "no_suggestion": missing, **fields})
            log(f"    {protocol} k={k}: {mean_dice(self.records[-1]):.3f} (added {chosen})")

    def run(self) -> str:
        try:
            for dataset in self.args.datasets:
                names = scan_names(dataset, self.args.data_dir, False, self.args.hippocampus_scans, self.args.scans)
                for number, name in enumerate(names, start=1):
                    scan = load_scan(dataset, name, self.args.data_dir)
                    log(f"[{dataset} {number}/{len(names)}] {name}")
                    self.engine.encode(scan.volume)
                    self.run_scan(scan)
                    self.write()
            self.status = "complete"
        except KeyboardInterrupt:
            self.status = "partial: interrupted"
        return self.write()

    def write(self) -> str:
        result = {
            "run": {"status": self.status,
                    "started": datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
                    "wall_seconds": round(time.time() - self.started, 1),
                    "command": "python -m benchmarks.accuracy.guided " + " ".join(map(shlex.quote, sys.argv[1:])),
                    "commit": self.commit, "weights_id": self.engine.model.weights_id,
                    "threads": torch.get_num_threads(),
                    "rule": {"neighbourhood": NEIGHBOURHOOD, "min_gap": MIN_GAP}},
            "summaries": summaries(self.records),
            "records": self.records,
        }
        self.args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.args.out / f"{self.args.name}.json", json.dumps(result, indent=1) + "\n")
        text = markdown(result)
        write_text_atomically(self.args.out / f"{self.args.name}.md", text + "\n")
        return text


def true_error(scan: Scan, prediction: np.ndarray) -> np.ndarray:
    """[slices, structures]: the voxels of each slice that the prediction gets wrong, per structure."""
    other = tuple(axis for axis in range(3) if axis != scan.axis)
    return np.stack([((prediction == value) != (scan.reference == value)).sum(axis=other)
                     for value in scan.structures], axis=1)


def oracle_suggestions(scan: Scan, painted: np.ndarray, prediction: np.ndarray) -> dict[int, int]:
    """{label value: slice to paint next} by the suggestion rule (``confidence.suggest_slice``: neighbourhood, gap
    to the painting) run on the prediction's true error instead of the two predictors' disagreement."""
    other = tuple(axis for axis in range(3) if axis != scan.axis)
    labelled = np.flatnonzero(np.asarray(painted).any(axis=other)).tolist()
    error = true_error(scan, prediction)
    picks = {value: suggest_slice(error[:, index], labelled) for index, value in enumerate(scan.structures)}
    return {value: z for value, z in picks.items() if z is not None}


def summaries(records: list[dict]) -> list[dict]:
    """Mean Dice (over scans, of the mean over structures) and per structure, per dataset, protocol and k."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        runs = [("uniform", k) for k in KS] + [(protocol, k) for protocol in ("guided", "oracle") for k in KS[1:]]
        for protocol, k in runs:
            mine = [r for r in records if r["dataset"] == dataset and r["protocol"] == protocol and r["k"] == k]
            if not mine:
                continue
            names = list(dict.fromkeys(name for r in mine for name in r["structures"]))
            rows.append({"dataset": dataset, "protocol": protocol, "k": k, "scans": len(mine),
                         "dice": round(float(np.mean([mean_dice(r) for r in mine])), 4),
                         "labelled_slices": round(float(np.mean([r["labelled_slices"] for r in mine])), 2),
                         "per_structure": {name: round(float(np.mean([r["structures"][name]["dice"] for r in mine
                                                                      if name in r["structures"]])), 4)
                                           for name in names}})
    return rows


def markdown(result: dict) -> str:
    run = result["run"]
    lines = ["# Guided painting: suggested slices vs chunk centres", "",
             f"Command: `{run['command']}`; status: {run['status']}; commit {run['commit']}; "
             f"{run['wall_seconds'] / 60:.1f} min on {run['threads']} thread(s).", "",
             "Mean Dice over scans (each scan: the mean over its structures); `slices` = mean number of labelled "
             "slices per scan (painted slices are shared by the structures on them). *oracle*: the suggestion rule on "
             "the true error of the run before (it reads the reference), the bound for any one-slice suggestion.",
             ""]
    for dataset in dict.fromkeys(row["dataset"] for row in result["summaries"]):
        rows = [row for row in result["summaries"] if row["dataset"] == dataset]
        scans = sorted({r["scan"] for r in result["records"] if r["dataset"] == dataset},
                       key=lambda name: (len(name), name))
        names = list(rows[0]["per_structure"])
        lines += [f"## {DATASET_TITLES.get(dataset, dataset)}: {len(scans)} scans ({', '.join(scans)})", "",
                  "| protocol | k | Dice | " + " | ".join(names) + " | slices |",
                  "|---|---|---|" + "---|" * len(names) + "---|"]
        for row in rows:
            lines.append(f"| {row['protocol']} | {row['k']} | {row['dice']:.3f} | "
                         + " | ".join(f"{row['per_structure'].get(n, float('nan')):.3f}" for n in names)
                         + f" | {row['labelled_slices']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if not args.data_dir.is_dir():
        log(f"data folder {args.data_dir} not found; pass --data-dir or set FEWSHOTSAM_DATA")
        return 2
    benchmark = GuidedBenchmark(args)
    print(benchmark.run())
    return 0 if benchmark.status == "complete" else 130


if __name__ == "__main__":
    sys.exit(main())
