#!/usr/bin/env bash
# Set up a virtual environment (once) and run the whole test suite: the engine (tests/) and the Slicer module's
# logic on slicer-core (Testing/). Real scans are read from ../shared/data (or $FEWSHOTSAM_DATA).
# Without arguments it then runs the web app's tests (Testing/web) in .venv-web, see below.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test,slicer,openvino]"
# slicer-core sets the C locale inside the test process once a Slicer-side test has imported it; Python's UTF-8 mode
# keeps text files and child processes' output decoded as UTF-8 after that (sources and outputs hold non-ASCII).
export PYTHONUTF8=1
status=0
python -m pytest -q --durations=15 --ignore=Testing/web "$@" || status=$?
if [ "$#" -gt 0 ]; then
  exit "$status"
fi

# The web app: trame-slicer is built for slicer-core 5.11 / vtk 9.6.0 while the suite above runs on the newest
# slicer-core, so its tests run in .venv-web, which layers trame-slicer and its slicer-core over .venv (torch and
# the rest are shared through a .pth file, not installed twice). The browser test drives Debian's chromium.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
"$(python -c 'import sys; print(sys._base_executable)')" -m venv .venv-web
main_site="$(python -c 'import site; print(site.getsitepackages()[0])')"
web_site="$(.venv-web/bin/python -c 'import site; print(site.getsitepackages()[0])')"
echo "$main_site" > "$web_site/zz_fewshotsam_main_venv.pth"
.venv-web/bin/python -m pip install --quiet "trame-slicer[standalone]>=2.0,<3" "playwright>=1.40"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv-web/bin/python -m pytest -q Testing/web || status=$?
exit "$status"
