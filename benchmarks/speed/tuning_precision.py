"""The decoder's tuning in bf16 autocast against fp32 (FewShotSAMLib/tuning.py tuning_autocast), time and Dice.

    python -m benchmarks.speed.tuning_precision [--scans 1,2,...] [--ks 1,3] [--data-dir ../shared/data]
        [--out benchmarks/results] [--name tuning-precision]

For each CHAOS scan and k: the painting adapted from scratch on cached embeddings (the speed benchmark's "warm"
run), once with each precision and again in the opposite order, in one process with the `auto` encoder: the
tuning stage's seconds and the whole run's, and the mean Dice over the organs. Rows go to <name>.jsonl as they come
(the same command again measures only the cases missing there), then the summary to <name>.json and .md.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile

from benchmarks.speed.run import (
    cpu_numbers,
    cpu_record,
    machine_line,
    mean_dice,
    painted_case,
    timed_propagate,
    write_results,
)
from benchmarks.speed.warm_steps import case_parser, measure_missing_cases
from FewShotSAMLib.adapter import AdaptOptions
from FewShotSAMLib.compiled_encoder import cpu_has_bf16
from FewShotSAMLib.pipeline import Engine, EngineOptions

PRECISIONS = ("fp32", "bf16")


def measure_case(engines: dict[str, Engine], scan, k: int) -> dict:
    labels, values = painted_case(scan, k)
    engines["fp32"].propagate(scan.volume, labels)  # encodes what the structures reach: every run after is warm
    row = {"scan": scan.name, "k": k, "dice": {}, "tune_s": {}, "total_s": {}}
    for order in (PRECISIONS, PRECISIONS[::-1]):
        for precision in order:
            times, result = timed_propagate(engines[precision], scan.volume, labels)
            row["dice"].setdefault(precision, mean_dice(result.array, scan.reference, values))
            row["tune_s"].setdefault(precision, []).append(times.get("tune_s", 0.0))
            row["total_s"].setdefault(precision, []).append(times["total_s"])
    return row


def summary(rows: list[dict]) -> dict:
    def median_of(key: str, precision: str) -> float:
        return statistics.median(statistics.median(row[key][precision]) for row in rows)

    result = {"cases": len(rows), "scans": sorted({row["scan"] for row in rows}, key=int), "precisions": {}}
    for precision in PRECISIONS:
        changes = [row["dice"][precision] - row["dice"]["fp32"] for row in rows]
        result["precisions"][precision] = {
            "mean_dice": statistics.mean(row["dice"][precision] for row in rows),
            "dice_change_vs_fp32": [min(changes), max(changes)],
            "median_tune_s": median_of("tune_s", precision), "median_total_s": median_of("total_s", precision),
            "median_tune_ratio_to_fp32": statistics.median(
                statistics.median(row["tune_s"][precision]) / statistics.median(row["tune_s"]["fp32"])
                for row in rows)}
    return result


def markdown(report: dict) -> str:
    result = report["summary"]
    cpu = report["cpu"]
    lines = [f"Machine: {report['machine']}; CPU {cpu['model']}{cpu_numbers(cpu)}, instruction sets "
             f"{', '.join(cpu['instruction_sets'])}; bf16 instructions (oneDNN): "
             f"{'yes' if report['cpu_has_bf16'] else 'no (bf16 emulated)'}.", "",
             f"CHAOS scans {', '.join(result['scans'])}, k = {report['ks']} painted slices per organ "
             f"({result['cases']} cases), adapted from scratch on cached embeddings (`auto` encoder), one process; "
             "times are medians over the cases of each case's median of 2 (precisions alternating).", "",
             "| decoder tuning | mean Dice | Dice change per case vs fp32 (min, max) | tuning (s) | "
             "tuning, x fp32 (median per case) | whole run (s) |", "|---|---|---|---|---|---|"]
    for precision, row in result["precisions"].items():
        low, high = row["dice_change_vs_fp32"]
        lines.append(f"| {precision} | {row['mean_dice']:.4f} | {low:+.4f}, {high:+.4f} | {row['median_tune_s']:.2f} "
                     f"| {row['median_tune_ratio_to_fp32']:.2f}x | {row['median_total_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = case_parser(__doc__.splitlines()[0], "1,3", "tuning-precision").parse_args(argv)
    ks, scans = args.ks, args.scans
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fewshotsam-tuning-precision-") as cache:
        base = EngineOptions(cache_dir=cache, device="cpu", warm_start=False)
        engines = {"fp32": Engine(dataclasses.replace(base, adapt=AdaptOptions(tuning_precision="fp32")))}
        engines["bf16"] = Engine(dataclasses.replace(base, adapt=AdaptOptions(tuning_precision="bf16")),
                                 model=engines["fp32"].model)
        rows = measure_missing_cases(args.out / f"{args.name}.jsonl", scans, ks, args.data_dir,
                                     lambda scan, k: measure_case(engines, scan, k))
    report = {"machine": machine_line(), "cpu": cpu_record(), "cpu_has_bf16": cpu_has_bf16(), "ks": ks,
              "rows": rows, "summary": summary(rows)}
    write_results(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
