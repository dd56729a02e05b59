"""How many decoder steps a warm-started re-run needs (FewShotSAMLib/warm_start.py's WARM_DECODER_STEPS).

    python -m benchmarks.speed.warm_steps [--steps 4,2] [--scans 1,2,...] [--ks 2,3] [--data-dir ../shared/data]
        [--out benchmarks/results] [--name warm-steps]

For each CHAOS scan and k: paint k slices per organ, run once (the run record), then paint one more slice
(slice_selection.one_more_slice) and re-run it warm-started with each number of decoder steps, every variant from
the same record (restored before each run), twice in alternating order, in one process with the OpenVINO encoder
and the embeddings cached; beside it the same painting adapted from scratch. Rows go to <name>.jsonl as they come
(a run that stops keeps them; the same command again measures only the cases missing there), then the summary to
<name>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.accuracy.datasets import chaos_cases, load_scan
from benchmarks.speed.run import REPO, cpu_record, machine_line, mean_dice, painted_case, timed_propagate, write_results
from FewShotSAMLib import warm_start
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.slice_selection import one_more_slice
from FewShotSAMLib.volume import LabelVolume


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def case_parser(description: str, ks: str, name: str) -> argparse.ArgumentParser:
    """The options of a benchmark over CHAOS scans and k (measure_missing_cases): --scans, --ks, --data-dir, --out
    and --name, with this benchmark's defaults for ks and name."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--scans", type=lambda text: text.split(","), default=chaos_cases(quick=False),
                        help="CHAOS scans (default: all)")
    parser.add_argument("--ks", type=lambda text: [int(k) for k in text.split(",")], default=ks)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default=name)
    return parser


def measure_missing_cases(rows_file: Path, scans: list[str], ks: list[int], data_dir: Path, measure) -> list[dict]:
    """measure(scan, k) -> row for every CHAOS scan and k not yet in rows_file, each row appended as it comes (a run
    that stops keeps them; the same command again measures only what is missing); returns every row."""
    done = {(row["scan"], row["k"]) for row in read_rows(rows_file)}
    for name in scans:
        missing = [k for k in ks if (name, k) not in done]
        scan = load_scan("chaos", name, data_dir) if missing else None
        for k in missing:
            row = measure(scan, k)
            with rows_file.open("a") as rows:
                rows.write(json.dumps(row) + "\n")
    return read_rows(rows_file)


def timed(engine: Engine, volume, labels: LabelVolume):
    """(class map, seconds) of one propagate."""
    times, result = timed_propagate(engine, volume, labels)
    return result.array, times["total_s"]


def measure_case(engine: Engine, scratch_engine: Engine, scan, k: int, steps: list[int]) -> dict:
    labels, values = painted_case(scan, k)
    more = LabelVolume(one_more_slice(labels.array, scan.reference, scan.axis)[0], labels.geometry, labels.segments)
    key = warm_start.run_key(scan.volume, scan.axis, engine.options, engine.model.weights_id, values)
    record = warm_start.record_path(engine.cache.runs_dir, key)
    record.unlink(missing_ok=True)
    timed(engine, scan.volume, labels)  # encodes what the structures reach and leaves the record
    kept = record.with_suffix(".kept")
    shutil.copyfile(record, kept)
    scratch, scratch_s = timed(scratch_engine, scan.volume, more)
    row = {"scan": scan.name, "k": k, "scratch_dice": mean_dice(scratch, scan.reference, values),
           "scratch_s": scratch_s, "dice": {}, "seconds": {}}
    for order in (steps, steps[::-1]):
        for count in order:
            warm_start.WARM_DECODER_STEPS = count
            shutil.copyfile(kept, record)
            warm, seconds = timed(engine, scan.volume, more)
            row["dice"].setdefault(str(count), mean_dice(warm, scan.reference, values))
            row["seconds"].setdefault(str(count), []).append(seconds)
    return row


def summary(rows: list[dict], steps: list[int]) -> dict:
    first = str(steps[0])
    result = {"cases": len(rows), "scans": sorted({row["scan"] for row in rows}, key=int), "variants": {}}
    for count in map(str, steps):
        result["variants"][count] = {
            "mean_dice": statistics.mean(row["dice"][count] for row in rows),
            "median_s": statistics.median(statistics.median(row["seconds"][count]) for row in rows),
            "dice_change_vs_first": [min(row["dice"][count] - row["dice"][first] for row in rows),
                                     max(row["dice"][count] - row["dice"][first] for row in rows)],
            "median_saving_vs_first_s": statistics.median(
                statistics.median(row["seconds"][first]) - statistics.median(row["seconds"][count]) for row in rows)}
    result["scratch"] = {"mean_dice": statistics.mean(row["scratch_dice"] for row in rows),
                         "median_s": statistics.median(row["scratch_s"] for row in rows)}
    return result


def markdown(report: dict, steps: list[int]) -> str:
    result = report["summary"]
    lines = [f"Machine: {report['machine']}; CPU {report['cpu']['model']}.", "",
             f"CHAOS scans {', '.join(result['scans'])}, k = {report['ks']} painted slices per organ plus one more "
             f"({result['cases']} cases), OpenVINO encoder, embeddings cached, one process; each re-run's time is "
             "the median of 2 (variants alternating).", "",
             f"| re-run of one more slice | mean Dice | median time (s) | Dice change per case vs {steps[0]} steps "
             "(min, max) | median time saved (s) |", "|---|---|---|---|---|"]
    for count, row in result["variants"].items():
        low, high = row["dice_change_vs_first"]
        lines.append(f"| warm-started, {count} decoder steps | {row['mean_dice']:.4f} | {row['median_s']:.2f} | "
                     f"{low:+.4f}, {high:+.4f} | {row['median_saving_vs_first_s']:.2f} |")
    lines.append(f"| adapted from scratch (16 steps) | {result['scratch']['mean_dice']:.4f} | "
                 f"{result['scratch']['median_s']:.2f} | - | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = case_parser(__doc__.splitlines()[0], "2,3", "warm-steps")
    parser.add_argument("--steps", default="4,2", help="decoder steps to compare; the first is the reference")
    args = parser.parse_args(argv)
    steps = [int(text) for text in args.steps.split(",")]
    ks, scans = args.ks, args.scans
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fewshotsam-warm-steps-") as cache:
        engine = Engine(EngineOptions(cache_dir=cache, device="cpu", encoder="openvino"))
        scratch_engine = Engine(dataclasses.replace(engine.options, warm_start=False), model=engine.model)
        rows = measure_missing_cases(args.out / f"{args.name}.jsonl", scans, ks, args.data_dir,
                                     lambda scan, k: measure_case(engine, scratch_engine, scan, k, steps))
    report = {"machine": machine_line(), "cpu": cpu_record(), "steps": steps, "ks": ks, "rows": rows,
              "summary": summary(rows, steps)}
    write_results(args.out, args.name, report, markdown(report, steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
