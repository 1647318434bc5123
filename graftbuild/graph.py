"""The planner: a recipe becomes a networkx DAG of nodes, each with what goes into its key.

Node ids are what users type on the command line: ``base``, ``source:NAME``, ``pack:NAME``,
``fuse:NAME``, ``eval:NAME``. A node names its step (the pure function that builds it), its
normalised config, its upstream nodes (``deps``, by role) and the external files it reads
(``files``, by role). Those, with the step's version, are everything its key is made of.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from graftbuild.errors import UserError
from graftbuild.recipe import BaseSpec, FinetuneSpec, Recipe, ReleaseSpec, TrainSpec


@dataclass
class Node:
    id: str
    step: str
    """Step name in ``graftbuild.steps.STEPS``; "input" for a folder the user provides."""
    config: dict[str, Any] = field(default_factory=dict)
    deps: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    """Key part -> the words that explain a change in it ("config.profile", "dep:source", ...)."""
    output: Path | None = None
    """Where the built artifact is materialised for the user (None: stays in the cache)."""
    path: Path | None = None
    """For an input node: the user's folder."""

    @property
    def kind(self) -> str:
        return self.id.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.id.split(":", 1)[-1]

    @property
    def is_input(self) -> bool:
        return self.step == "input"


@dataclass
class BuildGraph:
    recipe: Recipe
    graph: nx.DiGraph

    def node(self, node_id: str) -> Node:
        return self.graph.nodes[node_id]["node"]

    def order(self, targets: list[str] | None = None) -> list[Node]:
        """Nodes in a deterministic topological order, restricted to ``targets`` and their
        ancestors when given."""
        g = self.graph
        if targets:
            missing = [t for t in targets if t not in g]
            if missing:
                import difflib

                hints = [difflib.get_close_matches(t, list(g), n=1) for t in missing]
                hint = "".join(f" (did you mean {h[0]!r}?)" for h in hints if h)
                raise UserError(f"unknown target(s) {missing}{hint}; nodes: {sorted(g)}")
            keep = set(targets)
            for t in targets:
                keep |= nx.ancestors(g, t)
            g = g.subgraph(keep)
        return [self.node(n) for n in nx.lexicographical_topological_sort(g)]


def build_graph(recipe: Recipe) -> BuildGraph:
    out = recipe.project.out or recipe.root / "out"
    nodes: list[Node] = []

    nodes += model_nodes("base", "base:init", recipe.base, out / "base", "base")
    for tname, teacher in recipe.teachers.items():
        nodes += model_nodes(
            f"teacher:{tname}",
            f"teacher-init:{tname}",
            teacher,
            out / "teachers" / tname,
            f"teacher '{tname}'",
        )

    for name, src in recipe.sources.items():
        sid = f"source:{name}"
        if src.path is not None:
            nodes.append(
                Node(
                    sid,
                    "input",
                    path=src.path,
                    labels={"output": f"source '{name}' weights changed"},
                )
            )
        elif src.finetune is not None:
            nodes.append(
                text_sft_node(
                    sid,
                    _start(src.parent),
                    src.finetune,
                    out / "sources" / name,
                    f"source '{name}'",
                )
            )
        else:
            nodes += transfer_nodes(recipe, name, out)
        profile = recipe.profile(src.compression)
        calib = {"calibration": profile.calibration.data} if profile.calibration else {}
        nodes.append(
            Node(
                f"pack:{name}",
                "pack",
                config={"profile": profile.normalised()},
                deps={"base": "base", "source": recipe.source_model(name)}
                | ({"parent": _start(src.parent)} if src.parent else {}),
                files=calib,
                labels={
                    "config.profile": f"compression profile '{src.compression}' changed",
                    "file:calibration": f"calibration data of '{src.compression}' changed",
                    "dep:source": f"source '{name}' weights changed",
                    "dep:base": "base model changed",
                    "dep:parent": f"parent model graft:{src.parent} changed",
                },
                output=out / "packs" / name,
            )
        )

    for name in recipe.parents():
        nodes.append(graft_node(recipe, name))

    for f in recipe.fuse:
        if f.strategy == "routed":
            from graftbuild.steps.bundle import bundle_node

            nodes.append(bundle_node(recipe, f, out))
            continue
        deps = {"base": "base"} | {f"pack.{i}": f"pack:{p}" for i, p in enumerate(f.packs)}
        labels = {
            "config.packs": "fusion order changed",
            "config.weights": "fusion weights changed",
            "config.strategy": "fusion strategy changed",
            "config.options": "fusion options changed",
            "config.shard_size": "shard size changed",
            "dep:base": "base model changed",
        } | {f"dep:pack.{i}": f"pack '{p}' changed" for i, p in enumerate(f.packs)}
        nodes.append(
            Node(
                f"fuse:{f.name}",
                "fuse",
                config={
                    "packs": f.packs,
                    "weights": f.weight_list(),
                    "strategy": f.strategy,
                    "options": f.options,
                    "shard_size": f.shard_size,
                },
                deps=deps,
                labels=labels,
                output=f.output or out / "fused" / f.name,
            )
        )

    for e in recipe.eval:
        datasets = sorted(e.data)
        nodes.append(
            Node(
                f"eval:{e.name}",
                "eval",
                config={
                    "models": e.models,
                    "datasets": datasets,
                    "field": e.field,
                    "seq_len": e.seq_len,
                    "batch_size": e.batch_size,
                },
                deps={f"model.{i}": m for i, m in enumerate(e.models)},
                files={f"data.{d}": e.data[d] for d in datasets},
                labels={f"dep:model.{i}": f"model {m} changed" for i, m in enumerate(e.models)}
                | {f"file:data.{d}": f"eval data '{d}' changed" for d in datasets}
                | {"config.models": "evaluated models changed"},
                output=out / "evals" / e.name,
            )
        )

    base_step = next(n.step for n in nodes if n.id == "base")
    nodes += [release_node(recipe, r, out, base_step) for r in recipe.release]

    g = nx.DiGraph()
    for n in nodes:
        g.add_node(n.id, node=n)
    for n in nodes:
        for dep in n.deps.values():
            g.add_edge(dep, n.id)
    if not nx.is_directed_acyclic_graph(g):
        cycle = " -> ".join(a for a, _ in nx.find_cycle(g))
        raise UserError(f"{recipe.path}: the recipe's nodes form a cycle: {cycle}")
    return BuildGraph(recipe, g)


def model_nodes(node_id: str, init_id: str, spec: BaseSpec, out: Path, what: str) -> list[Node]:
    """The nodes that make a model declared like the base: an input folder, a seeded init, or a
    seeded init (``init_id``) then trained on text."""
    if spec.path is not None:
        return [Node(node_id, "input", path=spec.path, labels={"output": f"{what} model changed"})]
    first = init_id if spec.finetune is not None else node_id
    nodes = [
        Node(
            first,
            "init",
            config={"seed": spec.seed, "dtype": spec.dtype},
            files={"config": spec.config, "tokenizer": spec.tokenizer},  # type: ignore[dict-item]
            labels={
                "file:config": f"{what} config changed",
                "file:tokenizer": f"{what} tokenizer changed",
                "config.seed": f"{what} init seed changed",
                "config.dtype": f"{what} dtype changed",
            },
            output=out.parent / first.replace(":", "-") if first != node_id else out,
        )
    ]
    if spec.finetune is not None:
        nodes.append(text_sft_node(node_id, first, spec.finetune, out, what))
    return nodes


def train_config(spec: TrainSpec, exclude: set[str] | None = None) -> dict[str, Any]:
    """A training spec as it goes into a key: unset options left out, so that adding an option
    later does not change existing keys."""
    return spec.model_dump(mode="json", exclude=exclude, exclude_none=True)


def text_sft_node(node_id: str, start: str, spec: FinetuneSpec, out: Path, what: str) -> Node:
    """SFT on a text file: the model ``start`` trained by causal LM on every token."""
    return Node(
        node_id,
        "sft",
        config={
            "train": train_config(spec, {"data", "field", "seq_len"}),
            "data": {"kind": "text", "field": spec.field, "seq_len": spec.seq_len},
        },
        deps={"base": start},
        files={"data": spec.data},
        labels={
            "file:data": f"{what} training data changed",
            "config.train": f"{what} finetune settings changed",
            "config.data": f"{what} data settings changed",
            "dep:base": f"{start} changed",
        },
        output=out,
    )


def transfer_nodes(recipe: Recipe, name: str, out: Path) -> list[Node]:
    """teach:NAME (the teacher's answers), sft:NAME (the target trained on them) and, when DPO
    is declared, dpo:NAME; plus the teacher's input node when the teacher is a folder."""
    t = recipe.sources[name].transfer
    assert t is not None
    teacher = recipe.teacher_node(name)
    nodes = []
    if t.teacher not in recipe.teachers:
        nodes.append(
            Node(
                teacher,
                "input",
                path=recipe.teacher_path(name),
                labels={"output": f"teacher of '{name}' changed"},
            )
        )
    gen = t.generation.model_dump(mode="json")
    nodes.append(
        Node(
            f"teach:{name}",
            "teach",
            config={"generation": gen, "field": t.field},
            deps={"teacher": teacher},
            files={"prompts": t.prompts},
            labels={
                "file:prompts": f"prompts of '{name}' changed",
                "config.generation": f"generation settings of '{name}' changed",
                "config.field": f"prompt field of '{name}' changed",
                "dep:teacher": f"teacher {teacher} changed",
            },
            output=out / "teach" / name,
        )
    )
    start = _start(recipe.sources[name].parent)
    sft_out = out / "sources" / name / ("sft" if t.dpo is not None else "")
    nodes.append(
        Node(
            f"sft:{name}",
            "sft",
            config={
                "train": train_config(t.sft, {"max_len", "chat_template"}),
                "data": {
                    "kind": "pairs",
                    "max_len": t.sft.max_len,
                    "chat_template": t.sft.chat_template,
                },
            },
            deps={"base": start, "data": f"teach:{name}"},
            labels={
                "config.train": f"SFT settings of '{name}' changed",
                "config.data": f"SFT data settings of '{name}' changed",
                "dep:data": f"teacher answers for '{name}' changed",
                "dep:base": f"{start} changed",
            },
            output=sft_out,
        )
    )
    if t.dpo is not None:
        nodes.append(
            Node(
                f"dpo:{name}",
                "dpo",
                config={
                    "train": train_config(t.dpo),
                    "sft": {"max_len": t.sft.max_len, "chat_template": t.sft.chat_template},
                    "generation": gen,
                },
                deps={"model": f"sft:{name}", "data": f"teach:{name}"},
                labels={
                    "config.train": f"DPO settings of '{name}' changed",
                    "config.sft": f"SFT data settings of '{name}' changed",
                    "config.generation": f"generation settings of '{name}' changed",
                    "dep:model": f"sft:{name} changed",
                    "dep:data": f"teacher answers for '{name}' changed",
                },
                output=out / "sources" / name / "dpo",
            )
        )
    return nodes


def _start(parent: str | None) -> str:
    """The model a source starts from: the base, or its parent's grafted model."""
    return "base" if parent is None else f"graft:{parent}"


def graft_node(recipe: Recipe, name: str) -> Node:
    """``graft:NAME``: base ⊕ every pack of NAME's chain (a plain sum), the model a child source
    was fine-tuned from and is packed against. Cache only; eval can name it."""
    chain = recipe.chain(name)
    return Node(
        f"graft:{name}",
        "fuse",
        config={
            "packs": chain,
            "weights": [1.0] * len(chain),
            "strategy": "sum",
            "options": {},
            "shard_size": 2**62,
        },
        deps={"base": "base"} | {f"pack.{i}": f"pack:{p}" for i, p in enumerate(chain)},
        labels={"dep:base": "base model changed"}
        | {f"dep:pack.{i}": f"pack '{p}' changed" for i, p in enumerate(chain)},
        output=None,
    )


def release_node(recipe: Recipe, r: ReleaseSpec, out: Path, base_step: str) -> Node:
    """``release:NAME``: the fused model, its model card and manifest. Everything the card shows
    is an input: the fused model, base, packs and evals by hash, the rest in its config."""
    from graftbuild.gates import gate_config

    fuse = next(f for f in recipe.fuse if f.name == (r.fuse or r.name))
    evals = recipe.release_evals(r)
    deps = {"model": f"fuse:{fuse.name}", "base": "base"}
    deps |= {f"pack.{i}": f"pack:{p}" for i, p in enumerate(fuse.packs)}
    deps |= {f"eval.{j}": f"eval:{e.name}" for j, e in enumerate(evals)}
    files = {}
    if recipe.base.path is not None and (recipe.base.path / "README.md").is_file():
        files["base_card"] = recipe.base.path / "README.md"  # license etc. (not in the base hash)
    config = {
        "project": {"name": recipe.project.name, "version": recipe.project.version},
        "card": {"license": r.license, "base_model": r.base_model, "tags": r.tags},
        "fuse": {
            "name": fuse.name,
            "packs": fuse.packs,
            "weights": fuse.weight_list(),
            "strategy": fuse.strategy,
            "options": fuse.options,
        },
        "compression": {p: recipe.sources[p].compression for p in fuse.packs},
        "base": base_step,  # how the base was made, for the card: input, init, finetune
        "evals": [{"name": e.name, "models": e.models} | gate_config(e) for e in evals],
    }
    return Node(
        f"release:{r.name}",
        "release",
        config=config,
        deps=deps,
        files=files,
        labels={"dep:model": f"fused model '{fuse.name}' changed", "config.card": "card changed"}
        | {f"dep:eval.{j}": f"eval '{e.name}' changed" for j, e in enumerate(evals)}
        | {"config.evals": "release gates changed", "file:base_card": "base model card changed"},
        output=r.output or out / "release" / r.name,
    )
