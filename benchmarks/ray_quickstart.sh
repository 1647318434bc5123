#!/usr/bin/env bash
# The quickstart built twice side by side from scratch, in separate folders: the local executor
# vs the Ray executor (a local 2-CPU cluster in a loopback-only network namespace; needs root
# for `unshare --net`), both with -j 1. Prints wall times and whether the outputs are
# byte-identical.    bash benchmarks/ray_quickstart.sh [WORKDIR]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
export PYTHONPATH="$REPO" OMP_WAIT_POLICY=PASSIVE
for d in local ray; do
  mkdir -p "$WORK/$d/recipes"
  cp -r "$REPO/recipes/quickstart" "$REPO/recipes/quickstart.toml" "$WORK/$d/recipes/"
done
cd "$WORK/local/recipes"
/usr/bin/time -f "local executor: %e s" graftbuild make quickstart.toml -j 1 --json | tail -1
cd "$WORK/ray/recipes"
unshare --net sh -c "ip link set lo up && /usr/bin/time -f 'ray executor: %e s' \
  graftbuild make quickstart.toml -j 1 --json --executor ray | tail -1"
for d in local ray; do
  (cd "$WORK/$d/out" && find . -type f ! -name .graftbuild.json | sort | xargs sha256sum) \
    > "$WORK/$d.sha256"
done
if diff -q "$WORK/local.sha256" "$WORK/ray.sha256" >/dev/null; then
  echo "outputs byte-identical ($(wc -l < "$WORK/local.sha256") files)"
else
  echo "outputs differ"; diff "$WORK/local.sha256" "$WORK/ray.sha256"; exit 1
fi
