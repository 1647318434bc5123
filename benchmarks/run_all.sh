#!/bin/sh
# The "Speed and memory" benchmarks of docs/BENCHMARKS.md, one at a time, big files under $ROOT
# (deleted after each). graftbuild runs with the project's venv; dvc and mergekit come from
# $BENCH_VENV (see docs/BENCHMARKS.md for how it was set up).
#   sh benchmarks/run_all.sh [fuse07|noop|fuse3|rounds07|rounds3] ...
set -eu
cd "$(dirname "$0")"
ROOT=${ROOT:-/tmp/issue5-bench}
PY=${PY:-/work/main/.venv/bin/python}
export PYTHONPATH="$(cd .. && pwd)" OMP_WAIT_POLICY=PASSIVE
mkdir -p results "$ROOT"
trap 'rm -rf "$ROOT"' EXIT  # the big generated files never outlive a run
[ $# -gt 0 ] || set -- fuse07 noop fuse3 rounds07 rounds3
for what in "$@"; do
  case $what in
    fuse07)
      $PY make_models.py "$ROOT/m07" --size 0.7gb
      $PY bench_fuse.py "$ROOT/m07" --work "$ROOT/f07" --results results/fuse_0.7gb.json --clean
      rm -rf "$ROOT/m07" ;;
    noop)
      $PY make_models.py "$ROOT/noop/models" --size 2gb
      $PY bench_noop.py "$ROOT/noop" --reps 7 --results results/noop_2gb.json --clean ;;
    fuse3)
      $PY make_models.py "$ROOT/m3" --size 3gb
      $PY bench_fuse.py "$ROOT/m3" --work "$ROOT/f3" --results results/fuse_3gb.json --clean \
        --skip-compressed
      rm -rf "$ROOT/m3" ;;
    rounds07|rounds3)
      size=0.7gb; [ "$what" = rounds3 ] && size=3gb
      $PY make_models.py "$ROOT/r-models" --size $size
      $PY bench_fuse_rounds.py "$ROOT/r-models" --work "$ROOT/r-work" --rounds 3 \
        --results results/fuse_rounds_$size.json --clean
      rm -rf "$ROOT/r-models" ;;
    *) echo "unknown benchmark $what" >&2; exit 2 ;;
  esac
done
