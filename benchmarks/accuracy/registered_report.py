"""Protocol 2 with image-frame positions and with positions registered to the support scan, side by side.

    python -m benchmarks.accuracy.registered_report --image DIR... --registered DIR... [--pair FILE] \
        [--out benchmarks/results] [--note TEXT]...

DIR: the --out folders of `python -m benchmarks.accuracy.run --protocols 2 --datasets chaos --methods fewshotsam`
runs with --register off and on (either may be split into --scans runs over several folders). --pair: the JSON of
`python -m benchmarks.accuracy.registered_pair` (the liver-and-spleen model of CHAOS 2 on CHAOS 3). Writes
protocol2_registered.json and .md into --out and prints the markdown: Dice inside the reference extent per organ over
all 12 queries, the held-out and the development queries (settings were chosen on pairs whose query is CHAOS 1, 2,
3 or 5), every pair, the failing pairs, each registration, and whether the change meets issue 12's adoption rule.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .comparison import (
    DEVELOPMENT,
    HELD_OUT,
    Sides,
    closing_lines,
    compare,
    comparison_lines,
    report_parser,
    write_report,
)
from .registered_pair import markdown as pair_markdown
from .run import JSON_NAME

NAME = "protocol2_registered"
SIDES = Sides(("image", "registered"), "positions", ("image frame", "registered"), "image frame / registered")
# The pair the body frame lost: its liver must hold at least this with registration (image frame 0.814).
PAIR_LIVER_FLOOR = 0.80


def registrations(folders: list[Path]) -> dict[str, str]:
    """{query: what apply said about registering the support to it} from the registered runs' records."""
    said = {}
    for folder in folders:
        for record in json.loads((folder / JSON_NAME).read_text())["records"]:
            if record["protocol"] == 2 and "registration" in record:
                said[record["scan"]] = f"{record['support']} -> {record['scan']}: {record['registration']}"
    return said


def markdown(result: dict) -> str:
    lines = ["# Protocol 2 (CHAOS, one support scan, 3 slices per organ): positions registered to the support", "",
             "Dice inside the reference extent (`metrics.dice_inside_reference_extent`), FewShotSAM with apply's "
             "second pass, folds of `benchmarks.accuracy.run` protocol 2. Image frame: the pixel prompts' (x, y) and "
             "the footprints are the query cells' own positions in the model-input square. Registered: a small copy "
             "of the support scan kept in the model is registered to the query (SimpleITK similarity transform, "
             "Mattes mutual information, 3 resolutions; FewShotSAMLib/registration.py), each query cell is read at "
             "the position its anatomy has in the support, the footprints also weigh how far the cell lies from the "
             "support slices where its structure was painted, and each structure's pixel-prompt probability falls "
             "off beyond those slices. Choices were made on the pairs whose query is CHAOS "
             f"{', '.join(DEVELOPMENT)} (development); queries {', '.join(HELD_OUT)} are held out.", ""]
    lines += comparison_lines(result, SIDES)
    if result.get("pair"):
        pair = result["pair"]
        liver = pair["results"]["registered"]["organs"]["liver"]["whole_volume"]
        lines += ["", "## The pair the body frame lost", "", pair_markdown(pair), "",
                  f"Made by `{pair['command']}`. Liver (whole volume) with registration >= {PAIR_LIVER_FLOOR}: "
                  f"**{'yes' if liver >= PAIR_LIVER_FLOOR else 'no'}** ({liver:.3f})."]
    lines += ["", "## Registrations (support -> query)", ""] + [f"- {text}" for text in result["registrations"]]
    lines += closing_lines(result)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser("benchmarks.accuracy.registered_report", __doc__.splitlines()[0],
                           ("--image", "--out folder(s) of the protocol-2 run(s) with --register off"),
                           ("--registered", "--out folder(s) of the protocol-2 run(s) with --register on"))
    parser.add_argument("--pair", type=Path, default=None, help="JSON written by benchmarks.accuracy.registered_pair")
    args = parser.parse_args(argv)
    result = compare(args.before, args.after, SIDES, protocol=2)
    said = registrations(args.after)
    result["registrations"] = [said[q] for q in DEVELOPMENT + HELD_OUT if q in said]
    if args.pair:
        result["pair"] = json.loads(args.pair.read_text())
    print(write_report(result, markdown, "benchmarks.accuracy.registered_report", argv, args.note, args.out, NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
