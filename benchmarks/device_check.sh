#!/usr/bin/env bash
# The CUDA path in one short run (under 5 minutes on one GPU), for a lent GPU machine.
#
#   bash benchmarks/device_check.sh --slice   # issue 21: a 7B-shaped slice (4 Llama-8B layers,
#       real dimensions, bf16) packed and fused on the CPU and with --device cuda: seconds per
#       node, peak GPU memory, CPU/GPU max relative difference of decoded deltas and fused
#       weights, exact vs randomized SVD per layer shape (benchmarks/device_slice.py). With
#       DEVICE_CHECK_DEVICE=cpu it rehearses on the CPU alone with SLICE_LAYERS (default 1) layers
#       and a SLICE_VOCAB (default 8192) vocabulary. Writes $OUT/device_slice.{md,json}.
#
# Without --slice (issue 17):
#   1. the quickstart built from scratch with --device cuda twice and on the CPU once, each into
#      its own cache: per node, are the two GPU builds byte-identical, and how far is the GPU
#      build from the CPU one (max relative difference per tensor, against GPU_TOLERANCE);
#   2. the fuse under --device cuda decodes its packs on the device (PackReader.decode's results).
# DEVICE_CHECK_DEVICE=cpu rehearses it here, without a GPU (every "GPU" build then runs on the CPU);
# DEVICE_CHECK_NO_INSTALL=1 installs nothing (a shared development venv: PYTHONPATH instead).
# Prints a table and writes it to $OUT (or ./device_check) as device_check.md and .json.
#
# On the device tool: the machine has torch with CUDA but neither pydantic, trl nor datasets,
# and no network. Prepare the wheels here once (Python 3.12, manylinux x86-64):
#   bash benchmarks/device_check.sh --wheels        # writes .device-wheels/ (git-ignored)
# then run there, carrying them:
#   run(command="bash benchmarks/device_check.sh", carry=[".device-wheels"], timeout_s=420)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
if [ "${1:-}" = "--wheels" ]; then
  rm -rf .device-wheels && mkdir .device-wheels
  # --no-deps: each missing package is named (with dependencies pip would pull torch and CUDA
  # wheels, 3 GB; the device's image has torch, transformers, accelerate, peft, pyarrow, fsspec)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d .device-wheels \
    pydantic pydantic-core typing-inspection annotated-types \
    trl==1.16.0 datasets dill multiprocess
  ls .device-wheels | wc -l
  exit 0
fi
RESULTS="${OUT:-$REPO/device_check}"
mkdir -p "$RESULTS"
PY="${PY:-python3}"
if [ "${DEVICE_CHECK_NO_INSTALL:-0}" = 1 ]; then  # a shared dev venv: install nothing
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  if [ -d .device-wheels ]; then
    "$PY" -m pip install --quiet --no-index --find-links .device-wheels --no-deps .device-wheels/*.whl
  fi
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export OMP_WAIT_POLICY=PASSIVE
if [ "${1:-}" = "--slice" ]; then
  if [ "${DEVICE_CHECK_DEVICE:-cuda}" = "cpu" ]; then
    exec "$PY" benchmarks/device_slice.py --out "$RESULTS" --devices cpu \
      --layers "${SLICE_LAYERS:-1}" --vocab "${SLICE_VOCAB:-8192}" --exact-svd small
  fi
  exec "$PY" benchmarks/device_slice.py --out "$RESULTS" --devices cpu,cuda \
    --layers "${SLICE_LAYERS:-4}" --vocab "${SLICE_VOCAB:-128256}" --exact-svd all
fi
"$PY" - "$RESULTS" <<'EOF'
import json, os, sys, tempfile, time
from pathlib import Path

from graftbuild.weights.determinism import pin_environment

pin_environment()
import torch  # noqa: E402

from graftbuild.build.engine import Engine  # noqa: E402
from graftbuild.cache.store import Store  # noqa: E402
from graftbuild.recipe import load_recipe  # noqa: E402
from graftbuild.steps.base import BuildSettings  # noqa: E402
from graftbuild.weights.compare import GPU_TOLERANCE, max_relative_difference  # noqa: E402

out = Path(sys.argv[1])
gpu = os.environ.get("DEVICE_CHECK_DEVICE", "cuda")  # "cpu" rehearses the script without a GPU
assert gpu == "cpu" or torch.cuda.is_available(), "no CUDA device"
recipe = load_recipe(Path("recipes/quickstart.toml"))
runs, tmp = {}, Path(tempfile.mkdtemp(prefix="device_check."))

# 2. the fuse decodes on the device: PackReader.decode's results are watched during each build
from graftbuild.skillpack.reader import PackReader  # noqa: E402

decoded: dict[str, set[str]] = {}
original = PackReader.decode


def watched(self, name, device=None, **kwargs):
    t = original(self, name, device, **kwargs)
    decoded.setdefault(current, set()).add(str(t.device))
    return t


PackReader.decode = watched
for name, device in (("cuda-1", gpu), ("cuda-2", gpu), ("cpu", "cpu")):
    current = name
    store = Store(tmp / name)
    engine = Engine(recipe, store, BuildSettings(device=device))
    engine.write_lock = False
    for nid in engine.graph.graph:
        engine.graph.node(nid).output = None
    start = time.perf_counter()
    result = engine.make()
    runs[name] = {
        "seconds": round(time.perf_counter() - start, 1),
        "nodes": {n.id: n.output_hash for n in result.nodes},
        "store": store,
    }
    print(f"{name}: {runs[name]['seconds']} s", flush=True)

rows = []
for nid, h1 in runs["cuda-1"]["nodes"].items():
    h2, hc = runs["cuda-2"]["nodes"][nid], runs["cpu"]["nodes"][nid]
    diff = 0.0
    if h1 != hc:
        diff = max_relative_difference(
            runs["cuda-1"]["store"].object_path(h1), runs["cpu"]["store"].object_path(hc)
        )
    rows.append({"node": nid, "gpu_twice_identical": h1 == h2, "gpu_equals_cpu": h1 == hc,
                 "max_rel_diff_gpu_cpu": diff, "within_tolerance": diff <= GPU_TOLERANCE})

report = {
    "gpu": torch.cuda.get_device_name(0) if gpu != "cpu" else "none (rehearsal on the CPU)", "torch": torch.__version__,
    "seconds": {k: v["seconds"] for k, v in runs.items()},
    "tolerance": GPU_TOLERANCE, "nodes": rows, "decoded_on": {k: sorted(v) for k, v in decoded.items()},
}
(out / "device_check.json").write_text(json.dumps(report, indent=2))
lines = [f"GPU: {report['gpu']}, torch {report['torch']}; seconds {report['seconds']}",
         f"packs decoded on: {report['decoded_on']}", "",
         "| node | GPU twice identical | GPU = CPU | max rel. diff GPU/CPU | within tolerance |",
         "|---|---|---|---|---|"]
lines += [f"| {r['node']} | {r['gpu_twice_identical']} | {r['gpu_equals_cpu']} | "
          f"{r['max_rel_diff_gpu_cpu']:.2e} | {r['within_tolerance']} |" for r in rows]
(out / "device_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
