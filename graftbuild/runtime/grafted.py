"""``GraftedModel``: a routed bundle at inference time, the base plus packs switched in place.

Activating a set of packs adds their decoded deltas into the loaded base weights, tensor by
tensor; deactivating subtracts them. The base is loaded once and never reloaded; only the
tensors a pack touches are written. A pack with a ``parent`` (a continual chain) brings its
whole chain with it. Routing (``route``, ``generate``) runs the router on the base model, with
no pack active, as it was fitted in the build.

Adding then subtracting a float32 delta restores the base up to float rounding (≈1e-7 relative);
``reset`` reloads the touched tensors from the bundle's base files when exact bytes matter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftbuild.errors import UserError

if TYPE_CHECKING:
    import torch

    from graftbuild.runtime.router import Decision, Router
    from graftbuild.skillpack import PackReader


class GraftedModel:
    def __init__(
        self,
        folder: Path,
        model: Any,
        tokenizer: Any,
        packs: dict[str, PackReader],
        weights: dict[str, float],
        parents: dict[str, str | None],
        router: Router | None,
    ) -> None:
        self.folder = folder
        self.model = model
        self.tokenizer = tokenizer
        self._packs = packs
        self._weights = weights
        self._parents = parents
        self.router = router
        self._active: list[str] = []
        self._params = dict(model.state_dict(keep_vars=True))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> GraftedModel:
        """Load a bundle folder written by a ``strategy = "routed"`` fuse node."""
        from graftbuild.runtime.bundle import StoredDelta, read_bundle
        from graftbuild.runtime.router import Router
        from graftbuild.skillpack import PackReader
        from graftbuild.weights.modeling import load_model, load_tokenizer

        folder = Path(path)
        doc = read_bundle(folder)
        base = folder / doc["base"]
        model = load_model(base, device).eval()  # a causal LM, or an encoder (no generate)
        tok = load_tokenizer(base, need_eos=False)
        packs: dict[str, Any] = {p["name"]: PackReader(folder / p["file"]) for p in doc["packs"]}
        weights = {p["name"]: float(p["weight"]) for p in doc["packs"]}
        parents = {p["name"]: p.get("parent") for p in doc["packs"]}
        for m in doc.get("mixes", []):  # a stored mix is switched in like one pack of weight 1
            packs[m["name"]] = StoredDelta(folder / m["file"])
            weights[m["name"]], parents[m["name"]] = 1.0, None
        router = Router.load(folder, doc["router"]) if doc.get("router") else None
        return cls(folder, model, tok, packs, weights, parents, router)

    # -- packs ---------------------------------------------------------------------------------

    @property
    def packs(self) -> list[str]:
        """What ``activate`` takes: the packs, then any stored mix (``x+y``) by name."""
        return list(self._packs)

    @property
    def active(self) -> list[str]:
        return list(self._active)

    def chain(self, name: str) -> list[str]:
        """``name`` and its parents, root first."""
        out: list[str] = []
        cur: str | None = name
        while cur is not None:
            if cur not in self._packs:
                raise UserError(f"{self.folder}: no pack {cur!r} in this bundle; has {self.packs}")
            out.append(cur)
            cur = self._parents.get(cur)
        return out[::-1]

    def activate(self, names: str | Iterable[str] | None) -> None:
        """Make exactly ``names`` (and their chains) active; ``None`` or ``[]``: the base alone."""
        if names is None:
            names = []
        elif isinstance(names, str):
            names = [names]
        want: list[str] = []
        for n in names:
            want += [c for c in self.chain(n) if c not in want]
        for name in [a for a in self._active if a not in want]:
            self._apply(name, -1.0)
        for name in [w for w in want if w not in self._active]:
            self._apply(name, 1.0)
        self._active = want

    @contextmanager
    def using(self, names: str | Iterable[str] | None) -> Iterator[GraftedModel]:
        """Temporarily activate ``names``; the previous set is restored afterwards."""
        before = self.active
        self.activate(names)
        try:
            yield self
        finally:
            self.activate(before)

    def _apply(self, name: str, sign: float) -> None:
        import torch

        reader, alpha = self._packs[name], sign * self._weights[name]
        with torch.no_grad():
            for tensor in reader.names():
                p = self._params.get(tensor)
                if p is None:
                    raise UserError(f"{reader.path}: tensor {tensor!r} is not in the base model")
                delta = reader.decode(tensor, str(p.device))  # decoded where the weight is
                if p.dtype == torch.float32:
                    p.add_(delta, alpha=alpha)
                else:
                    p.copy_((p.float() + alpha * delta).to(p.dtype))

    def reset(self) -> None:
        """Deactivate every pack and reload the tensors they touched from the base files."""
        import torch

        from graftbuild.weights.tensors import ModelWeights

        touched = {t for n in self._active for t in self._packs[n].names()}
        self._active = []
        with ModelWeights(self.folder / "base") as base, torch.no_grad():
            for t in sorted(touched):
                self._params[t].copy_(base.get(t))

    # -- routing and generation ----------------------------------------------------------------

    def decide(self, prompts: list[str]) -> list[Decision]:
        """Per prompt, what the router answers: the option (``base``, a pack, or a mix such as
        ``x+y``), the packs it activates, its probability (``confidence``) and every option's
        and domain's probability (graftbuild/runtime/router.py ``Decision``)."""
        if self.router is None:
            raise UserError(f"{self.folder}: this bundle has no router")
        with self.using(None):
            return self.router.decide(self.model, self.tokenizer, prompts)

    def route(self, prompts: list[str], return_scores: bool = False) -> Any:
        """For each prompt, the packs the router activates for it (``[]``: the base alone; two
        or more: a mix).

        With ``return_scores``: ``(routes, scores)``, where ``scores[i]`` maps every option
        (``"base"`` for no pack, a pack's name, ``"x+y"`` for a mix) to the router's probability
        for prompt ``i`` (they sum to 1; the route is the most probable)."""
        decisions = self.decide(prompts)
        routes = [d.packs for d in decisions]
        if not return_scores:
            return routes
        return routes, [d.options for d in decisions]

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 32,
        packs: list[list[str]] | None = None,
        log_routes: bool | Callable[[str], None] = False,
        **kwargs: Any,
    ) -> list[str]:
        """Greedy (unless ``kwargs`` say otherwise) continuations, each prompt with the packs the
        router picks for it (or ``packs[i]``), grouped so each pack set is switched in once.

        ``log_routes``: True logs, per prompt, the packs it ran with, the chosen option and its
        probability, then every option's (logger ``graftbuild.runtime``, level INFO); a
        function is called with each line."""
        import torch

        if not hasattr(self.model, "generate") or not self.model.can_generate():
            raise UserError(
                f"{self.folder}: the base is an encoder ({type(self.model).__name__}); it has no "
                "generate: use route() and the model's hidden states"
            )
        decisions: list[Decision] | None = None
        if packs is not None:
            chosen = packs
        else:
            decisions = self.decide(prompts)
            chosen = [d.packs for d in decisions]
        if log_routes:
            emit = log_routes if callable(log_routes) else logging.getLogger(__name__).info
            for i, prompt in enumerate(prompts):
                if decisions is None:
                    how = "given"
                else:
                    d = decisions[i]
                    how = f"{d.option} {d.confidence:.2f}; " + ", ".join(
                        f"{k} {v:.2f}" for k, v in sorted(d.options.items(), key=lambda kv: -kv[1])
                    )
                emit(f"route {i}: {prompt[:60]!r} -> {chosen[i] or ['base']} ({how})")
        out: list[str] = [""] * len(prompts)
        device = next(self.model.parameters()).device
        order = sorted(range(len(prompts)), key=lambda i: tuple(chosen[i]))
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.eos_token_id)
        before = self.active
        try:
            with torch.no_grad():
                for i in order:
                    self.activate(chosen[i])
                    ids = self.tokenizer(prompts[i], return_tensors="pt")["input_ids"].to(device)
                    gen = self.model.generate(ids, max_new_tokens=max_new_tokens, **kwargs)
                    new = gen[0, ids.shape[1] :]
                    out[i] = self.tokenizer.decode(new, skip_special_tokens=True)
        finally:
            self.activate(before)
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def close(self) -> None:
        for r in self._packs.values():
            r.close()


def chunk_loss(model: Any, chunks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss of ``model`` over token chunks [n, seq_len] (what ``eval`` reports)."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
            ).item()
            count += target.numel()
    return total / count


def text_loss(
    model: Any, tokenizer: Any, texts: list[str], max_len: int, batch_size: int = 16
) -> float:
    """Mean next-token loss over the tokens of ``texts`` (each tokenized on its own, cut at
    ``max_len``), batched with right padding; texts of fewer than two tokens are skipped."""
    total, count = text_loss_sum(model, tokenizer, texts, max_len, batch_size)
    if count == 0:
        raise UserError("no held-out prompt has two tokens or more: cannot measure a loss")
    return total / count


def text_loss_sum(
    model: Any, tokenizer: Any, texts: list[str], max_len: int, batch_size: int = 16
) -> tuple[float, int]:
    """(summed next-token loss, predicted tokens) of ``texts``, as ``text_loss`` measures them."""
    import torch

    rows = [tokenizer(t)["input_ids"][:max_len] for t in texts]
    rows = sorted((r for r in rows if len(r) > 1), key=len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
            ).item()
            count += int((target != -100).sum())
    return total, count
