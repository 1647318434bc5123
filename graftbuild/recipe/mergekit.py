"""mergekit YAML -> a graftbuild recipe that builds the same model (``graftbuild import mergekit``).

How a mergekit config maps (docs/FUSION.md, "mergekit configs"):

- ``base_model`` is the recipe's base; every other model is a ``path`` source with a lossless
  (all-``exact``) profile, so a pack's Δ̂ is the source's delta exactly and θ + Δ̂ is the source.
- Methods whose inputs include the base as a model (``linear``, ``karcher``, ``passthrough``, and
  ``nuslerp``/``multislerp`` without a base) get it as a source of its own (a zero delta);
  without ``base_model`` the first model is the base.
- ``parameters`` -> ``options``; each model's ``parameters`` -> ``pack_options``; values,
  gradients and ``{filter, value}`` lists are copied as they are (TOML holds them alike).
- ``slices`` whose one slice spans its models' every layer is the same as ``models``; other
  slicings (layer stacking) become the fuse's ``slices`` (per-slice parameters are an error).
- Model references: a folder that exists (relative to the config's folder, then the working
  folder) stays a path; otherwise a hub id is looked up in the local Hugging Face cache, offline.

Anything else (an unknown key, a LoRA reference ``model+lora``, ``tokenizer_source: union``,
``modules``…) is a ``UserError`` naming the key: never a silent approximation.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from graftbuild.errors import UserError

TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
}
# Methods whose inputs are all the models, the base among them when given.
ALL_INPUTS = {"linear", "karcher", "passthrough"}
BASE_OPTIONAL = {"nuslerp", "multislerp"}
EXACT_PROFILE = {r: "exact" for r in ("embed", "head", "attn", "mlp", "norm", "other")}


def hf_cache_dirs() -> list[Path]:
    env = os.environ
    out = []
    if env.get("HF_HUB_CACHE"):
        out.append(Path(env["HF_HUB_CACHE"]))
    if env.get("HUGGINGFACE_HUB_CACHE"):
        out.append(Path(env["HUGGINGFACE_HUB_CACHE"]))
    home = Path(env.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    out.append(home / "hub")
    return out


def from_hf_cache(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of a hub model in the local cache (no network), or None."""
    folder = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs():
        root = cache / folder
        if not root.is_dir():
            continue
        ref = root / "refs" / (revision or "main")
        snap = ref.read_text().strip() if ref.is_file() else revision
        if snap and (root / "snapshots" / snap / "config.json").is_file():
            return root / "snapshots" / snap
    return None


def resolve_model(ref: Any, key: str, config_dir: Path) -> Path:
    """A model reference as a local folder, or a UserError naming the key and the id."""
    if not isinstance(ref, str) or not ref:
        raise UserError(f"{key}: expected a model path or hub id (got {ref!r})")
    if "+" in ref:
        raise UserError(f"{key}: {ref!r}: LoRA references (model+lora) are not supported")
    for cand in (config_dir / ref, Path.cwd() / ref, Path(ref).expanduser()):
        if (cand / "config.json").is_file():
            return cand.resolve()
    repo, _, revision = ref.partition("@")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        hit = from_hf_cache(repo, revision or None)
        if hit is not None:
            return hit
        raise UserError(
            f"{key}: {ref!r} is not a local model folder and not in the local Hugging Face "
            "cache (graftbuild reads hub models offline; download it first)"
        )
    raise UserError(f"{key}: {ref!r} is not a model folder (no config.json)")


def num_layers(folder: Path) -> int:
    from graftbuild.fusion.schedule import num_layers_of

    return num_layers_of(json.loads((folder / "config.json").read_text()))


def _inputs(cfg: dict[str, Any], config_dir: Path) -> tuple[list[dict[str, Any]], dict | None]:
    """[(model ref, its parameters, key)] and the slice-level parameters, from models/slices."""
    models, slices = cfg.get("models"), cfg.get("slices")
    if (models is None) == (slices is None):
        raise UserError("give exactly one of `models` or `slices`")
    if models is not None:
        if not isinstance(models, list) or not models:
            raise UserError("models: expected a list of { model, parameters }")
        out = []
        for i, m in enumerate(models):
            if not isinstance(m, dict) or "model" not in m:
                raise UserError(f"models[{i}]: expected {{ model: ..., parameters: ... }}")
            extra = sorted(set(m) - {"model", "parameters"})
            if extra:
                raise UserError(f"models[{i}].{extra[0]}: not a mergekit model key")
            out.append(
                {"ref": m["model"], "params": m.get("parameters") or {}, "key": f"models[{i}]"}
            )
        return out, None
    if not isinstance(slices, list) or not slices:
        raise UserError("slices: expected a list of { sources: [...] }")
    out = []
    for j, s in enumerate(slices):
        if not isinstance(s, dict):
            raise UserError(f"slices[{j}]: expected {{ sources: [...] }}")
        extra = sorted(set(s) - {"sources", "parameters"})
        if extra:
            raise UserError(f"slices[{j}].{extra[0]}: not supported by the importer")
        if not s.get("sources"):
            raise UserError(f"slices[{j}].sources: empty")
        for i, src in enumerate(s["sources"]):
            key = f"slices[{j}].sources[{i}]"
            extra = sorted(set(src) - {"model", "layer_range", "parameters"})
            if extra:
                raise UserError(f"{key}.{extra[0]}: not a mergekit slice source key")
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
                raise UserError(f"{key}.layer_range: expected [start, end] (got {lr!r})")
            out.append(
                {
                    "ref": src.get("model"),
                    "params": src.get("parameters") or {},
                    "key": key,
                    "layer_range": list(lr),
                    "slice": j,
                }
            )
    whole = len(slices) == 1
    if whole:
        for m in out:
            n = num_layers(resolve_model(m["ref"], f"{m['key']}.model", config_dir))
            whole = whole and m["layer_range"] == [0, n]
    if whole:  # one slice over every layer: the same as `models`
        return out, slices[0].get("parameters") or None
    for j, s in enumerate(slices):
        if s.get("parameters"):
            raise UserError(
                f"slices[{j}].parameters: per-slice parameters are not supported with layer "
                "stacking; set them in the top-level `parameters`"
            )
    return out, {"__stack__": True}


def source_name(path: Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", path.name).strip("_") or "model"
    if path.parent.name.startswith("models--") or path.parent.name == "snapshots":
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", path.parent.parent.name.removeprefix("models--"))
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def convert(config_path: Path, seed: int | None = None) -> dict[str, Any]:
    """The recipe (as TOML-ready data) that builds what ``config_path`` merges."""
    import yaml

    from graftbuild.fusion import STRATEGIES, get_strategy
    from graftbuild.fusion.schedule import MergeParams

    try:
        cfg = yaml.safe_load(config_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{config_path}: no such file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{config_path}: invalid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{config_path}: expected a mergekit config (a mapping)")
    where = f"{config_path}: "
    try:
        return _convert(cfg, config_path, seed, STRATEGIES, get_strategy, MergeParams)
    except UserError as e:
        raise UserError(where + str(e)) from None


def _convert(cfg, config_path, seed, strategies, get_strategy, merge_params) -> dict[str, Any]:
    config_dir = config_path.parent.resolve()
    for key in cfg:
        if key not in TOP_KEYS:
            raise UserError(f"{key}: not supported by the importer")
    method = cfg.get("merge_method")
    strategy = strategies.get(method) if isinstance(method, str) else None
    if strategy is None or not issubclass(strategy.Params, merge_params):
        raise UserError(f"merge_method: {method!r} is not one of mergekit's methods graftbuild has")
    inputs, slice_params = _inputs(cfg, config_dir)
    stacked = None
    for m in inputs:
        m["path"] = resolve_model(m["ref"], f"{m['key']}.model", config_dir)
    if slice_params and slice_params.get("__stack__"):  # layer stacking: fuse `slices`
        slice_params, stacked = None, inputs
        inputs = []
        for m in stacked:
            same = next((u for u in inputs if u["path"] == m["path"]), None)
            if same is None:
                inputs.append(dict(m))
            elif m["params"] and m["params"] != same["params"]:
                if same["params"]:
                    raise UserError(
                        f"{m['key']}.parameters: the same model has other parameters in "
                        f"{same['key']}; graftbuild keeps one set per model"
                    )
                same["params"] = m["params"]
    base_ref = cfg.get("base_model")
    base = resolve_model(base_ref, "base_model", config_dir) if base_ref is not None else None
    options: dict[str, Any] = dict(cfg.get("parameters") or {})
    if slice_params:
        options |= slice_params  # a slice's parameters win over the config's
    for k in ("dtype", "out_dtype"):
        if cfg.get(k) is not None:
            options[k] = cfg[k]

    if method in ALL_INPUTS or (method in BASE_OPTIONAL and base is None):
        if base is not None and all(m["path"] != base for m in inputs):
            inputs.append({"ref": base_ref, "params": {}, "key": "base_model", "path": base})
        if method in BASE_OPTIONAL:
            options["use_base"] = False
        base = base or inputs[0]["path"]
        packs = inputs
    else:
        if base is None:
            raise UserError(f"base_model: {method!r} needs a base model")
        packs = [m for m in inputs if m["path"] != base]
    if seed is not None and getattr(strategy.Params, "RANDOM", False):
        options["seed"] = seed

    taken: set[str] = set()
    sources: dict[str, Any] = {}
    pack_options: dict[str, Any] = {}
    shared = {p.name for p in strategy.Params.SPEC if p.scope == "shared"}
    for m in packs:
        name = source_name(m["path"], taken)
        m["name"] = name
        sources[name] = {"path": str(m["path"]), "compression": "exact"}
        params = m["params"]
        if not isinstance(params, dict):
            raise UserError(f"{m['key']}.parameters: expected a mapping")
        for k in params:
            if k in shared:
                raise UserError(
                    f"{m['key']}.parameters.{k}: {k!r} is one value for all models (mergekit "
                    "ignores it here); move it to the top-level `parameters`"
                )
        if params:
            pack_options[name] = dict(params)

    tok = cfg.get("tokenizer_source")
    tokenizer_source = "base"
    if tok is not None and tok != "base":
        if tok == "union":
            raise UserError("tokenizer_source: 'union' (a merged vocabulary) is not supported")
        path = resolve_model(tok, "tokenizer_source", config_dir)
        match = [m["name"] for m in packs if m["path"] == path]
        if path == base:
            pass
        elif not match:
            raise UserError(f"tokenizer_source: {tok!r} is not one of the merged models")
        else:
            tokenizer_source = match[0]

    fuse: dict[str, Any] = {
        "name": re.sub(r"[^A-Za-z0-9_-]+", "_", config_path.stem) or "merged",
        "packs": [m["name"] for m in packs],
        "strategy": method,
        "options": options,
    }
    if stacked is not None:
        name_of = {str(m["path"]): m["name"] for m in packs}
        layout: list[dict[str, Any]] = []
        for m in stacked:
            if m["slice"] == len(layout):
                layout.append({"sources": []})
            model = name_of.get(str(m["path"]), "base")
            layout[-1]["sources"].append({"model": model, "layer_range": m["layer_range"]})
        fuse["slices"] = layout
    if tokenizer_source != "base":
        fuse["tokenizer_source"] = tokenizer_source
    if pack_options:
        fuse["pack_options"] = pack_options
    return {
        "project": {"name": fuse["name"]},
        "base": {"path": str(base)},
        "compression": {"exact": dict(EXACT_PROFILE)},
        "sources": sources,
        "fuse": [fuse],
    }


# --- a small TOML writer (the standard library reads TOML, but does not write it) -------------


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_value(e) for e in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(e)}" for k, e in v.items()) + " }"
    if v is None:
        raise UserError("a null value cannot be written to TOML")
    raise UserError(f"cannot write {v!r} to TOML")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(recipe: dict[str, Any], header: str = "") -> str:
    lines = [header] if header else []
    for table in ("project", "base"):
        lines += [f"[{table}]", *(f"{_key(k)} = {_value(v)}" for k, v in recipe[table].items()), ""]
    for name, prof in recipe["compression"].items():
        lines += [f"[compression.{_key(name)}]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in prof.items()] + [""]
    for name, src in recipe["sources"].items():
        lines += [f"[sources.{_key(name)}]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in src.items()] + [""]
    for f in recipe["fuse"]:
        lines.append("[[fuse]]")
        for k, v in f.items():
            if k not in ("pack_options", "slices"):
                lines.append(f"{_key(k)} = {_value(v)}")
        lines.append("")
        for sl in f.get("slices", []):
            lines.append("[[fuse.slices]]")
            lines.append(f"sources = {_value(sl['sources'])}")
            lines.append("")
        for pack, opts in f.get("pack_options", {}).items():
            lines.append(f"[fuse.pack_options.{_key(pack)}]")
            lines += [f"{_key(k)} = {_value(v)}" for k, v in opts.items()] + [""]
    return "\n".join(lines)
