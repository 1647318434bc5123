"""Device placement: the one owner of where a build's tensors and models live (``--device``).

Steps get a :class:`Placement` from their context (``ctx.placement``, made from the build
settings) and ask it, never a device string, to move tensors and models: ``put`` onto the
device, ``host`` back to the CPU (what is written to disk), ``empty_like`` for output buffers,
``model`` for a loaded model. Readers take it too: ``PackReader.decode(name, placement)`` moves
a tensor's stored parts onto the device and decodes there. Codecs and fusion strategies compute
wherever their input tensors already are.

On the CPU every call is the identity or the CPU path it replaces (copy-on-write maps and
huge-page buffers stay as they are), so CPU bytes do not depend on going through a placement.
torch is imported lazily: planning never loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CPU = "cpu"


class Placement:
    def __init__(self, device: str = CPU) -> None:
        self.device = device

    def __repr__(self) -> str:
        return f"Placement({self.device!r})"

    @classmethod
    def of(cls, where: Placement | str | None) -> Placement:
        """``where`` as a placement (None: the CPU)."""
        if isinstance(where, Placement):
            return where
        return cls(where or CPU)

    @property
    def on_accelerator(self) -> bool:
        return self.device != CPU

    def put(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` on the device (and in ``dtype``); ``t`` itself when it is there already."""
        return t.to(device=self.device, dtype=dtype)

    def host(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` on the CPU (and in ``dtype``): what steps write to disk."""
        return t.to(device=CPU, dtype=dtype)

    def empty_like(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised buffer shaped like ``t`` on the device (on the CPU: memory that is
        cheap to fill, ``weights.memory.empty_like``)."""
        from graftbuild.weights.memory import empty_like

        return empty_like(t, dtype=dtype, device=self.device)

    def model(self, model: Any) -> Any:
        """A loaded model moved onto the device."""
        return model.to(self.device)

    def inputs(self, batch: Any) -> Any:
        """A tokenizer's batch (or one tensor) on the device."""
        return batch.to(self.device)

    def warm_up(self) -> None:
        """Initialise the device's linear-algebra libraries in the calling thread.

        On CUDA, torch loads cuSOLVER/MAGMA lazily at the first ``torch.linalg`` call, and two
        worker threads making that first call at once fail ("lazy wrapper should be called at
        most once", seen on an H200 with ``-j2``). Steps that decompose on ``-j`` threads call
        this once before starting them. Nothing to do on the CPU.
        """
        if not self.device.startswith("cuda"):
            return
        import torch

        a = torch.eye(4, device=self.device, dtype=torch.float32) * 2
        torch.linalg.qr(a)
        torch.linalg.svd(a, full_matrices=False)
        torch.linalg.eigh(a)
        torch.linalg.cholesky(a)
        self.synchronize()

    def peak_memory(self) -> int | None:
        """Peak bytes allocated on the accelerator since the process started (None on the CPU)."""
        if not self.device.startswith("cuda"):
            return None
        import torch

        return int(torch.cuda.max_memory_allocated(torch.device(self.device)))

    def synchronize(self) -> None:
        """Wait for the device's queued work (timings of asynchronous kernels)."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(torch.device(self.device))


def resolve_device(device: str, warn: Callable[[str], None]) -> str:
    """The device a build asks for, or the CPU, saying so, when it asks for CUDA without one."""
    if device == CPU:
        return device
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        warn(
            "[yellow]warning:[/] --device cuda requested but no CUDA device is available; "
            "using the CPU"
        )
        return CPU
    return device
