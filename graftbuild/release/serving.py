"""A routed bundle as adapters for multi-adapter servers: one adapter per pack, the router, and
a Python example that serves them with PEFT (``load_adapter``/``set_adapter``), choosing the
adapter per request with graftbuild's router.

Layout written::

    adapters/NAME/        one adapter per pack (graftbuild/release/peft.py), its chain and
                          weight folded in, with its README card; and one per mix the router
                          may choose (``adapters/x+y``: the mix's packs folded into one adapter)
    router.json           {"format", "version", "target", "router", "adapters": {NAME: folder},
                          "options": {option: adapter or null}} (null: the base alone)
    router.safetensors    the bundle's router, unchanged (graftbuild/runtime/router.py)
    serve_peft.py         the example server (PEFT + graftbuild's router)
    README.md             how to serve the same adapters with PEFT, vLLM and LoRAX
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from graftbuild.errors import UserError

if TYPE_CHECKING:
    from graftbuild.release.peft import ExportReport

FORMAT = "graftbuild.adapter-bundle"
VERSION = 2
EXAMPLE = "serve_peft.py"


def export_bundle(
    folder: Path,
    out: Path,
    *,
    target: str = "peft",
    max_rank: int | None = None,
    tolerance: float = 1e-3,
    max_error: float | None = None,
    extras: str = "patch",
    dtype: str = "float32",
    data: dict[str, Path] | None = None,
) -> dict[str, ExportReport]:
    """Export the routed bundle in ``folder`` into ``out`` (see the module docstring)."""
    from graftbuild.release.peft import export_adapter
    from graftbuild.runtime.bundle import read_bundle
    from graftbuild.runtime.router import ROUTER_FILE, option_label

    if target not in ("peft", "vllm"):
        raise UserError(f"--target {target!r}: a bundle is exported for peft or vllm")
    if target == "vllm" and extras == "patch":
        raise UserError(
            "--extras patch: vLLM serves every adapter of a bundle on one base, which cannot "
            "hold a base variant per adapter; use --extras refuse or --extras drop"
        )
    doc = read_bundle(folder)
    if doc.get("mixes"):  # a stored delta, not packs: export_adapter folds pack files only
        m = doc["mixes"][0]
        raise UserError(
            f"{folder}: mix {m['name']!r} is a {m['strategy']} fusion stored as a delta; "
            'export bundle supports mixes of mix_strategy = "sum" only'
        )
    packs = {p["name"]: p for p in doc["packs"]}
    base = folder / doc["base"]
    data = data or {}
    reports: dict[str, ExportReport] = {}
    out.mkdir(parents=True, exist_ok=True)

    def chain(name: str) -> list[str]:
        out, cur = [], name
        while cur is not None:
            if cur not in packs:
                raise UserError(f"{folder}: pack {name!r} names a missing parent {cur!r}")
            out.append(cur)
            cur = packs[cur].get("parent")
        return out[::-1]

    router = doc.get("router")
    # a version-1 router has no options: each class is its own
    options = (router or {}).get("options") or [[p] for p in packs]
    adapters: dict[str, list[str]] = {name: chain(name) for name in packs}
    for option in options:
        if len(option) > 1:  # a mix: its packs' chains, each pack once, folded into one adapter
            adapters[option_label(option)] = list(
                dict.fromkeys(c for p in option for c in chain(p))
            )
    for name, layer_names in adapters.items():
        layers = [(folder / packs[c]["file"], float(packs[c]["weight"])) for c in layer_names]
        reports[name] = export_adapter(
            layers,
            out / "adapters" / name,
            base=base,
            target=target,
            max_rank=max_rank,
            tolerance=tolerance,
            max_error=max_error,
            extras=extras,
            dtype=dtype,
            data=data.get(name),
        )
    if router:
        shutil.copyfile(folder / ROUTER_FILE, out / ROUTER_FILE)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "target": target,
        "router": router,
        "adapters": {name: f"adapters/{name}" for name in adapters},
        "options": {option_label(o): (option_label(o) if o else None) for o in options},
    }
    (out / "router.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / EXAMPLE).write_text(SERVE_PEFT)
    ranks = [r for rep in reports.values() for r in rep.modules.values()]
    (out / "README.md").write_text(_readme(list(adapters), target, max(ranks, default=16)))
    return reports


def _readme(names: list[str], target: str, rank: int) -> str:
    modules = " ".join(f"{n}=adapters/{n}" for n in names)
    return f"""# Skill adapters (exported by graftbuild for {target})

One LoRA adapter per skill in `adapters/`, each with a card (what it holds, provenance, the share
of its skill it keeps), and graftbuild's router (`router.json`, `router.safetensors`), which
picks the skill for a prompt from the base model's hidden states (or none: the base alone).

## PEFT

    python serve_peft.py BASE_MODEL_FOLDER "12 + 7 =" "def add(x):"

`serve_peft.py` loads the base once, every adapter with `load_adapter`, routes each prompt
with the router (on the base, adapters disabled) and answers it with `set_adapter`. The router
chooses an option per prompt: the base alone, one skill, or a mix of skills (served by its own
adapter, `adapters/x+y`, the mix's packs folded together); `router.json` names each option's
adapter. `BundleServer.decide` reports the chosen option and the router's probability for it
and for every option.

## vLLM

    vllm serve BASE_MODEL --enable-lora --max-lora-rank {rank} --max-loras {len(names)} \\
        --lora-modules {modules}

A request names its adapter as the model: `{{"model": "{names[0]}", "prompt": "..."}}`;
the base model's own name serves the base. To route, run graftbuild's router in the client
(`BundleServer.route` in serve_peft.py runs it on a local copy of the base) and send the
request with the adapter it picks.

## LoRAX

    lorax-launcher --model-id BASE_MODEL

then per request `{{"inputs": "...", "parameters": {{"adapter_id": "/path/adapters/{names[0]}",
"adapter_source": "local"}}}}`, the adapter chosen by the router as above.
"""


SERVE_PEFT = '''"""Serve graftbuild skill adapters with PEFT: one base model, one adapter per skill,
the adapter for each prompt chosen by graftbuild's router.

    python serve_peft.py BASE_MODEL_FOLDER "prompt one" "prompt two"
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from graftbuild.runtime.router import Router

HERE = Path(__file__).resolve().parent


class BundleServer:
    def __init__(self, base: str | Path, folder: str | Path = HERE) -> None:
        folder = Path(folder)
        meta = json.loads((folder / "router.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(base), local_files_only=True, trust_remote_code=False
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(base), local_files_only=True, trust_remote_code=False
        ).eval()
        names = list(meta["adapters"])
        first = names[0]
        self.model = PeftModel.from_pretrained(
            model,
            str(folder / meta["adapters"][first]),
            adapter_name=first,
            local_files_only=True,
            trust_remote_code=False,
        ).eval()
        for name in names[1:]:
            self.model.load_adapter(
                str(folder / meta["adapters"][name]), adapter_name=name, local_files_only=True
            )
        self.router = Router.load(folder, meta["router"]) if meta["router"] else None
        self.options = meta["options"]

    def decide(self, prompts: list[str]):
        """Per prompt, the router's decision: ``option`` (``base``, a pack, or ``x+y`` for a
        mix), ``confidence`` (its probability) and every option's probability (``options``)."""
        if self.router is None:
            raise ValueError("this bundle has no router")
        with self.model.disable_adapter():
            return self.router.decide(self.model, self.tokenizer, prompts)

    def route(self, prompts: list[str]) -> list[str | None]:
        """The adapter for each prompt (None: the base model alone)."""
        return [self.options[d.option] for d in self.decide(prompts)]

    def _using(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return nullcontext()

    def logits(self, prompt: str, adapter: str | None) -> torch.Tensor:
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad(), self._using(adapter):
            return self.model(input_ids=ids).logits

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        adapter = self.route([prompt])[0]
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad(), self._using(adapter):
            out = self.model.generate(
                input_ids=ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


if __name__ == "__main__":
    server = BundleServer(sys.argv[1])
    for prompt in sys.argv[2:]:
        d = server.decide([prompt])[0]
        print(f"[{d.option} {d.confidence:.2f}] {prompt!r} -> {server.generate(prompt)!r}")
'''
