"""The recipe's schema: pydantic models of every table (unknown keys are errors).

Relative paths resolve against the recipe file's folder. Every user mistake becomes a
``UserError`` naming the file, the key and what was expected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from graftbuild.compress.profiles import DEFAULT_PROFILE
from graftbuild.errors import UserError
from graftbuild.recipe import ids

ROLE_NAMES = ("embed", "head", "attn", "mlp", "expert", "router", "norm", "other")


def _resolve(value: Path, info: ValidationInfo) -> Path:
    root = (info.context or {}).get("root")
    path = Path(value).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if root is None:
        return path
    resolved = path.resolve()
    links = (info.context or {}).get("links")
    if links is not None and resolved != path:  # a link (or ..) on the way: watched by no-op
        links[str(path)] = str(resolved)
    return resolved


RelPath = Annotated[Path, AfterValidator(_resolve)]

MAX_FUSE_WEIGHT = 1000.0
FuseWeight = Annotated[float, Field(ge=-MAX_FUSE_WEIGHT, le=MAX_FUSE_WEIGHT, allow_inf_nan=False)]
"""A pack's fusion weight: finite, and small enough that w * delta stays in the float range of
the model (1e39 is not a float32; anything near it overflows long before)."""


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectSpec(Model):
    name: str = Field(min_length=1)
    version: str = "0.0.0"
    cache: RelPath | None = None
    """Cache folder (default: ``cache`` beside the recipe; ``--cache`` and GRAFTBUILD_CACHE win)."""
    out: RelPath | None = None
    """Where built artifacts are materialised (default: ``out`` beside the recipe)."""
    remote: str | None = None
    """A shared remote cache, any fsspec URL (``s3://bucket/prefix``); see graftbuild/remote.py."""

    @field_validator("remote")
    @classmethod
    def _remote(cls, v: str | None) -> str | None:
        from graftbuild.cache.remote import check_url

        if v is not None:
            try:
                check_url(v)
            except UserError as e:
                raise ValueError(str(e).removeprefix("project.remote: ")) from None
        return v


class LoraSpec(Model):
    """Train LoRA adapters (peft) instead of every weight; they are merged into θ* afterwards,
    so the pack still sees a full model. Full-parameter training is the default: adapters absorb
    less of a skill."""

    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainSpec(Model):
    """What every training run shares (SFT of text or of a teacher's responses, DPO)."""

    steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    """Alternative to ``steps``: passes over the data."""
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=8, gt=0)
    seed: int = 0
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lora: LoraSpec | None = None

    @model_validator(mode="after")
    def _length(self) -> TrainSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give either `steps` or `epochs`")
        return self


class FinetuneSpec(TrainSpec):
    """Causal-LM training on a text file (one example per line, or jsonl)."""

    data: RelPath
    field: str = "text"
    """For .jsonl data: the field holding each example's text."""
    seq_len: int = Field(default=64, gt=1)
    """Examples are joined by eos and cut into sequences of this many tokens."""


class GenerationSpec(Model):
    """How the teacher answers the prompts."""

    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    """0 is greedy decoding."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    samples: int = Field(default=1, gt=0)
    """Responses per prompt (sampling needs temperature > 0 for them to differ)."""
    seed: int = 0
    chat_template: bool = False
    """Render each prompt with the teacher tokenizer's chat template (it must have one)."""
    batch_size: int = Field(default=16, gt=0)

    @model_validator(mode="after")
    def _sampling(self) -> GenerationSpec:
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("`samples` > 1 needs `temperature` > 0 (greedy answers are identical)")
        return self


class SftSpec(TrainSpec):
    """SFT of the target on the teacher's responses (loss on the response tokens only)."""

    max_len: int = Field(default=128, gt=1)
    """Prompt + response, in target tokens; longer pairs are cut at the end."""
    chat_template: bool = False
    """Render prompts with the target tokenizer's chat template (it must have one)."""


class DpoSpec(TrainSpec):
    """DPO after SFT: the teacher's response is chosen, the SFT model's own response to the same
    prompt rejected (pairs where they agree are dropped); the SFT model is the reference."""

    beta: float = Field(default=0.1, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    temperature: float = Field(default=1.0, ge=0)
    """The SFT model's rejected answers are sampled at this temperature (0: greedy). Sampling
    finds the mistakes it still makes where its greedy answer is already right."""
    length_normalize: bool = False
    """Average log-probabilities over response tokens (length-normalised DPO, as FuseChat-3.0)."""
    sft_weight: float = Field(default=0.0, ge=0)
    """Adds this much NLL of the chosen (teacher's) response to the loss (RPO): DPO alone tends
    to lower the chosen answer's likelihood along with the rejected one's."""


class TransferSpec(Model):
    """Teach the target a skill from a teacher of any architecture and tokenizer."""

    teacher: str = Field(min_length=1)
    """A `[teachers]` name, or a path to a local Hugging Face causal-LM folder (with tokenizer)."""
    prompts: RelPath
    field: str = "prompt"
    """The field of each prompts.jsonl line that holds the prompt."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    sft: SftSpec
    dpo: DpoSpec | None = None


class HubModel(Model):
    """``model = "org/name"``: a Hugging Face hub id, resolved offline through the local cache
    to ``path`` (graftbuild/weights/hub.py); ``revision`` pins a commit, else the cached ``main``.
    The resolved commit is recorded in ``revision`` and pinned in the lock."""

    model: str | None = Field(default=None, min_length=1)
    revision: str | None = Field(default=None, pattern="^[0-9a-f]{40}$|^[A-Za-z0-9._/-]+$")

    def resolve_hub(self, where: str) -> None:
        """Set ``path`` (and ``revision``) from ``model``; a ValueError names ``where``."""
        if self.model is None:
            if self.revision is not None:
                raise ValueError(f"{where}.revision goes with `model` (a hub id)")
            return
        if getattr(self, "path", None) is not None:
            raise ValueError(f"{where}: give either `path` or `model`, not both")
        from graftbuild.weights.hub import resolve

        try:
            path, self.revision = resolve(self.model, self.revision)
        except ValueError as e:
            raise ValueError(f"{where}.model: {e}") from None
        self.path = path  # type: ignore[attr-defined]


class BaseSpec(HubModel):
    path: RelPath | None = None
    config: RelPath | None = None
    tokenizer: RelPath | None = None
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    finetune: FinetuneSpec | None = None
    """Demos: train the seeded init on general text first, so the base knows something."""

    @model_validator(mode="after")
    def _one_kind(self) -> BaseSpec:
        if (self.path is None and self.model is None) == (self.config is None):
            raise ValueError(
                "give either `path` (a model folder), `model` (a hub id) or `config` + `tokenizer`"
            )
        if self.config is not None and self.tokenizer is None:
            raise ValueError("`config` needs `tokenizer` (a tokenizer folder)")
        if (self.path or self.model) and (self.tokenizer is not None or self.finetune is not None):
            raise ValueError("`tokenizer` and `finetune` go with `config`, not with `path`")
        return self


class SourceSpec(HubModel):
    path: RelPath | None = None
    finetune: FinetuneSpec | None = None
    transfer: TransferSpec | None = None
    compression: str = "default"
    parent: str | None = None
    """A continual chain: this source was fine-tuned from base ⊕ the parent pack (and its own
    chain), and its delta is taken against exactly that model."""

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSpec:
        kinds = ("path", "model", "finetune", "transfer")
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `path` (a model folder), `model` (a hub id), "
                "`finetune = {...}` or `transfer = {...}`" + (f"; got {given}" if given else "")
            )
        return self


def normalise_codec(spec: Any) -> dict[str, Any]:
    """A codec spec with its defaults filled in: {"method": ..., **params}."""
    from graftbuild.compress.codecs import parse_spec

    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError('expected a table with a `method`, e.g. { method = "lowrank" }')
    codec, params = parse_spec(spec)
    return {"method": codec.name, **params.model_dump(mode="json")}


class CalibrationSpec(Model):
    """Calibration text for GPTQ: the first ``samples`` chunks of ``seq_len`` tokens."""

    data: RelPath
    field: str = "text"
    samples: int = Field(default=128, gt=0)
    seq_len: int = Field(default=64, gt=1)
    damp: float = Field(default=0.01, ge=0)
    """Added to the Hessian's diagonal, as a fraction of its mean."""
    act_order: bool = False


class QualityTarget(Model):
    """The smallest pack whose graft keeps ``keep`` of the fine-tune's improvement in loss on
    held-out text ``data`` (its first ``samples`` chunks of ``seq_len`` tokens): the budget is
    searched in at most ``evaluations`` grafts, up to the profile's ``budget`` (default 1/2)."""

    keep: float = Field(gt=0, le=1)
    data: RelPath
    field: str = "text"
    samples: int = Field(default=32, gt=0)
    seq_len: int = Field(default=64, gt=1)
    evaluations: int = Field(default=6, ge=2, le=16)


class CompressionProfile(Model):
    embed: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PROFILE["embed"]))
    head: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PROFILE["head"]))
    attn: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PROFILE["attn"]))
    mlp: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PROFILE["mlp"]))
    expert: dict[str, Any] | None = None
    """Mixture-of-experts expert projections (dense MLPs are ``mlp``); unset: as ``mlp``."""
    router: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PROFILE["router"]))
    """Mixture-of-experts router gates."""
    norm: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PROFILE["norm"]))
    other: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PROFILE["other"]))
    roles: dict[
        str, Literal["embed", "head", "attn", "mlp", "expert", "router", "norm", "other"]
    ] = Field(
        default_factory=dict
    )
    """Regex -> role overrides, tried before the built-in name patterns."""
    calibration: CalibrationSpec | None = None
    """Calibration data: mixed-precision bands are quantised with GPTQ instead of RTN."""
    budget: float | None = Field(default=None, gt=0, le=1)
    """Pack size as a fraction of the fp16 delta; ranks, bands and keep fractions are then
    allocated across tensors (graftbuild/compress/budget.py), the roles' methods kept."""
    target: QualityTarget | None = None
    """A quality target instead of (or under) a fixed budget: see ``QualityTarget``."""
    mix: list[Literal["lowrank", "mixed", "sparse", "prune"]] = Field(default_factory=list)
    """Under a budget: codecs a matrix may take instead of its role's method, per tensor,
    where they cost the least error per byte (compress/budget.py ``loss_aware_profile``)."""

    @field_validator(
        "embed", "head", "attn", "mlp", "expert", "router", "norm", "other", mode="before"
    )
    @classmethod
    def _codec(cls, v: Any) -> dict[str, Any] | None:
        return None if v is None else normalise_codec(v)

    @model_validator(mode="after")
    def _experts_as_mlp(self) -> CompressionProfile:
        if self.expert is None:
            self.expert = dict(self.mlp)
        return self

    @field_validator("roles")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regular expression {pattern!r}: {e}") from e
        return v

    def normalised(self) -> dict[str, Any]:
        """The profile as it goes into a pack's key: the calibration file is a declared input of
        the node (hashed by content), so its path is left out; unset options are omitted."""
        out = self.model_dump(mode="json", exclude={"calibration": {"data"}, "target": {"data"}})
        dropped = ("calibration", "budget", "target")
        out = {k: v for k, v in out.items() if v is not None or k not in dropped}
        return {k: v for k, v in out.items() if k != "mix" or v}  # unset: keys as before


class SliceSourceSpec(Model):
    """One input of a slice (mergekit parity, issue 18): "base" or a pack, and its layers."""

    model: str
    layer_range: tuple[int, int]

    @model_validator(mode="after")
    def _range(self) -> SliceSourceSpec:
        a, b = self.layer_range
        if not 0 <= a < b:
            raise ValueError(
                f"layer_range: expected [start, end) with 0 <= start < end, got {[a, b]}"
            )
        return self


class SliceSpec(Model):
    sources: list[SliceSourceSpec] = Field(min_length=1)


class FuseSpec(Model):
    name: str = Field(min_length=1)
    packs: list[str] = Field(min_length=1)
    """Fusion order."""
    strategy: str = "sum"
    weights: dict[str, FuseWeight] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    """Strategy-specific parameters (validated by the strategy)."""
    output: RelPath | None = None
    shard_size: int = Field(default=2_000_000_000, gt=0)
    """Largest weight shard in bytes; bigger models are split HF-style with an index."""

    # --- mergekit parity (issue 18): per-pack parameters and the tokenizer of a merge ---------
    pack_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-pack parameters of a mergekit-named strategy (``weight``, ``density``…: values,
    gradients or filtered lists, graftbuild/fusion/schedule.py); they win over ``options``."""
    tokenizer_source: str = "base"
    """Whose tokenizer (and config) files the fused folder gets: "base" or a pack's name (its
    source must be a `path` source with the base's vocabulary)."""
    slices: list[SliceSpec] | None = None
    """mergekit's ``slices``: the output's layers from layer ranges of the inputs (layer stacking;
    graftbuild/steps/slices.py)."""

    @model_validator(mode="after")
    def _mergekit(self) -> FuseSpec:
        from graftbuild.fusion import check_fuse_packs

        unknown = sorted(set(self.pack_options) - set(self.packs))
        if unknown:
            raise ValueError(f"`pack_options` names packs not in `packs`: {unknown}")
        if self.tokenizer_source not in ("base", *self.packs):
            raise ValueError(
                f"tokenizer_source: expected 'base' or one of `packs` (got "
                f"{self.tokenizer_source!r})"
            )
        if self.slices is None:
            check_fuse_packs(self.strategy, self.packs, self.pack_options)
        else:
            check_fuse_packs(self.strategy, None, self.pack_options)
            for i, sl in enumerate(self.slices):
                for k, src in enumerate(sl.sources):
                    if src.model != "base" and src.model not in self.packs:
                        raise ValueError(
                            f"slices[{i}].sources[{k}].model: {src.model!r} is neither 'base' "
                            f"nor one of `packs`{suggest(src.model, self.packs)}"
                        )
        return self

    # --- end of the mergekit block ------------------------------------------------------------

    @model_validator(mode="after")
    def _check(self) -> FuseSpec:
        from graftbuild.fusion import parse_strategy

        if len(set(self.packs)) != len(self.packs):
            raise ValueError(f"`packs` lists a pack twice: {self.packs}")
        unknown = sorted(set(self.weights) - set(self.packs))
        if unknown:
            raise ValueError(f"`weights` names packs not in `packs`: {unknown}")
        self.options = parse_strategy(self.strategy, self.options)
        return self

    def weight_list(self) -> list[float]:
        return [float(self.weights.get(p, 1.0)) for p in self.packs]


class GateSpec(Model):
    """A release gate on one model's held-out loss on one dataset (see graftbuild/gates.py)."""

    model: str
    data: str
    max_loss: float | None = None
    """The loss must be at most this."""
    max_increase: float | None = Field(default=None, ge=0)
    """The loss may exceed the eval's reference model's by at most this (nats)."""
    min_improvement: float | None = None
    """The loss must be below the reference model's by at least this (nats)."""

    @model_validator(mode="after")
    def _one_threshold(self) -> GateSpec:
        if self.max_loss is None and self.max_increase is None and self.min_improvement is None:
            raise ValueError("a gate needs `max_loss`, `max_increase` or `min_improvement`")
        return self


class EvalSpec(Model):
    name: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    """Node ids to evaluate: "base", "source:NAME", "fuse:NAME" (not routed), "graft:NAME"."""
    data: dict[str, RelPath] = Field(min_length=1)
    """Dataset name -> held-out text or jsonl file."""
    field: str = "text"
    seq_len: int = Field(default=64, gt=1)
    batch_size: int = Field(default=16, gt=0)
    reference: str = "base"
    """The model that `max_increase` and `min_improvement` gates compare against."""
    gates: list[GateSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _gates(self) -> EvalSpec:
        if self.gates and self.reference not in self.models:
            raise ValueError(
                f"reference {self.reference!r} must be one of `models` when gates are declared"
            )
        for i, g in enumerate(self.gates):
            if g.model not in self.models:
                raise ValueError(
                    f"gates[{i}].model: {g.model!r} is not evaluated here"
                    f"{suggest(g.model, self.models)}"
                )
            if g.data not in self.data:
                raise ValueError(
                    f"gates[{i}].data: no dataset {g.data!r}{suggest(g.data, self.data)}"
                )
        return self


class ReleaseSpec(Model):
    """A release folder: a fused model with a model card and a manifest of file hashes."""

    name: str = Field(min_length=1)
    fuse: str | None = None
    """The `[[fuse]]` to release (default: the one with this release's name)."""
    evals: list[str] | None = None
    """Evals shown in the card and gating it (default: every eval of the fused model)."""
    license: str | None = None
    """Default: the base model card's `license`, where it has one."""
    base_model: str | None = None
    """Hub id for the card (default: the base config's `_name_or_path`, unless a local path)."""
    tags: list[str] = Field(default_factory=list)
    output: RelPath | None = None


class ExportSpec(Model):
    """An adapter of one pack for a serving target, a cached node (graftbuild/release/peft.py)."""

    name: str = Field(min_length=1)
    pack: str = Field(min_length=1)
    target: Literal["peft", "vllm", "lorax"] = "peft"
    max_rank: int | None = Field(default=None, gt=0)
    """Largest LoRA rank (default: none for peft, 64 for vllm and lorax; vllm at most 512)."""
    tolerance: float = Field(default=1e-3, ge=0, lt=1)
    """Relative error at which embedding, head and exact deltas are factored by SVD."""
    max_error: float | None = Field(default=None, gt=0)
    """Refuse when the rank cap costs a module more than this relative error."""
    extras: Literal["patch", "refuse", "drop"] = "patch"
    """Deltas the target cannot carry: a base-variant patch file, refuse, or leave out."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    data: RelPath | None = None
    """Held-out text for the quality card (default: the eval dataset named after the pack)."""
    samples: int = Field(default=64, gt=0)
    base_model: str | None = None
    output: RelPath | None = None


class Recipe(Model):
    project: ProjectSpec
    base: BaseSpec
    teachers: dict[str, BaseSpec] = Field(default_factory=dict)
    """Models that teach sources through `transfer`: a folder, or built like the base."""
    compression: dict[str, CompressionProfile] = Field(default_factory=dict)
    sources: dict[str, SourceSpec] = Field(min_length=1)
    fuse: list[FuseSpec] = Field(default_factory=list)
    eval: list[EvalSpec] = Field(default_factory=list)
    release: list[ReleaseSpec] = Field(default_factory=list)
    export: list[ExportSpec] = Field(default_factory=list)

    # Filled by load_recipe, not part of the TOML.
    path: Path | None = Field(default=None, exclude=True)
    _links: dict[str, str] = PrivateAttr(default_factory=dict)
    """Each recipe path as written (made absolute) -> what it resolved to, where they differ:
    the no-op record re-resolves them, so a retargeted link is a change."""

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        self.base.resolve_hub("base")
        for name, spec in self.teachers.items():
            spec.resolve_hub(f"teachers.{name}")
        for name, src in self.sources.items():
            src.resolve_hub(f"sources.{name}")
        profiles = set(self.compression) | {"default"}
        for name, src in self.sources.items():
            if src.compression not in profiles:
                raise ValueError(
                    f"sources.{name}.compression: no profile {src.compression!r}"
                    f"{suggest(src.compression, profiles)}; defined: {sorted(profiles)}"
                )
        for name, src in self.sources.items():
            if src.parent is not None and src.parent not in self.sources:
                raise ValueError(
                    f"sources.{name}.parent: no source {src.parent!r}"
                    f"{suggest(src.parent, self.sources)}"
                )
        for name in self.sources:
            self.chain(name)  # raises on a cycle
        self._check_teachers()
        seen: set[str] = set()
        for i, f in enumerate(self.fuse):
            if f.name in seen:
                raise ValueError(f"fuse[{i}].name: duplicate fuse name {f.name!r}")
            seen.add(f.name)
            for p in f.packs:
                if p not in self.sources:
                    raise ValueError(f"fuse[{i}].packs: no source {p!r}{suggest(p, self.sources)}")
            for p in f.packs:
                parent = self.sources[p].parent
                if parent is not None and parent not in f.packs:
                    raise ValueError(
                        f"fuse[{i}].packs: pack {p!r} is a delta on top of its parent {parent!r}, "
                        f"which must be fused with it; add {parent!r} to `packs`"
                    )
        self._check_lossless_packs()  # mergekit parity (issue 18)
        nodes = self.model_ids()
        seen = set()
        for i, e in enumerate(self.eval):
            if e.name in seen:
                raise ValueError(f"eval[{i}].name: duplicate eval name {e.name!r}")
            seen.add(e.name)
            for m in e.models:
                if m not in nodes:
                    raise ValueError(
                        f"eval[{i}].models: {m!r} is not a model node{suggest(m, nodes)}; "
                        f"models are: {sorted(nodes)}"
                    )
        self._check_releases()
        self._check_exports()
        return self

    def _check_exports(self) -> None:
        seen: set[str] = set()
        for i, x in enumerate(self.export):
            if x.name in seen:
                raise ValueError(f"export[{i}].name: duplicate export name {x.name!r}")
            seen.add(x.name)
            if x.pack not in self.sources:
                raise ValueError(
                    f"export[{i}].pack: no source {x.pack!r}{suggest(x.pack, self.sources)}"
                )

    def _check_lossless_packs(self) -> None:
        """Strategies that read the sources' models (slerp, linear…) need lossless packs: every
        role of their sources' compression profile ``exact`` (mergekit parity, issue 18)."""
        from graftbuild.fusion import get_strategy

        for i, f in enumerate(self.fuse):
            if not getattr(get_strategy(f.strategy), "needs_models", False):
                continue
            for p in f.packs:
                prof = self.profile(self.sources[p].compression)
                lossy = [r for r in ROLE_NAMES if getattr(prof, r)["method"] != "exact"]
                if lossy:
                    raise ValueError(
                        f"fuse[{i}].packs: {f.strategy!r} reads the sources' models, so pack "
                        f"{p!r} must be lossless, but its compression profile "
                        f"{self.sources[p].compression!r} compresses {lossy}; give it a profile "
                        "with every role `exact`"
                    )

    def _check_teachers(self) -> None:
        for name, src in self.sources.items():
            if src.transfer is None or src.transfer.teacher in self.teachers:
                continue
            if name in self.teachers:
                raise ValueError(
                    f"sources.{name}.transfer.teacher: a folder teacher gets the node "
                    f"teacher:{name}, which [teachers.{name}] already names; rename one"
                )

    def teacher_node(self, source: str) -> str:
        """The node id of the teacher of a transfer source: ``teacher:NAME`` for a `[teachers]`
        entry, ``teacher:SOURCE`` for a folder given by path."""
        t = self.sources[source].transfer
        assert t is not None
        return ids.teacher(t.teacher if t.teacher in self.teachers else source)

    def teacher_path(self, source: str) -> Path:
        """A folder teacher's path, resolved against the recipe's folder."""
        t = self.sources[source].transfer
        assert t is not None and t.teacher not in self.teachers
        path = self.root / Path(t.teacher).expanduser()
        resolved = path.resolve()
        if resolved != path:  # watched by the no-op record, like the paths resolved on load
            self._links[str(path)] = str(resolved)
        return resolved

    def source_model(self, name: str) -> str:
        """The node that produces a source's θ*: source:NAME, or sft:/dpo:NAME for transfer."""
        t = self.sources[name].transfer
        if t is None:
            return ids.source(name)
        return ids.dpo(name) if t.dpo is not None else ids.sft(name)

    def _check_releases(self) -> None:
        fuses, evals, seen = {f.name for f in self.fuse}, {e.name for e in self.eval}, set()
        for i, r in enumerate(self.release):
            if r.name in seen:
                raise ValueError(f"release[{i}].name: duplicate release name {r.name!r}")
            seen.add(r.name)
            fuse = r.fuse or r.name
            if fuse not in fuses:
                raise ValueError(
                    f"release[{i}].fuse: no [[fuse]] named {fuse!r}{suggest(fuse, fuses)}"
                )
            for e in r.evals or []:
                if e not in evals:
                    raise ValueError(f"release[{i}].evals: no eval {e!r}{suggest(e, evals)}")

    def release_evals(self, release: ReleaseSpec) -> list[EvalSpec]:
        """The evals a release shows and is gated by."""
        fuse_id = ids.fuse(release.fuse or release.name)
        if release.evals is not None:
            return [e for e in self.eval if e.name in release.evals]
        return [e for e in self.eval if fuse_id in e.models]

    def model_ids(self) -> set[str]:
        """Every node that is a model folder (what evals may name)."""
        out = {ids.BASE} | ({ids.BASE_INIT} if self.base.finetune is not None else set())
        for s, v in self.sources.items():
            if v.transfer is None:
                out.add(ids.source(s))
            else:
                out |= {ids.sft(s), self.teacher_node(s)}
                out |= {ids.dpo(s)} if v.transfer.dpo is not None else set()
        out |= {ids.fuse(f.name) for f in self.fuse if f.strategy != "routed"}
        return out | {ids.graft(p) for p in self.parents()}

    def chain(self, name: str) -> list[str]:
        """The packs a source's model is made of, root first, ending with ``name`` itself."""
        out = [name]
        while (parent := self.sources[out[-1]].parent) is not None:
            if parent in out:
                cycle = " -> ".join([*reversed(out), parent])
                raise ValueError(f"sources.{name}.parent: the parents form a cycle: {cycle}")
            out.append(parent)
        return out[::-1]

    def parents(self) -> list[str]:
        """Sources that another source names as its parent (each gets a ``graft:NAME`` model)."""
        return sorted({s.parent for s in self.sources.values() if s.parent is not None})

    def profile(self, name: str) -> CompressionProfile:
        return self.compression.get(name) or CompressionProfile()

    @property
    def root(self) -> Path:
        assert self.path is not None
        return self.path.parent


def suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
