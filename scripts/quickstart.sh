#!/usr/bin/env bash
# Installs graftbuild, then builds the quickstart recipe end to end (CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
graftbuild make recipes/quickstart.toml "$@"
