"""Executors run a stale node's step; the scheduler decides which nodes and in what order."""

from graftbuild.executors.local import LocalExecutor
from graftbuild.executors.ray_executor import RayExecutor

EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}
