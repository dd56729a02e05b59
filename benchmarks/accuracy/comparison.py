"""Two sets of FewShotSAM runs across scans (accuracy protocols 2 and 3) side by side: Dice inside the reference
extent per organ over all queries, the held-out and the development queries, every pair, the failing pairs, and
issue 12's adoption rule. second_pass_report.py and body_frame_report.py say what the two sets are.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from FewShotSAMLib.atomic_write import write_text_atomically

from .report import FEWSHOTSAM
from .run import JSON_NAME, REPO_ROOT

DEVELOPMENT = ["1", "2", "3", "5"]  # queries on which the across-scan settings were chosen
HELD_OUT = ["8", "10", "13", "15", "19", "20", "21", "22"]
FAILURE = 0.5  # an organ's Dice in extent below this on a pair: the pair fails for that organ
MAX_ORGAN_DROP = 0.01  # adoption rule: the mean over the queries rises and no organ's mean falls by more than this
RUN_KEYS = ("command", "commit", "started", "encoder", "threads", "second_pass", "position_frame", "status")


@dataclass
class Sides:
    """How a report names its two sets of runs: `labels` (before, after), e.g. ("without", "with"), the table
    column they fill, the name of each in the list of runs, and the caption of the per-pair table."""
    labels: tuple[str, str]
    column: str
    run_names: tuple[str, str]
    pair_caption: str


def report_parser(module: str, description: str, before: tuple[str, str],
                  after: tuple[str, str]) -> argparse.ArgumentParser:
    """The command line every before/after report shares: the --out folders of the accuracy runs of each side
    (before, after: (flag, help); parsed as args.before and args.after), --out for the report, repeatable --note."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    for dest, (flag, text) in (("before", before), ("after", after)):
        parser.add_argument(flag, dest=dest, type=Path, nargs="+", required=True, metavar="FOLDER", help=text)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    return parser


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


def compare(before_dirs: list[Path], after_dirs: list[Path], sides: Sides, protocol: int) -> dict:
    """Both sets' tables over the queries both segmented, each organ's drop, and whether the rule is met."""
    runs, tables = {}, {}
    loaded = dict(zip(sides.labels, (protocol_records(before_dirs, protocol), protocol_records(after_dirs, protocol))))
    both = set.intersection(*(set(records) for _, records in loaded.values()))
    for label, (run_sections, records) in loaded.items():
        records = {q: r for q, r in records.items() if q in both}
        runs[label] = [{key: run.get(key) for key in RUN_KEYS} for run in run_sections]
        tables[label] = {
            "all": summary(records, DEVELOPMENT + HELD_OUT), "held_out": summary(records, HELD_OUT),
            "development": summary(records, DEVELOPMENT), "failures": failures(records),
            "pairs": {q: {"support": support_of(r),
                          "in_extent": {o: s["dice_inside_reference_extent"] for o, s in r["structures"].items()}}
                      for q, r in records.items()},
        }
    before, after = (tables[label]["all"] for label in sides.labels)
    drops = {o: before["organs"][o] - after["organs"][o] for o in before["organs"]}
    adopted = after["mean_in_extent"] > before["mean_in_extent"] and max(drops.values()) <= MAX_ORGAN_DROP
    return {"protocol": protocol, "runs": runs, "tables": tables, "organ_drop": drops,
            "meets_adoption_rule": adopted}


def comparison_lines(result: dict, sides: Sides) -> list[str]:
    """The markdown after a report's title and introduction: its runs, the tables, the failing pairs, the rule."""
    tables = result["tables"]
    organs = list(tables[sides.labels[0]]["all"]["organs"])
    lines = []
    for label, name in zip(sides.labels, sides.run_names):
        for run in result["runs"][label]:
            lines.append(f"- {name}: `{run['command']}` (commit `{run['commit']}`, started {run['started']}, "
                         f"encoder {run['encoder']}, {run['threads']} thread(s), status {run['status']})")
    lines += ["", f"| queries | {sides.column} | n | " + " | ".join(organs) + " | **mean in extent** | whole-volume | "
              "apply s/query (loaded shared CPU) |", "|---|---|---|" + "---|" * (len(organs) + 3)]
    for subset in ("all", "held_out", "development"):
        for label in sides.labels:
            row = tables[label][subset]
            lines.append(f"| {subset.replace('_', '-')} | {label} | {row['queries']} | "
                         + " | ".join(f"{row['organs'][o]:.3f}" for o in organs)
                         + f" | **{row['mean_in_extent']:.3f} ± {row['sd_in_extent']:.3f}** | "
                           f"{row['mean_whole_volume']:.3f} | {row['apply_seconds']:.1f} |")
    lines += ["", f"Per pair (support scan(s) -> query), Dice in extent {sides.pair_caption}:", "",
              "| pair | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
    for query in DEVELOPMENT + HELD_OUT:
        before, after = (tables[label]["pairs"].get(query) for label in sides.labels)
        if before is None or after is None:
            continue
        cells = [f"{before['in_extent'][o]:.3f} / {after['in_extent'][o]:.3f}" for o in organs]
        lines.append(f"| {before['support']} -> {query} | " + " | ".join(cells) + " |")
    lines += ["", f"Failing pairs (an organ's Dice in extent < {FAILURE}):", ""]
    for label, name in zip(sides.labels, sides.run_names):
        lines.append(f"- {name}: {'; '.join(tables[label]['failures']) or 'none'}")
    drops = ", ".join(f"{o} {-d:+.3f}" for o, d in result["organ_drop"].items())
    lines += ["", f"Change per organ over the queries: {drops}. Adoption rule (issue 12: the mean over the queries "
                  f"rises and no organ falls by more than {MAX_ORGAN_DROP}): "
                  f"**{'met' if result['meets_adoption_rule'] else 'not met'}**."]
    return lines


def closing_lines(result: dict) -> list[str]:
    lines = []
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    if result.get("command"):
        lines += ["", f"Made by `{result['command']}`."]
    return lines


def write_report(result: dict, text_of, module: str, argv: list[str] | None, notes: list[str], out: Path,
                 name: str) -> str:
    """Record the command and notes in the result, write NAME.json and NAME.md into `out` and return the markdown
    (text_of: result -> markdown)."""
    result["command"] = f"python -m {module} " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    result["notes"] = notes
    text = text_of(result)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    write_text_atomically(out / f"{name}.md", text + "\n")
    return text
