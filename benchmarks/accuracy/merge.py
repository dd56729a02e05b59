"""One accuracy report from several runs of `benchmarks.accuracy.run` (split over processes with --scans, or a later
run that re-ran some methods or values of k on the same scans):

    python -m benchmarks.accuracy.merge --out DIR FOLDER [FOLDER ...]

A record is one (protocol, dataset, scan, method, k, training scans); a later folder's record replaces an earlier
one's. DIR gets accuracy.json and accuracy.md (and the plot) as a run writes them; the report lists every merged
run's folder, command, commit and status.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from FewShotSAMLib.atomic_write import write_text_atomically

from .run import JSON_NAME, rewrite_report

RUN_FIELDS = ("command", "commit", "status", "started", "wall_seconds")


def record_key(record: dict) -> tuple:
    return tuple(str(record.get(field)) for field in ("protocol", "dataset", "scan", "method", "k", "train_size"))


def merged(folders: list[Path]) -> dict:
    """The accuracy.json content of all folders together; the first folder's run section is the template."""
    results = []
    for folder in folders:
        path = folder / JSON_NAME
        if not path.is_file():
            raise SystemExit(f"{path} not found: each FOLDER must be an --out folder of benchmarks.accuracy.run")
        results.append(json.loads(path.read_text()))
    records: dict[tuple, dict] = {}
    for result in results:
        records.update((record_key(record), record) for record in result["records"])
    run = dict(results[0]["run"])
    runs = [result["run"] for result in results]
    encoding: dict = {}
    for each in runs:
        for dataset, seconds in each.get("encoding_seconds", {}).items():
            encoding.setdefault(dataset, {}).update(seconds)
    run.update({
        "status": "complete" if all(each.get("status") == "complete" for each in runs) else "partial",
        "command": "python -m benchmarks.accuracy.merge " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "commit": ", ".join(dict.fromkeys(str(each.get("commit")) for each in runs)),
        "wall_seconds": sum(each.get("wall_seconds") or 0 for each in runs),
        "coverage": [line for each in runs for line in each.get("coverage", [])],
        "encoding_seconds": encoding,
        "history": [],
        "merged_from": [{"folder": str(folder), **{field: each.get(field) for field in RUN_FIELDS}}
                        for folder, each in zip(folders, runs)],
    })
    return {"run": run, "records": list(records.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.merge", description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", metavar="FOLDER", help="--out folders of accuracy runs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged accuracy.json and .md")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out / JSON_NAME, json.dumps(merged(args.folders), indent=1) + "\n")
    print(rewrite_report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
