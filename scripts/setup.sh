#!/usr/bin/env bash
# Creates .venv (if needed) and installs graftbuild with its test, remote and ray extras.
# torch==2.13.0 goes first: it is the CPU build, so nothing pulls a multi-GB CUDA build.
# constraints.txt holds the versions the committed locks were built with.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,test,remote,ray]'
