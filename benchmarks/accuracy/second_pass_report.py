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

import sys

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

TITLES = {2: "Protocol 2 (CHAOS, one support scan, 3 slices per organ)",
          3: "Protocol 3 (CHAOS, every labelled slice of the training scans of a fold)"}
SIDES = Sides(("without", "with"), "second pass", ("without second pass", "with second pass"),
              "without / with the second pass")


def markdown(result: dict) -> str:
    lines = [f"# {TITLES[result['protocol']]}: apply's second pass", "",
             "Dice inside the reference extent (`metrics.dice_inside_reference_extent`), FewShotSAM, folds of "
             f"`benchmarks.accuracy.run` protocol {result['protocol']}. Second pass: after the first prediction, the "
             "adapter is tuned on from its own weights on the query's most confident slices "
             "(FewShotSAMLib/second_pass.py) and the query is predicted again. Its settings were chosen on the pairs "
             f"whose query is CHAOS {', '.join(DEVELOPMENT)} (development); queries {', '.join(HELD_OUT)} are held "
             "out.", ""]
    return "\n".join(lines + comparison_lines(result, SIDES) + closing_lines(result))


def main(argv: list[str] | None = None) -> int:
    parser = report_parser("benchmarks.accuracy.second_pass_report", __doc__.splitlines()[0],
                           ("--without", "--out folder(s) of the --no-second-pass run"),
                           ("--with", "--out folder(s) of the default run"))
    parser.add_argument("--protocol", type=int, choices=sorted(TITLES), default=2)
    args = parser.parse_args(argv)
    result = compare(args.before, args.after, SIDES, args.protocol)
    print(write_report(result, markdown, "benchmarks.accuracy.second_pass_report", argv, args.note, args.out,
                       f"protocol{args.protocol}_second_pass"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
