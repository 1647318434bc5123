#!/bin/sh
# The quickstart built from scratch by two checkouts of graftbuild side by side (e.g. the commit
# before a change, then this one): the same interpreter, each checkout's own recipes/ copied to
# $ROOT, each build into an empty cache of its own, in interleaved rounds (A B, then B A, ...), a
# `sync` after every build. Wall seconds, CPU seconds (user + sys) and peak RSS come from
# /usr/bin/time; medians, min-max and the ratios B/A are printed and written to
# results/ab_quickstart.json. On a machine shared with other work, wall time follows the load
# (recorded per build); CPU seconds measure the work itself.
#
#   sh benchmarks/ab_quickstart.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS]
#   e.g.  git worktree add /work/wt-prev 84ab8a4
#         sh benchmarks/ab_quickstart.sh /work/wt-prev . 3
#
# Environment: ROOT (default /tmp/graftbuild-abq, must not exist), PY (the project's venv
# python), RESULTS.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 OLD_CHECKOUT NEW_CHECKOUT [ROUNDS]" >&2; exit 2; }
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd); ROUNDS=${3:-3}
cd "$(dirname "$0")"; BENCH=$(pwd)
PY=${PY:-$(cd .. && pwd)/.venv/bin/python}
ROOT=${ROOT:-/tmp/graftbuild-abq}; RAW=$ROOT/raw.tsv
RESULTS=${RESULTS:-$BENCH/results/ab_quickstart.json}
export OMP_WAIT_POLICY=PASSIVE
[ ! -e "$ROOT" ] || { echo "$ROOT exists: remove it or set ROOT" >&2; exit 2; }
mkdir -p "$ROOT"
trap 'rm -rf "$ROOT"' EXIT
trap 'exit 130' INT TERM
: > "$RAW"
for side in A B; do
  eval code=\$$side
  got=$(cd / && PYTHONPATH=$code $PY -c 'import graftbuild; print(graftbuild.__file__)')
  [ "$got" = "$code/graftbuild/__init__.py" ] || {
    echo "$side: PYTHONPATH=$code imports $got" >&2; exit 1; }
  mkdir -p "$ROOT/$side"
  cp -r "$code/recipes" "$ROOT/$side/recipes"
  rm -rf "$ROOT/$side/out"
  echo "$side = $code ($(git -C "$code" rev-parse --short HEAD 2>/dev/null || echo '?'))"
done

r=0
while [ "$r" -lt "$ROUNDS" ]; do
  r=$((r + 1))
  if [ $((r % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for side in $order; do
    eval code=\$$side
    rm -rf "$ROOT/$side/cache" "$ROOT/$side/out"
    sync
    read -r load _ < /proc/loadavg
    (cd "$ROOT/$side" && PYTHONPATH=$code /usr/bin/time -f "%e %M %U %S" -o "$ROOT/time" \
      "$PY" -m graftbuild make recipes/quickstart.toml --cache cache -q > "$ROOT/log" 2>&1) \
      || { cat "$ROOT/log" >&2; exit 1; }
    sync
    read -r wall rss user sys < "$ROOT/time"
    cpu=$(echo "$user $sys" | awk '{print $1 + $2}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$side" "$r" "$wall" "$rss" "$load" "$cpu" >> "$RAW"
    printf '  round %s %s  %7.1f s wall  %7.1f s cpu  %7d KB  (load %s)\n' "$r" "$side" \
      "$wall" "$cpu" "$rss" "$load"
  done
done

"$PY" - "$RAW" "$RESULTS" "$A" "$B" <<'EOF'
import json, statistics, subprocess, sys
raw, results, a, b = sys.argv[1:]
rows = [line.split("\t") for line in open(raw).read().splitlines()]
def rev(path):
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "?"
out = {"A": rev(a), "B": rev(b)}
def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
for side in "AB":
    mine = [r for r in rows if r[0] == side]
    out[side + "_wall_s"] = spread([float(r[2]) for r in mine])
    out[side + "_cpu_s"] = spread([float(r[5]) for r in mine])
    out[side + "_rss_kb"] = statistics.median(int(r[3]) for r in mine)
for col, name in ((2, "wall"), (5, "cpu")):
    pairs = {}
    for r in rows:
        pairs.setdefault(r[1], {})[r[0]] = float(r[col])
    out[f"{name}_ratio_B_over_A"] = spread(
        [p["B"] / p["A"] for p in pairs.values() if {"A", "B"} <= set(p)])
out["rounds"] = [dict(zip(("side", "round", "wall_s", "rss_kb", "load", "cpu_s"), r))
                 for r in rows]
open(results, "w").write(json.dumps(out, indent=2) + "\n")
for name in ("wall", "cpu"):
    ra = out[f"{name}_ratio_B_over_A"]
    print(f"{name}: A {out['A']} median {out['A_' + name + '_s']['median']:.1f} s, "
          f"B {out['B']} median {out['B_' + name + '_s']['median']:.1f} s, "
          f"B/A median {ra['median']:.2f} [{ra['min']:.2f}-{ra['max']:.2f}]")
EOF
