"""The embedded executor: runs steps in this process, one node at a time."""

from __future__ import annotations

from graftbuild.errors import GraftbuildError
from graftbuild.steps.base import StepContext


class LocalExecutor:
    name = "local"

    def run(self, step_name: str, ctx: StepContext) -> None:
        from graftbuild.errors import BuildError, describe_os_error
        from graftbuild.steps import STEPS

        try:
            STEPS[step_name].run(ctx)
        except GraftbuildError:
            raise
        except MemoryError:
            raise BuildError(f"{ctx.node_id}: out of memory") from None
        except OSError as e:
            raise BuildError(f"{ctx.node_id}: {describe_os_error(e)}") from e
        except Exception as e:
            raise BuildError(
                f"{ctx.node_id}: step '{step_name}' failed: {type(e).__name__}: {e}"
            ) from e
