"""Protocol 2 or 3 with and without apply's second pass (FewShotSAMLib/second_pass.py), side by side.

    python -m benchmarks.accuracy.second_pass_report [--protocol 2|3] --without DIR... --with DIR...
        [--out benchmarks/results]

DIR: the --out folders of two `python -m benchmarks.accuracy.run --protocols P --datasets chaos --methods
fewshotsam` runs, one with --no-second-pass (either may be split into --scans runs over several folders). Writes
protocolP_second_pass.json and .md into --out and prints the markdown: Dice inside the reference extent per organ
over all 12 queries, the held-out queries and the development queries (the second pass's settings were chosen on
pairs whose query is CHAOS 1, 2, 3 or 5), every pair, the pairs that fail (an organ's Dice < FAILURE), and whether
the change meets the adoption rule of issue 12. Only queries that both runs segmented are compared.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from FewShotSAMLib.atomic_write import write_text_atomically

from .report import FEWSHOTSAM
from .run import JSON_NAME, REPO_ROOT

DEVELOPMENT = ["1", "2", "3", "5"]
HELD_OUT = ["8", "10", "13", "15", "19", "20", "21", "22"]
FAILURE = 0.5  # an organ's Dice in extent below this on a pair: the pair fails for that organ
MAX_ORGAN_DROP = 0.01  # adoption rule: the 12-query mean rises and no organ's mean falls by more than this
TITLES = {2: "Protocol 2 (CHAOS, one support scan, 3 slices per organ)",
          3: "Protocol 3 (CHAOS, every labelled slice of the training scans of a fold)"}


def protocol_records(folders: list[Path], protocol: int) -> tuple[list[dict], dict[str, dict]]:
    """The run sections and {query: record} of FewShotSAM's records of the protocol in each folder/accuracy.json
    (runs split over several processes with --scans; a later folder's record of a query replaces an earlier one's).
    Protocol 3: each query's record with the most training scans."""
    runs, records = [], {}
    for folder in folders:
        result = json.loads((folder / JSON_NAME).read_text())
        mine = {}
        for r in sorted(result["records"], key=lambda r: r.get("train_size") or 0):
            if r["protocol"] == protocol and r["method"] == FEWSHOTSAM:
                mine[r["scan"]] = r
        if not mine:
            raise SystemExit(f"{folder / JSON_NAME}: no FewShotSAM protocol-{protocol} records")
        runs.append(result["run"])
        records.update(mine)
    return runs, records


def summary(records: dict[str, dict], queries: list[str]) -> dict:
    """Per-organ mean Dice in extent, the mean over organs and queries, whole-volume Dice, apply seconds."""
    chosen = [records[q] for q in queries if q in records]
    organs = list(chosen[0]["structures"])
    per_organ = {o: float(np.mean([r["structures"][o]["dice_inside_reference_extent"] for r in chosen]))
                 for o in organs}
    per_query = [np.mean([r["structures"][o]["dice_inside_reference_extent"] for o in organs]) for r in chosen]
    whole = [np.mean([r["structures"][o]["dice"] for o in organs]) for r in chosen]
    return {"queries": len(chosen), "organs": per_organ, "mean_in_extent": float(np.mean(per_query)),
            "sd_in_extent": float(np.std(per_query, ddof=1)) if len(per_query) > 1 else 0.0,
            "mean_whole_volume": float(np.mean(whole)),
            "apply_seconds": float(np.mean([r["apply_seconds"] for r in chosen]))}


def support_of(record: dict) -> str:
    """The scan(s) the model was made on: protocol 2's support scan, protocol 3's training scans."""
    return record.get("support") or "+".join(record["train_scans"])


def failures(records: dict[str, dict]) -> list[str]:
    return [f"{support_of(r)}->{q} {organ} ({s['dice_inside_reference_extent']:.2f})"
            for q, r in records.items() for organ, s in r["structures"].items()
            if s["dice_inside_reference_extent"] < FAILURE]


def build(without_dirs: list[Path], with_dirs: list[Path], protocol: int = 2) -> dict:
    runs, tables = {}, {}
    loaded = {"without": protocol_records(without_dirs, protocol), "with": protocol_records(with_dirs, protocol)}
    both = set(loaded["without"][1]) & set(loaded["with"][1])
    for label, (run_sections, records) in loaded.items():
        records = {q: r for q, r in records.items() if q in both}
        runs[label] = [{key: run.get(key) for key in ("command", "commit", "started", "encoder", "threads",
                                                        "second_pass", "status")} for run in run_sections]
        tables[label] = {
            "all": summary(records, DEVELOPMENT + HELD_OUT), "held_out": summary(records, HELD_OUT),
            "development": summary(records, DEVELOPMENT), "failures": failures(records),
            "pairs": {q: {"support": support_of(r),
                          "in_extent": {o: s["dice_inside_reference_extent"] for o, s in r["structures"].items()}}
                      for q, r in records.items()},
        }
    before, after = tables["without"]["all"], tables["with"]["all"]
    drops = {o: before["organs"][o] - after["organs"][o] for o in before["organs"]}
    adopted = after["mean_in_extent"] > before["mean_in_extent"] and max(drops.values()) <= MAX_ORGAN_DROP
    return {"protocol": protocol, "runs": runs, "tables": tables, "organ_drop": drops,
            "meets_adoption_rule": adopted}


def markdown(result: dict) -> str:
    tables = result["tables"]
    organs = list(tables["without"]["all"]["organs"])
    protocol = result.get("protocol", 2)
    lines = [f"# {TITLES[protocol]}: apply's second pass", "",
             "Dice inside the reference extent (`metrics.dice_inside_reference_extent`), FewShotSAM, folds of "
             f"`benchmarks.accuracy.run` protocol {protocol}. Second pass: after the first prediction, the adapter "
             "is tuned on from its own weights on the query's most confident slices (FewShotSAMLib/second_pass.py) "
             "and the query is predicted again. Its settings were chosen on the pairs whose query is CHAOS "
             f"{', '.join(DEVELOPMENT)} (development); queries {', '.join(HELD_OUT)} are held out.", ""]
    for label in ("without", "with"):
        for run in result["runs"][label]:
            lines.append(f"- {label} second pass: `{run['command']}` (commit `{run['commit']}`, started "
                         f"{run['started']}, encoder {run['encoder']}, {run['threads']} thread(s), status "
                         f"{run['status']})")
    lines += ["", "| queries | second pass | n | " + " | ".join(organs) + " | **mean in extent** | whole-volume | "
              "apply s/query (loaded shared CPU) |", "|---|---|---|" + "---|" * (len(organs) + 3)]
    for subset in ("all", "held_out", "development"):
        for label in ("without", "with"):
            row = tables[label][subset]
            lines.append(f"| {subset.replace('_', '-')} | {label} | {row['queries']} | "
                         + " | ".join(f"{row['organs'][o]:.3f}" for o in organs)
                         + f" | **{row['mean_in_extent']:.3f} ± {row['sd_in_extent']:.3f}** | "
                           f"{row['mean_whole_volume']:.3f} | {row['apply_seconds']:.1f} |")
    lines += ["", "Per pair (support scan(s) -> query), Dice in extent without / with the second pass:", "",
              "| pair | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
    for query in DEVELOPMENT + HELD_OUT:
        before = tables["without"]["pairs"].get(query)
        after = tables["with"]["pairs"].get(query)
        if before is None or after is None:
            continue
        cells = [f"{before['in_extent'][o]:.3f} / {after['in_extent'][o]:.3f}" for o in organs]
        lines.append(f"| {before['support']} -> {query} | " + " | ".join(cells) + " |")
    lines += ["", f"Failing pairs (an organ's Dice in extent < {FAILURE}):", ""]
    for label in ("without", "with"):
        lines.append(f"- {label} second pass: {'; '.join(tables[label]['failures']) or 'none'}")
    drops = ", ".join(f"{o} {-d:+.3f}" for o, d in result["organ_drop"].items())
    lines += ["", f"Change per organ over the 12 queries: {drops}. Adoption rule (issue 12: the 12-query mean rises "
                  f"and no organ falls by more than {MAX_ORGAN_DROP}): "
                  f"**{'met' if result['meets_adoption_rule'] else 'not met'}**."]
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    if result.get("command"):
        lines += ["", f"Made by `{result['command']}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.second_pass_report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", type=int, choices=sorted(TITLES), default=2)
    parser.add_argument("--without", type=Path, nargs="+", required=True,
                        help="--out folder(s) of the --no-second-pass run")
    parser.add_argument("--with", dest="with_", type=Path, nargs="+", required=True,
                        help="--out folder(s) of the default run")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    args = parser.parse_args(argv)
    result = build(args.without, args.with_, args.protocol)
    result["command"] = "python -m benchmarks.accuracy.second_pass_report " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    result["notes"] = args.note
    text = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"protocol{args.protocol}_second_pass"
    write_text_atomically(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    write_text_atomically(args.out / f"{name}.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
