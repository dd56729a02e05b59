#!/usr/bin/env bash
# Set up a virtual environment (once) and run the whole test suite: the engine (tests/) and the Slicer module's
# logic on slicer-core (Testing/). Real scans are read from ../shared/data (or $FEWSHOTSAM_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test,slicer]"
python -m pytest -q "$@"
