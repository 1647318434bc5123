"""Deterministic math: the settings under which a node's bytes do not depend on the machine.

Measured on the quickstart (docs/REPRODUCIBILITY.md): the bytes of trained models depend on
ATen's CPU kernels (AVX2 against AVX-512 reduce in another order) and on MKL's code path; the
bytes of packs depend, besides, on the number of threads LAPACK's SVD runs on. So every step
runs with

- ATen's kernels pinned to AVX2 (``ATEN_CPU_CAPABILITY``), which every x86-64 CPU of the last
  decade has; MKL (BLAS, LAPACK's SVD) pinned to its ``COMPATIBLE`` branch (``MKL_CBWR``,
  conditional numerical reproducibility), the one branch MKL honours on every vendor's CPU: it
  ignores ``AVX2`` and the other ISA branches on a non-Intel CPU and dispatches as it likes
  (``AUTO``), so an AVX2 pin gave other bytes on AMD than on Intel. oneDNN is capped at AVX2
  (``ONEDNN_MAX_CPU_ISA``). These are read when torch loads, so :func:`pin_environment` runs
  before anything imports torch (the console entry, the test suite's conftest, Ray workers'
  runtime environment), and :func:`mkl_branch` reads back the branch MKL actually took;
- one intra-op thread (:func:`deterministic_math`, around every step's ``run``): parallelism
  comes from ``-j`` across tensors, which never changes bytes. Work made only of elementwise
  ops (no reductions: each output entry computed alone by the same kernel, whatever range a
  thread gets) may run on more when asked (:func:`elementwise_threads`: the ``sum`` fuse of
  reference packs, ``GRAFTBUILD_ELEMENTWISE_THREADS``); tests/test_elementwise_threads.py
  checks that its bytes do not depend on the count;
- torch's deterministic algorithms on a GPU, where torch has them (``--device cuda`` is then
  compared within a tolerance, not by bytes: docs/REPRODUCIBILITY.md).

A value the user set in the environment wins over the pin, and the lock records what each node
actually ran with (:func:`environment`), measured where it ran.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

# importlib.metadata and platform are imported where they are used: the console entry imports
# this module on every call, and the no-op fast path has no 40 ms to spare for them.

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS (read when CUDA starts)
}
"""Environment variables that select numerical code paths; read once, when torch loads."""

STEP_THREADS = 1
"""Intra-op threads of every step's math (``-j`` parallelises across tensors instead)."""

ELEMENTWISE_THREADS: int | None = None
"""Intra-op threads of :func:`elementwise_threads`; None: ``GRAFTBUILD_ELEMENTWISE_THREADS``
where set, else 1. One by default: on a loaded 2-vCPU machine, the fuse's 1 MiB pieces on two
threads ran 2-9x slower than on one (each piece a parallel region whose second thread must be
woken and scheduled; docs/PERFORMANCE.md)."""

PACKAGES = ("graftbuild", "torch", "transformers", "safetensors", "numpy")
TRAINING = ("trl", "datasets", "accelerate", "peft")
"""Recorded too: the training stack of the sft and dpo steps (None where not installed)."""

_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def pin_environment(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set the pinned variables that are not set already. Returns False when torch was loaded
    before (the pins then come too late for this process; :func:`environment` says what ran)."""
    env = os.environ if environ is None else environ
    for key, value in PINNED_ENV.items():
        env.setdefault(key, value)
    return "torch" not in sys.modules


def pinned_env_vars() -> dict[str, str]:
    """The pinned variables as this process has them (for Ray workers' runtime environment)."""
    return {k: os.environ.get(k, v) for k, v in PINNED_ENV.items()}


def load_math() -> None:
    """Load torch (once per process; the pins must be set before: :func:`pin_environment`)."""
    import torch  # noqa: F401


@contextlib.contextmanager
def deterministic_math(device: str = "cpu") -> Iterator[None]:
    """One intra-op thread (and deterministic GPU algorithms) while a step runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(STEP_THREADS)
    gpu = device.startswith("cuda")
    if gpu:
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if gpu:
            torch.use_deterministic_algorithms(deterministic)


def elementwise_thread_count() -> int:
    """The intra-op threads :func:`elementwise_threads` gives (``ELEMENTWISE_THREADS``, else
    ``GRAFTBUILD_ELEMENTWISE_THREADS``, else 1)."""
    if ELEMENTWISE_THREADS is not None:
        return max(1, ELEMENTWISE_THREADS)
    with contextlib.suppress(ValueError):
        return max(1, int(os.environ.get("GRAFTBUILD_ELEMENTWISE_THREADS", "")))
    return 1


@contextlib.contextmanager
def elementwise_threads() -> Iterator[int]:
    """Lift :func:`deterministic_math`'s one intra-op thread while the caller runs only
    elementwise ops (subtractions, weighted adds, dtype conversions, copies) and reductions whose
    outcome is order-free (a finiteness check). ATen splits an elementwise op's range between
    threads and every entry is computed by the same kernel (the vectorised loop's scalar tail
    included: tests/test_elementwise_threads.py), so the bytes are those of one thread. Threads
    started inside (``-j`` workers) take the count when they start. Never around matrix
    products, SVDs or reductions that feed values: those change bytes with the thread count."""
    import torch

    before = torch.get_num_threads()
    threads = elementwise_thread_count()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


MKL_BRANCHES = {
    1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
    9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1",
}
"""MKL's code-branch numbers (``mkl_cbwr.h``) and their ``MKL_CBWR`` names."""


def mkl_branch() -> str | None:
    """The code branch MKL runs in this process (``MKL_CBWR``'s name for it), which is not
    always the one asked for: on a non-Intel CPU an ISA branch falls back to ``AUTO``. None
    where torch is not loaded or its MKL cannot say (no MKL, or the query symbol missing).

    torch links MKL statically and exports only MKL's internal ``mkl_serv_cbwr_get``, which
    takes the public ``mkl_cbwr_get``'s argument (1: the branch)."""
    torch = sys.modules.get("torch")
    return None if torch is None else _mkl_branch(os.path.dirname(torch.__file__))


@functools.cache
def _mkl_branch(torch_dir: str) -> str | None:
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return None
    lib = os.path.join(torch_dir, "lib", "libtorch_cpu.so")
    try:
        query = ctypes.CDLL(lib).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    query.restype, query.argtypes = ctypes.c_int, [ctypes.c_int]
    branch = query(1)
    return MKL_BRANCHES.get(branch, str(branch))


@functools.cache
def _versions() -> tuple[tuple[str, str | None], ...]:
    """Installed versions of the recorded packages (read once per process: ~20 ms a call)."""
    from importlib import metadata

    found = []
    for pkg in (*PACKAGES, *TRAINING):
        try:
            found.append((pkg, metadata.version(pkg)))
        except metadata.PackageNotFoundError:
            found.append((pkg, None))
    return tuple(found)


@functools.cache
def _cpu_flags() -> tuple[str, ...]:
    return tuple(cpu_flags())


def cpu_flags() -> list[str]:
    """The instruction-set extensions of this CPU that change which kernels can run."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in _CPU_FLAGS if flag in have]
    except OSError:
        pass
    return []


def environment(device: str, load_torch: bool = False) -> dict[str, Any]:
    """What may change a step's bytes without changing its key, as this process has it: package
    versions, the numerical settings in effect, the CPU's instruction set, the device. Imports
    torch only with ``load_torch`` (a no-op build writes its lock without it): the kernels and
    MKL branch in use are read from torch only when it is loaded."""
    import platform

    if load_torch:
        load_math()

    env: dict[str, Any] = dict(_versions())
    torch = sys.modules.get("torch")
    capability = None
    if torch is not None:
        with contextlib.suppress(Exception):
            capability = torch.backends.cpu.get_cpu_capability()
    env |= {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "device": device,
        "threads": STEP_THREADS,
        "cpu_capability": capability or os.environ.get("ATEN_CPU_CAPABILITY", "").upper() or None,
        "cpu_flags": list(_cpu_flags()),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "mkl_branch": mkl_branch() if torch is not None else None,
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }
    return env
