#!/usr/bin/env bash
# Installs graftbuild with its test extras, then runs the linters and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
lint-imports
python -m pytest "$@"
