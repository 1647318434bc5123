"""Calibration statistics for GPTQ and budgets: the second moment of every linear layer's input.

The base model runs once over the calibration text (``samples`` chunks of ``seq_len`` tokens,
the first ones of the file, so the result is a function of the file and the settings); forward
pre-hooks on the ``nn.Linear`` modules accumulate ``H = Σ x xᵀ / N`` over all N token positions.
Modules fed the same tensor (q/k/v, gate/up) share one matrix. Memory: one n × n float32 matrix
per distinct input, held for the whole pack (fine for small and mid-sized models; a per-layer
pass would bound it for large ones). Embeddings get their token frequencies instead (their
input is one-hot, so that is the diagonal of their ``H``); the budget allocator uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    import torch

    from graftbuild.weights.placement import Placement


def collect_statistics(
    model_dir: Path,
    data: Path,
    samples: int,
    seq_len: int,
    field: str = "text",
    where: Placement | str | None = None,
) -> dict[str, torch.Tensor]:
    """``{weight tensor name: statistics}`` for the model in ``model_dir``: ``H`` (n × n) of
    every linear layer, and each embedding's token frequencies (1-D, summing to 1)."""
    import torch

    from graftbuild.weights.modeling import load_model, load_tokenizer
    from graftbuild.weights.placement import Placement
    from graftbuild.weights.textdata import read_examples, token_chunks

    tok = load_tokenizer(model_dir, need_eos=False)  # an encoder's examples end with [SEP]
    chunks = token_chunks(tok, read_examples(data, field), seq_len, data)
    if len(chunks) < samples:
        raise UserError(
            f"{data}: calibration needs {samples} samples of {seq_len} tokens, the file has "
            f"{len(chunks)}; lower `samples` or `seq_len`"
        )
    chunks = chunks[:samples]
    placement = Placement.of(where)
    model = load_model(model_dir, placement)  # hidden states are all it needs: any model kind
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner_of: dict[str, str] = {}  # module -> the module whose accumulator holds its input's H
    # Per forward pass: id of an input tensor -> (first module fed it, the tensor). Holding the
    # tensor keeps its id from being reused by another tensor during the pass.
    owners: dict[int, tuple[str, Any]] = {}
    handles = []

    def hook(name: str) -> Any:
        def pre(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            if id(x) not in owners:
                owners[id(x)] = (name, x)
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                if name not in sums:
                    sums[name] = torch.zeros(flat.shape[1], flat.shape[1], device=x.device)
                    counts[name] = 0
                sums[name] += flat.T @ flat
                counts[name] += flat.shape[0]
            owner_of[name] = owners[id(x)][0]

        return pre

    freqs: dict[str, torch.Tensor] = {}

    def token_hook(name: str, rows: int) -> Any:
        def pre(_module: Any, args: tuple[Any, ...]) -> None:
            ids = args[0].detach().reshape(-1).cpu()
            freqs[name] = freqs.get(name, torch.zeros(rows)) + torch.bincount(ids, minlength=rows)

        return pre

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(name)))
        elif isinstance(module, torch.nn.Embedding):
            handles.append(
                module.register_forward_pre_hook(token_hook(name, module.num_embeddings))
            )
    try:
        with torch.no_grad():
            for i in range(0, len(chunks), 8):
                owners.clear()
                model(input_ids=placement.put(chunks[i : i + 8]))
    finally:
        owners.clear()
        for handle in handles:
            handle.remove()
    del model
    out = {
        f"{name}.weight": (sums[owner] / counts[owner]).cpu() for name, owner in owner_of.items()
    }
    for name, f in freqs.items():
        out[f"{name}.weight"] = f / f.sum()
    return out


def collect_fisher(
    model_dir: Path,
    data: Path,
    samples: int,
    seq_len: int,
    field: str = "text",
    where: Placement | str | None = None,
    batch: int = 8,
) -> dict[str, torch.Tensor]:
    """``{weight tensor name: diagonal empirical Fisher}`` of the model in ``model_dir`` on the
    calibration text: the mean over batches of ``samples`` chunks of the squared gradient of
    the language-modelling loss. ``Σ_j F_j Δ_j²`` is then a tensor's delta's effect on the loss
    to second order (what the loss-aware budget allocator weighs each tensor by). Memory: the
    model, its gradients and one float32 copy of the parameters."""
    import torch

    from graftbuild.weights.modeling import load_causal_lm, load_tokenizer
    from graftbuild.weights.placement import Placement
    from graftbuild.weights.textdata import read_examples, token_chunks

    tok = load_tokenizer(model_dir)
    chunks = token_chunks(tok, read_examples(data, field), seq_len, data)[:samples]
    placement = Placement.of(where)
    model = load_causal_lm(model_dir, placement)
    model.eval()  # no dropout: the same statistics on every run
    params = dict(model.named_parameters(remove_duplicate=False))
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    for i in range(0, len(chunks), batch):
        ids = placement.put(chunks[i : i + batch])
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                g = p.grad.detach().to(torch.float32).pow(2)
                sums[name] = sums[name] + g if name in sums else g
        steps += 1
    del model
    return {name: (s / max(steps, 1)).cpu() for name, s in sums.items()}


def calibration_loss(
    model_dir: Path,
    data: Path,
    samples: int,
    seq_len: int,
    deltas: Any,
    field: str = "text",
    where: Placement | str | None = None,
) -> float:
    """Mean language-modelling loss on the calibration chunks of the model in ``model_dir``
    with ``deltas`` added: an iterable of (parameter name, float32 delta) consumed one at a time
    (names of tied parameters other than the first are skipped)."""
    import torch

    from graftbuild.weights.modeling import load_causal_lm, load_tokenizer
    from graftbuild.weights.placement import Placement
    from graftbuild.weights.textdata import read_examples, token_chunks

    tok = load_tokenizer(model_dir)
    chunks = token_chunks(tok, read_examples(data, field), seq_len, data)[:samples]
    placement = Placement.of(where)
    model = load_causal_lm(model_dir, placement)
    model.eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas:
            p = params.get(name)
            if p is not None:
                p.add_(delta.to(p.device, p.dtype).reshape(p.shape))
        losses = []
        for i in range(0, len(chunks), 8):
            ids = placement.put(chunks[i : i + 8])
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    del model
    return sum(losses) / max(len(losses), 1)
