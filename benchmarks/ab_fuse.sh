#!/bin/sh
# The fuse alone, this checkout against another (e.g. main before a change), on the same cache:
# the same packs, read warm, after a sync, alternating. Models under $ROOT, deleted afterwards.
#   sh benchmarks/ab_fuse.sh /path/to/other/checkout [0.7gb|3gb]
set -eu
OTHER=$(cd "$1" && pwd); SIZE=${2:-3gb}
cd "$(dirname "$0")"; HERE=$(cd .. && pwd)
ROOT=${ROOT:-/tmp/issue5-ab}; M=$ROOT/models; W=$ROOT/work
PY=${PY:-/work/main/.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE
trap 'rm -rf "$ROOT"' EXIT
PYTHONPATH=$HERE $PY make_models.py "$M" --size "$SIZE" > /dev/null
PYTHONPATH=$HERE $PY -c "
from pathlib import Path
from bench_fuse import write_recipe
write_recipe(Path('$W'), Path('$M'), 'exact')"
cd "$W"
PYTHONPATH=$HERE /usr/bin/time -f "packs %e s" $PY -m graftbuild make graftbuild.toml -j 2 >/dev/null
i=1
for round in 1 2; do
  for code in "$OTHER" "$HERE"; do
    i=$((i + 1))
    sed -i "s/^shard_size = .*/shard_size = $((1099511627776 + i))/" graftbuild.toml  # fuse only
    rm -rf out
    find cache/objects -name '*.safetensors' -exec cat {} + > /dev/null
    cat "$M"/base/*.safetensors > /dev/null
    sync
    PYTHONPATH=$code /usr/bin/time -f "fuse alone, $code: %e s, %M KB" \
      $PY -m graftbuild make graftbuild.toml -j 2 > /dev/null
  done
done
