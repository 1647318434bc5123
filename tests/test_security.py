"""No code from a model ever runs: no unpickling, no remote code, recipe values are data.
(Pickle-only folders, booby-trapped, are in test_bad_inputs.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from graftbuild.cli.app import main

PACKAGE = Path(__file__).resolve().parents[1] / "graftbuild"


def sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize(
    "pattern",
    [
        r"torch\.load\(",
        r"\bpickle\b\.",
        r"import pickle",
        r"trust_remote_code\s*=\s*True",
        r"(?<![.\w])eval\(",
        r"(?<![.\w])exec\(",
        r"yaml\.load\(",
        r"shell\s*=\s*True",
    ],
)
def test_no_code_executing_loader_in_the_package(pattern: str) -> None:
    hits = [name for name, text in sources().items() if re.search(pattern, text)]
    assert hits == []


def test_every_hugging_face_load_is_local_and_refuses_remote_code() -> None:
    calls = [
        (name, text[m.start() : m.start() + 300])
        for name, text in sources().items()
        for m in re.finditer(r"\.from_pretrained\(", text)  # calls, not definitions
    ]
    assert calls  # the scan looks at the real loaders
    for name, call in calls:
        assert "trust_remote_code=False" in call and "local_files_only=True" in call, name


EVIL = """
from pathlib import Path
Path({trap!r}).write_text("remote code ran")
"""


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_remote_code_in_a_model_folder_never_runs(path_project: Path, model_type: str) -> None:
    root = path_project.parent
    trap = root / "remote_code_ran"
    folder = root / "models" / "x"
    (folder / "evil.py").write_text(EVIL.format(trap=str(trap)))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.Tokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    (root / "a.txt").write_text("".join(f"{i} + {i} = {2 * i}\n" for i in range(40)))
    with open(path_project, "a") as f:
        f.write('\n[[eval]]\nname = "e"\nmodels = ["source:x"]\ndata = { a = "a.txt" }\n')
        f.write("seq_len = 16\n")

    result = CliRunner().invoke(main, ["make", str(path_project)])
    if model_type == "llama":  # a known architecture: transformers' own code, auto_map ignored
        assert result.exit_code == 0, result.stderr
    else:  # an architecture only the folder's code knows: refused, one line (by pre-flight:
        # its model type is not the base's)
        assert result.exit_code == 2
        assert str(folder) in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not trap.exists()


def test_recipe_strings_are_data(path_project: Path) -> None:
    root = path_project.parent
    trap = root / "evaluated"
    code = f"__import__('pathlib').Path({str(trap)!r}).write_text('x')"
    text = path_project.read_text().replace('name = "t"', f'name = "{code}"')
    text = text.replace('name = "release"', 'name = "$(touch evaluated)"')
    path_project.write_text(text)
    result = CliRunner().invoke(main, ["make", str(path_project)])
    assert result.exit_code == 0, result.stderr
    assert not trap.exists() and not (root / "evaluated").exists()
    assert (root / "out" / "fused" / "$(touch evaluated)" / "model.safetensors").is_file()
