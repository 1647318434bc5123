"""``graftbuild export peft``: the adapter loads in PEFT and equals the graft of its modules."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from helpers import make

from graftbuild.cli.app import main
from graftbuild.skillpack import PackReader

RECIPE = """
[project]
name = "peft"

[base]
path = "models/base"

[compression.default]
attn = { method = "lowrank", energy = 0.9 }

[sources.x]
path = "models/x"
"""


def test_peft_adapter_matches_the_graft_of_exported_modules(path_project: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path_project.write_text(RECIPE)
    result = make(path_project)
    pack_file = result.node("pack:x").output / "skillpack.safetensors"
    out = path_project.parent / "adapter"
    run = CliRunner().invoke(main, ["export", "peft", "x", str(out), "--recipe", str(path_project)])
    assert run.exit_code == 0, run.output
    assert "left out" in run.output and "embed_tokens" in run.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"

    base_dir = path_project.parent / "models" / "base"
    ids = torch.arange(1, 30).unsqueeze(0)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out)
    ).eval()

    reference = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    state = reference.state_dict()
    exported = set()
    with PackReader(pack_file) as reader:
        for name in reader.names():
            module = name.removesuffix(".weight")
            if module in cfg["target_modules"]:
                state[name] += reader.decode(name)
                exported.add(reader.entries[name]["codec"])
    reference.load_state_dict(state)
    assert exported == {"lowrank", "mixed"}  # attention and MLP modules both exported
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base_dir))(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # The same adapter from the pack file path.
    run = CliRunner().invoke(main, ["export", "peft", str(pack_file), str(out / "again")])
    assert run.exit_code == 0, run.output
    from safetensors.torch import load_file

    again = load_file(str(out / "again" / "adapter_model.safetensors"))
    first = load_file(str(out / "adapter_model.safetensors"))
    assert set(again) == set(first)
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_peft_export_of_unknown_pack_is_a_user_error(path_project: Path) -> None:
    run = CliRunner().invoke(main, ["export", "peft", "nope", "out", "--recipe", str(path_project)])
    assert run.exit_code == 2
    assert "neither a SkillPack file nor a pack" in run.output
