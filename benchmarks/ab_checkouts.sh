#!/bin/sh
# Two checkouts of graftbuild side by side (e.g. the commit before a change, then this one), the
# same interpreter, the same generated models: the cold pipeline from the raw models, the fuse step
# alone and the no-op make/plan, in interleaved rounds (the sides alternate: A B, then B A, ...),
# a `sync` after every command. Wall seconds and peak RSS come from /usr/bin/time; medians,
# min-max and ratios B/A are printed and written to results/ab_<size>.json. Big files live under
# $ROOT (in /tmp) and are deleted at the end.
#
#   sh benchmarks/ab_checkouts.sh OLD_CHECKOUT NEW_CHECKOUT [0.7gb|3gb] [ROUNDS]
#   e.g.  git worktree add /work/wt-prev 84ab8a4
#         sh benchmarks/ab_checkouts.sh /work/wt-prev . 3gb 3
#
# Each checkout runs as `PYTHONPATH=<checkout> $PY -m graftbuild` (PY: the project's venv; the
# checkout's own modules are found first, checked) in its own project folder and cache under
# $ROOT (pack and fuse keys may differ between versions, so caches are never shared). Per round:
#   cold        `make -j 2` into an empty cache (hash the inputs, pack x, pack y, fuse: exact
#               codec, bench_fuse.py's lossless recipe), the raw models read warm
#   fuse        the fuse step alone: packs cached, a new shard_size changes only the fuse's key
#               (the same bytes), packs and base read warm; checked: exactly one node built
#   noop_make   `make -j 2` with everything fresh (the fast path; checked)
#   noop_plan   `plan` with everything fresh (the fast path; checked)
#   full_make   `--debug make -j 2`: not a fast-path option, so the whole planner and the engine
#   full_plan   `--debug plan`: the whole planner and the engine's dry run
# A no-op figure is one /usr/bin/time over NOOP_BATCH calls in a row (%e has 10 ms steps),
# divided by NOOP_BATCH; NOOP_REPS of those per round. Before every cold and fuse run the page
# cache is dropped (as root) and the machine left SETTLE seconds (see settle below).
# Environment: ROOT (default /tmp/graftbuild-ab, must not exist), PY, KINDS (which of
# "cold fuse noop" to run; all), ORDER (abba; ab: A always first), JOBS (2), NOOP_BATCH (10),
# NOOP_REPS (3), SETTLE (20), DROP_CACHES (1 where allowed), PROFILE (the packs' compression
# profile: exact; e.g. default for the lossy SVD codecs), RESULTS.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 OLD_CHECKOUT NEW_CHECKOUT [SIZE] [ROUNDS]" >&2; exit 2; }
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd); SIZE=${3:-0.7gb}; ROUNDS=${4:-3}
KINDS=${KINDS:-cold fuse noop}; ORDER=${ORDER:-abba}; JOBS=${JOBS:-2}
NOOP_BATCH=${NOOP_BATCH:-10}; NOOP_REPS=${NOOP_REPS:-3}; SETTLE=${SETTLE:-20}
cd "$(dirname "$0")"; BENCH=$(pwd); HERE=$(cd .. && pwd)
PY=${PY:-/work/main/.venv/bin/python}
ROOT=${ROOT:-/tmp/graftbuild-ab}; M=$ROOT/models; RAW=$ROOT/raw.tsv
PROFILE=${PROFILE:-exact}
if [ "$PROFILE" = exact ]; then RESULTS=${RESULTS:-$BENCH/results/ab_$SIZE.json}
else RESULTS=${RESULTS:-$BENCH/results/ab_${SIZE}_$PROFILE.json}; fi
export OMP_WAIT_POLICY=PASSIVE
[ ! -e "$ROOT" ] || { echo "$ROOT exists: remove it or set ROOT" >&2; exit 2; }
mkdir -p "$ROOT"
trap 'rm -rf "$ROOT"' EXIT
trap 'exit 130' INT TERM

for side in A B; do
  eval code=\$$side
  got=$(cd / && PYTHONPATH=$code $PY -c 'import graftbuild; print(graftbuild.__file__)')
  [ "$got" = "$code/graftbuild/__init__.py" ] || {
    echo "$side: PYTHONPATH=$code imports $got" >&2; exit 1; }
  echo "$side = $code ($(git -C "$code" rev-parse --short HEAD 2>/dev/null || echo '?'))"
done

PYTHONPATH=$HERE $PY make_models.py "$M" --size "$SIZE" > /dev/null
PYTHONPATH=$HERE $PY -c "
from pathlib import Path
from bench_fuse import write_recipe
write_recipe(Path('$ROOT/recipe'), Path('$M'), '$PROFILE')"
: > "$RAW"

# measure KIND SIDE ROUND CALLS EXPECT ARGS...: time CALLS runs of `graftbuild ARGS` in the
# side's project folder, then sync; the output must match the grep pattern EXPECT ("!PAT": must
# not match; "": anything).
measure() {
  kind=$1 side=$2 round=$3 calls=$4 expect=$5; shift 5
  eval code=\$$side
  cd "$ROOT/$side"
  read -r load _ < /proc/loadavg
  PYTHONPATH=$code /usr/bin/time -f "%e %M" -o "$ROOT/time" sh -c '
    n=$1; shift; i=0
    while [ $i -lt $n ]; do "$@" || exit; i=$((i + 1)); done' sh "$calls" \
    "$PY" -m graftbuild "$@" > "$ROOT/log" 2>&1 || { cat "$ROOT/log" >&2; exit 1; }
  sync
  case $expect in
    "") ok=1 ;;
    !*) if grep -q -- "${expect#!}" "$ROOT/log"; then ok=0; else ok=1; fi ;;
    *) if grep -q -- "$expect" "$ROOT/log"; then ok=1; else ok=0; fi ;;
  esac
  [ $ok = 1 ] || { cat "$ROOT/log" >&2; echo "$kind/$side: output does not match '$expect'" >&2; exit 1; }
  read -r wall rss < "$ROOT/time"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$side" "$round" "$wall" "$rss" "$calls" "$load" \
    >> "$RAW"
  printf '  round %s %-9s %s  %6.2f s  %7d KB  (%s calls, load %s)\n' "$round" "$kind" "$side" \
    "$wall" "$rss" "$calls" "$load"
  cd "$BENCH"
}
# This machine (a VM) hands memory that has been free for some seconds back to its host; touching
# such pages again costs a host page fault each (2 GiB of fresh anonymous memory: ~2.5 s right
# after 2 GiB were freed, 5.5-7.4 s after 25 s idle), while pages taken back from the page cache
# cost nothing. So a command's time depended on what ran before it: after the other side's
# cold cache was just deleted (0.7gb: the second side's cold pipeline 0.60x the first's in an A/A
# run of one checkout against itself), or after the other side had filled the page cache (3gb:
# the second side 1.3-2.4x slower). Before every writing command: sync, drop the page cache
# (DROP_CACHES=1, the default where /proc/sys/vm/drop_caches is writable, i.e. as root), wait
# SETTLE seconds, then read its inputs warm: every such command starts from the same memory state.
# The sides also swap order every round (A B, B A, ...; ORDER=ab keeps A first).
if [ -w /proc/sys/vm/drop_caches ]; then DROP_CACHES=${DROP_CACHES:-1}; else DROP_CACHES=0; fi
settle() {
  sync
  [ "$DROP_CACHES" = 1 ] && echo 3 > /proc/sys/vm/drop_caches
  sleep "$SETTLE"
}
sides() { if [ "$ORDER" = ab ] || [ $((r % 2)) = 1 ]; then echo A B; else echo B A; fi; }
warm_models() { cat "$M"/base/*.safetensors "$M"/x/*.safetensors "$M"/y/*.safetensors > /dev/null; }
warm_packs() {
  find "$ROOT/$1/cache/objects" -name 'skillpack.safetensors' -exec cat {} + > /dev/null
  cat "$M"/base/*.safetensors > /dev/null
}
n=0
set_shard() {  # a new shard size: only the fuse's key changes
  n=$((n + 1))
  sed "s/^shard_size = .*/shard_size = $((1099511627776 + n))/" "$ROOT/$1/graftbuild.toml" \
    > "$ROOT/$1/graftbuild.toml.new"
  mv "$ROOT/$1/graftbuild.toml.new" "$ROOT/$1/graftbuild.toml"
}

for side in A B; do  # each side's packs and fused model in its own cache, for fuse and no-op
  mkdir -p "$ROOT/$side"; cp "$ROOT/recipe/graftbuild.toml" "$ROOT/$side/"
  settle; warm_models; sync
  measure setup $side 0 1 "built 6," make graftbuild.toml -j "$JOBS"
done

want() { case " $KINDS " in *" $1 "*) return 0 ;; esac; return 1; }
r=0
while [ $r -lt "$ROUNDS" ]; do
  r=$((r + 1))
  want cold && for side in $(sides); do
    rm -rf "$ROOT/$side/out"; settle; warm_models; sync
    measure cold $side $r 1 "built 6," make graftbuild.toml --cache cold-cache -j "$JOBS"
    rm -rf "$ROOT/$side/cold-cache" "$ROOT/$side/out"  # out/ linked to cold-cache's objects
  done
  want fuse && for side in $(sides); do
    set_shard $side; rm -rf "$ROOT/$side/out"; settle; warm_packs $side; sync
    measure fuse $side $r 1 "built 1," make graftbuild.toml -j "$JOBS"
  done
  k=0
  want noop || k=$NOOP_REPS
  while [ $k -lt "$NOOP_REPS" ]; do
    k=$((k + 1))
    for side in $(sides); do
      measure noop_make $side $r "$NOOP_BATCH" "nothing changed" make graftbuild.toml -j "$JOBS"
    done
    for side in $(sides); do
      measure noop_plan $side $r "$NOOP_BATCH" "!why" plan graftbuild.toml
    done
    for side in $(sides); do
      measure full_make $side $r "$NOOP_BATCH" "built 0, reused 6$" --debug make graftbuild.toml -j "$JOBS"
    done
    for side in $(sides); do
      measure full_plan $side $r "$NOOP_BATCH" "why" --debug plan graftbuild.toml
    done
  done
done

mkdir -p "$(dirname "$RESULTS")"
A_REV=$(git -C "$A" rev-parse HEAD 2>/dev/null || echo '?')
B_REV=$(git -C "$B" rev-parse HEAD 2>/dev/null || echo '?')
LOAD=$(cat /proc/loadavg)
$PY - "$RAW" "$RESULTS" "$A" "$A_REV" "$B" "$B_REV" "$SIZE" "$ROUNDS" "$JOBS" "$LOAD" \
  "$M" "$SETTLE" "$NOOP_BATCH" "$ORDER" "$DROP_CACHES" "$PROFILE" <<'EOF'
import json, statistics, sys
from pathlib import Path
(raw, out, a, a_rev, b, b_rev, size, rounds, jobs, load, models, settle, batch, order, drop,
 profile) = sys.argv[1:]
model_bytes = sum(f.stat().st_size for f in Path(models, "base").glob("*.safetensors"))
runs = {}
for line in open(raw):
    kind, side, rnd, wall, rss, calls, load1 = line.split("\t")
    runs.setdefault(kind, {"A": [], "B": []})[side].append(
        {"round": int(rnd), "wall_s": round(float(wall) / int(calls), 4),
         "peak_rss_mb": round(int(rss) / 1024, 1), "calls": int(calls),
         "loadavg_1min_before": float(load1)})

def stats(xs):
    return {"median": round(statistics.median(xs), 4), "min": min(xs), "max": max(xs)}

summary = {}
for kind, sides in runs.items():
    if kind == "setup":
        continue
    row = {}
    for metric in ("wall_s", "peak_rss_mb"):
        sa = stats([r[metric] for r in sides["A"]])
        sb = stats([r[metric] for r in sides["B"]])
        ratio = round(sb["median"] / sa["median"], 3) if sa["median"] else None
        # B slower (or bigger) than A beyond the spread: B's best is worse than A's worst
        worse, better = ("slower", "faster") if metric == "wall_s" else ("bigger", "smaller")
        beyond = worse if sb["min"] > sa["max"] else better if sb["max"] < sa["min"] else ""
        row[metric] = {"A": sa, "B": sb, "ratio_B_over_A": ratio, "beyond_spread": beyond}
    summary[kind] = row
res = {
    "size": size, "profile": profile, "model_bytes": int(model_bytes), "rounds": int(rounds), "jobs": int(jobs),
    "settle_s": float(settle), "noop_calls_per_figure": int(batch), "order": order,
    "drop_caches": drop == "1",
    "A": {"path": a, "commit": a_rev}, "B": {"path": b, "commit": b_rev},
    "loadavg_at_end": load, "summary": summary, "runs": runs,
}
with open(out, "w") as f:
    f.write(json.dumps(res, indent=1) + "\n")
print(f"\nA = {a} ({a_rev[:7]}), B = {b} ({b_rev[:7]}), {size}, {profile} packs, {rounds} rounds, "
      f"-j {jobs}")
print("medians [min-max]; no-op rows are per call; beyond = B's whole range outside A's")
print(f"{'benchmark':<10} {'metric':<8} {'A':>24} {'B':>24} {'B/A':>7}  beyond")
for kind, row in summary.items():
    for metric, name in (("wall_s", "wall s"), ("peak_rss_mb", "RSS MB")):
        m = row[metric]
        f = (lambda s: f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]") if metric == "wall_s" \
            else (lambda s: f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}]")
        print(f"{kind:<10} {name:<8} {f(m['A']):>24} {f(m['B']):>24} "
              f"{m['ratio_B_over_A']:>6.3f}x  {m['beyond_spread']}")
print(f"results: {out}")
EOF
