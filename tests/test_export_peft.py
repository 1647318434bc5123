"""``graftbuild export peft|bundle`` and ``[[export]]``: complete adapters per serving target.

Every pack exported for PEFT, loaded with ``PeftModel.from_pretrained`` onto the base, answers
like the graft graftbuild builds (base ⊕ pack), to 1e-3 of the logits' range, with nothing left
out: for a Llama-style decoder (the quickstart's codecs: pruned embedding and head, low-rank
attention, mixed-precision MLP, exact norms) and a BERT-style encoder (biases, LayerNorms).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import save_model
from helpers import engine, make, plan

from graftbuild.cli.app import main
from graftbuild.skillpack import PackReader

FUSES = """
[[fuse]]
name = "only_x"
packs = ["x"]

[[fuse]]
name = "only_y"
packs = ["y"]
"""

HELDOUT = "\n".join(f"the cat {i} sat on the mat {i * 7 % 13} times ." for i in range(40)) + "\n"


def run(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to 1e-3 of the reference's range."""
    span = float(want.max() - want.min())
    assert float((got - want).abs().max()) <= 1e-3 * span, float((got - want).abs().max())


def fused_model(folder: Path, cls: type) -> torch.nn.Module:
    return cls.from_pretrained(str(folder)).eval()


def test_every_quickstart_like_pack_exports_whole_for_peft(path_project: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = path_project.parent
    (root / "heldout.txt").write_text(HELDOUT)
    path_project.write_text(
        path_project.read_text()
        + FUSES
        + '\n[[eval]]\nname = "h"\nmodels = ["base"]\ndata = { x = "heldout.txt" }\n'
    )
    result = make(path_project)
    base_dir = root / "models" / "base"
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(base_dir))(input_ids=ids).logits
    for pack in ("x", "y"):
        out = root / f"adapter_{pack}"
        res = run("export", "peft", pack, out, "--recipe", path_project)
        assert res.exit_code == 0, res.output
        assert "left out" not in res.output and "base variant" not in res.output
        report = json.loads((out / "graftbuild-export.json").read_text())
        assert report["left_out"] == {} and report["base_variant"] == {}
        assert not (out / "base_variant.safetensors").exists()
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["task_type"] == "CAUSAL_LM"
        # every pack tensor is in the adapter: a LoRA module or a saved module
        with PackReader(result.node(f"pack:{pack}").output / "skillpack.safetensors") as r:
            modules = {n.rsplit(".", 1)[0] for n in r.names()}
            codecs = {r.entries[n]["codec"] for n in r.names()}
        tokens = set(cfg["trainable_token_indices"] or {})
        assert modules == set(cfg["target_modules"]) | set(cfg["modules_to_save"]) | tokens
        # the pruned embedding: LoRA or its changed rows, whichever is smaller; the head: LoRA
        assert "model.embed_tokens" in set(cfg["target_modules"]) | tokens
        assert "lm_head" in cfg["target_modules"]
        assert {"model.norm", "model.layers.0.input_layernorm"} <= set(cfg["modules_to_save"])

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out)
        ).eval()
        graft = fused_model(result.node(f"fuse:only_{pack}").output, AutoModelForCausalLM)
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, graft(input_ids=ids).logits
        assert float((want - plain).abs().max()) > 0.05  # the pack does something
        close(got, want)
        card = (out / "README.md").read_text()
        assert result.node(f"pack:{pack}").output_hash in card
        assert "| target | peft:" in card
        if pack == "x":
            assert codecs == {"prune", "lowrank", "mixed", "exact"}
            assert report["quality"]["data"] == "heldout.txt"
            assert abs(report["quality"]["kept"] - 1.0) < 0.01, report["quality"]
            assert "adapter alone | 100.0%" in card or "adapter alone | 99." in card


TINY_BERT = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
}


def make_bert(folder: Path, seed: int) -> dict:
    from transformers import AutoConfig, AutoModel

    cfg = dict(TINY_BERT)
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_model(folder, state, config=TINY_BERT)
    return state


BERT_RECIPE = """
[project]
name = "bert"

[base]
path = "models/base"

[compression.default]
attn = { method = "lowrank", energy = 0.9 }

[sources.x]
path = "models/x"

[[fuse]]
name = "only_x"
packs = ["x"]
"""


def test_an_encoder_exports_whole_with_its_task_type(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    state = make_bert(tmp_path / "models" / "base", seed=0)
    g = torch.Generator().manual_seed(5)
    tuned = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in state.items()
    }
    save_model(tmp_path / "models" / "x", tuned, config=TINY_BERT)
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(BERT_RECIPE)
    (tmp_path / "heldout.txt").write_text(HELDOUT)
    result = make(recipe)
    out = tmp_path / "adapter"
    res = run("export", "peft", "x", out, "--recipe", recipe, "--data", tmp_path / "heldout.txt")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "FEATURE_EXTRACTION"
    assert cfg["lora_bias"] is True  # BERT's bias deltas ride in lora_B.bias
    # ... so the embeddings (PEFT has no lora_bias on them) are stored as their changed rows
    assert set(cfg["trainable_token_indices"]) == {
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "embeddings.token_type_embeddings",
    }
    report = json.loads((out / "graftbuild-export.json").read_text())
    assert report["left_out"] == {} and report["base_variant"] == {}

    base_dir = tmp_path / "models" / "base"
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_dir)), str(out)).eval()
    graft = fused_model(result.node("fuse:only_x").output, AutoModel)
    plain = AutoModel.from_pretrained(str(base_dir)).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
        want = graft(input_ids=ids).last_hidden_state
        before = plain(input_ids=ids).last_hidden_state
    assert float((want - before).abs().max()) > 0.05
    close(got, want)
    assert abs(report["quality"]["kept"] - 1.0) < 0.01

    # vLLM serves no LoRA on BERT: refused, naming the architecture
    res = run("export", "peft", "x", tmp_path / "v", "--recipe", recipe, "--target", "vllm")
    assert res.exit_code == 2 and "BertModel" in res.output, res.output


def test_a_vllm_adapter_follows_vllms_rules(path_project: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    make(path_project)
    out = path_project.parent / "vllm"
    res = run(
        "export", "peft", "x", out, "--recipe", path_project, "--target", "vllm", "--max-rank", 4
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and cfg["bias"] == "none" and not cfg["lora_bias"]
    assert cfg["r"] <= 4 and cfg["lora_alpha"] == cfg["r"]
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for m in cfg["target_modules"]:
        assert m.rsplit(".", 1)[-1] in linears | {"embed_tokens", "lm_head"}, m
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for k, t in tensors.items():
        kinds = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
        assert k.endswith(kinds), k
        rank = t.shape[0] if "lora_A" in k or "embedding_A" in k else t.shape[1]
        assert rank <= 4, k
    report = json.loads((out / "graftbuild-export.json").read_text())
    assert report["modules"]["model.layers.0.mlp.down_proj"]["error"] > 0  # cut to the cap
    # the norms vLLM cannot carry are in the base variant, named, not dropped
    assert "model.norm.weight" in report["base_variant"]
    assert "model.norm.weight" in load_file(str(out / "base_variant.safetensors"))
    assert "base variant" in res.output and "model.norm.weight" in res.output
    # PEFT loads it too
    base_dir = path_project.parent / "models" / "base"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out))
    # re-exported for PEFT into the same folder: no stale base variant is left beside it
    assert run("export", "peft", "x", out, "--recipe", path_project).exit_code == 0
    assert not (out / "base_variant.safetensors").exists()
    # a folder that is not an export is never written into
    (path_project.parent / "mine").mkdir()
    (path_project.parent / "mine" / "notes.txt").write_text("keep")
    res = run("export", "peft", "x", path_project.parent / "mine", "--recipe", path_project)
    assert res.exit_code == 2 and "not a graftbuild export" in res.output


def test_an_unmeetable_target_is_exit_2_naming_the_modules(path_project: Path) -> None:
    make(path_project)
    args = ("export", "peft", "x", path_project.parent / "a", "--recipe", path_project)
    res = run(*args, "--target", "vllm", "--extras", "refuse")
    assert res.exit_code == 2
    assert "model.layers.0.input_layernorm.weight" in res.output and "vllm" in res.output
    res = run(*args, "--target", "vllm", "--max-rank", "1", "--max-error", "0.05")
    assert res.exit_code == 2
    assert "model.layers.0.mlp.down_proj" in res.output and "--max-error" in res.output
    res = run(*args, "--target", "vllm", "--max-rank", "600")
    assert res.exit_code == 2 and "512" in res.output
    res = run(*args, "--target", "lorax", "--extras", "refuse")
    assert res.exit_code == 2 and "model.embed_tokens.weight" in res.output


ROUTED = """
[[fuse]]
name = "skills"
packs = ["x", "y"]
strategy = "routed"
weights = { y = 0.5 }
# random-perturbation packs: each domain to its own pack (the mix is an option all the same)
options = { prompts = { x = "px.txt", y = "py.txt" }, samples = 16, select = "domain" }
"""


def test_a_routed_bundle_exported_for_peft_answers_like_grafted_model(
    path_project: Path,
) -> None:
    from graftbuild.runtime import GraftedModel

    root = path_project.parent
    (root / "px.txt").write_text("".join(f"{i} + {i} = {2 * i}\n" for i in range(16)))
    (root / "py.txt").write_text("".join(f"def f{i}(x): return x\n" for i in range(16)))
    path_project.write_text(path_project.read_text() + ROUTED)
    result = make(path_project, ["fuse:skills"])
    out = root / "bundle"
    res = run("export", "bundle", "skills", out, "--recipe", path_project)
    assert res.exit_code == 0, res.output
    assert {p.name for p in (out / "adapters").iterdir()} == {"x", "y", "x+y"}
    readme = (out / "README.md").read_text()
    assert "--lora-modules x=adapters/x y=adapters/y x+y=adapters/x+y" in readme

    spec = importlib.util.spec_from_file_location("serve_peft", out / "serve_peft.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    bundle = result.node("fuse:skills").output
    server = module.BundleServer(bundle / "base", out)
    grafted = GraftedModel.from_pretrained(bundle)
    prompts = ["3 + 3 = 6", "def f2(x): return x", "7 + 1 = 8", "def g(x): return x"]
    routes = grafted.route(prompts)
    assert [[a] if a else [] for a in server.route(prompts)] == routes
    assert {r[0] for r in routes if r} == {"x", "y"}  # both adapters are exercised
    for got, want in zip(server.decide(prompts), grafted.decide(prompts), strict=True):
        assert got.option == want.option and abs(got.confidence - want.confidence) < 1e-5
    for prompt, packs in zip(prompts, routes, strict=True):
        ids = grafted.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad(), grafted.using(packs):
            want = grafted(input_ids=ids).logits
        close(server.logits(prompt, packs[0] if packs else None), want)
    # the base alone, through the same server
    ids = grafted.tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad(), grafted.using(None):
        close(server.logits(prompts[0], None), grafted(input_ids=ids).logits)
    # the mix the router may choose is an adapter of its own, the packs folded together
    meta = json.loads((out / "router.json").read_text())
    assert meta["options"] == {"base": None, "x": "x", "y": "y", "x+y": "x+y"}
    with torch.no_grad(), grafted.using(["x", "y"]):
        close(server.logits(prompts[0], "x+y"), grafted(input_ids=ids).logits)
    grafted.close()

    res = run("export", "bundle", "skills", root / "b2", "--recipe", path_project, "--target",
              "vllm")  # fmt: skip
    assert res.exit_code == 2 and "input_layernorm" in res.output  # norms: refused by default
    res = run("export", "bundle", "skills", root / "b3", "--recipe", path_project, "--target",
              "vllm", "--extras", "drop", "--max-rank", "8")  # fmt: skip
    assert res.exit_code == 0, res.output
    for name in ("x", "y"):
        cfg = json.loads((root / "b3" / "adapters" / name / "adapter_config.json").read_text())
        assert cfg["modules_to_save"] is None and cfg["r"] <= 8
        card = (root / "b3" / "adapters" / name / "README.md").read_text()
        assert "left out on request" in card and "model.norm.weight" in card


EXPORT_NODE = """
[[export]]
name = "xv"
pack = "x"
target = "vllm"
max_rank = 8
"""


def test_export_is_a_cached_node_rebuilt_only_when_its_pack_changes(path_project: Path) -> None:
    from safetensors.torch import load_file

    path_project.write_text(path_project.read_text() + EXPORT_NODE)
    first = make(path_project)
    node = first.node("export:xv")
    assert node.action == "built"
    out = path_project.parent / "out" / "exports" / "xv"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] <= 8 and cfg["modules_to_save"] is None
    lock = json.loads(path_project.with_suffix(".lock").read_text())
    assert "export:xv" in json.dumps(lock)
    assert make(path_project).node("export:xv").action == "reused"
    assert engine(path_project).make(None, locked=True).node("export:xv").action == "reused"

    models = path_project.parent / "models"
    y = load_file(str(models / "y" / "model.safetensors"))
    y["model.norm.weight"] = y["model.norm.weight"] + 0.5  # another pack changes
    save_model(models / "y", y, config_from=models / "base")
    assert plan(path_project)["export:xv"].state == "fresh"
    x = load_file(str(models / "x" / "model.safetensors"))
    x["model.norm.weight"] = x["model.norm.weight"] + 0.5  # its pack changes
    save_model(models / "x", x, config_from=models / "base")
    assert plan(path_project)["export:xv"].state == "stale"
    again = make(path_project)
    assert again.node("export:xv").action == "built"


def test_export_of_unknown_pack_is_a_user_error(path_project: Path) -> None:
    res = run("export", "peft", "nope", "out", "--recipe", path_project)
    assert res.exit_code == 2
    assert "neither a SkillPack file nor a pack" in res.output
    path_project.write_text(path_project.read_text() + '[[export]]\nname = "e"\npack = "z"\n')
    res = run("plan", path_project)
    assert res.exit_code == 2 and "export[0].pack" in res.output


def test_a_pack_file_exports_without_a_base(path_project: Path, tmp_path: Path) -> None:
    result = make(path_project, ["pack:x"])
    pack_file = result.node("pack:x").output / "skillpack.safetensors"
    shutil.copyfile(pack_file, tmp_path / "x.safetensors")
    res = run("export", "peft", tmp_path / "x.safetensors", tmp_path / "a")
    assert res.exit_code == 0, res.output
    # no base: norms cannot be saved as modules, so they go to the base variant, named
    assert "base variant" in res.output and "model.norm.weight" in res.output


def test_a_tied_head_gets_the_embeddings_delta(tmp_path: Path) -> None:
    """A tied checkpoint stores the shared weight once; the graft's head moves with the
    embedding, and so must the adapter's (PEFT's embedding LoRA changes only the lookup)."""
    from conftest import TINY_LLAMA, TOKENIZER
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_LLAMA, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    base_dir, x_dir = tmp_path / "models" / "base", tmp_path / "models" / "x"
    model.save_pretrained(str(base_dir))
    shutil.copytree(TOKENIZER, base_dir, dirs_exist_ok=True)
    state = load_file(str(base_dir / "model.safetensors"))
    assert "lm_head.weight" not in state
    g = torch.Generator().manual_seed(1)
    shutil.copytree(base_dir, x_dir)
    save_file(
        {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()},
        str(x_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(
        '[project]\nname = "t"\n[base]\npath = "models/base"\n[sources.x]\npath = "models/x"\n'
        '[[fuse]]\nname = "only_x"\npacks = ["x"]\n'
    )
    result = make(recipe)
    out = tmp_path / "adapter"
    res = run("export", "peft", "x", out, "--recipe", recipe)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "graftbuild-export.json").read_text())
    assert report["modules"]["lm_head"]["from"].startswith("tied to model.embed_tokens")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out)
    ).eval()
    graft = fused_model(result.node("fuse:only_x").output, AutoModelForCausalLM)
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():
        close(peft_model(input_ids=ids).logits, graft(input_ids=ids).logits)


TINY_GPT2 = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 512,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def test_gpt2_conv1d_modules_export_transposed(tmp_path: Path) -> None:
    """GPT-2 stores its projections as Conv1D ([in, out]); biases and the tied head too."""
    from conftest import make_base, make_source
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make_base(tmp_path / "models" / "base", config=TINY_GPT2)
    make_source(tmp_path / "models" / "x", tmp_path / "models" / "base", seed=4)
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(BERT_RECIPE)
    result = make(recipe)
    out = tmp_path / "adapter"
    res = run("export", "peft", "x", out, "--recipe", recipe)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "graftbuild-export.json").read_text())
    assert report["left_out"] == {} and report["base_variant"] == {}
    assert "transformer.h.0.attn.c_attn" in report["modules"]
    base_dir = tmp_path / "models" / "base"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out)
    ).eval()
    graft = fused_model(result.node("fuse:only_x").output, AutoModelForCausalLM)
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():
        close(model(input_ids=ids).logits, graft(input_ids=ids).logits)
