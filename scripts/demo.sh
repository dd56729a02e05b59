#!/usr/bin/env bash
# Set up a virtual environment (once) and run the demo on the bundled sample scan with the bundled LiteMedSAM weights.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e .
fewshotsam demo "$@"
