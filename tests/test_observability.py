"""A build you can watch, script and read: progress when captured, the summary, --json on success
and failure, --events, inspect --plot and the HTML report (opened in headless Chromium)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from graftbuild.cli.app import main
from graftbuild.progress import EventSink, Reporter
from tests.conftest import make_nan_source

QUICKSTART_NODES = {
    "base:init", "base", "source:arith", "source:code", "source:lang", "pack:arith",
    "pack:code", "pack:lang", "fuse:release", "fuse:skills", "eval:skills", "release:release",
}  # fmt: skip


@pytest.fixture(scope="module")
def qs(quickstart_build: dict) -> dict:
    assert quickstart_build["code"] == 0, quickstart_build["stderr"][-3000:]
    return quickstart_build


# -- progress ---------------------------------------------------------------------------------


def test_captured_build_shows_progress_while_training_and_packing(qs: dict) -> None:
    err = qs["stderr"].splitlines()
    # training: step i/n with the loss and an ETA, before the node is reported built
    done = err.index(next(line for line in err if line.startswith("built source:arith")))
    steps = [
        line
        for line in err[:done]
        if re.match(r"train source:arith: step \d+/150 \(\d+%\), loss [\d.]+", line)
    ]
    assert steps and steps[-1].startswith("train source:arith: step 150/150 (100%)")
    assert any("ETA" in line for line in steps[:-1]), "no line while the step was running"
    losses = [float(re.search(r"loss ([\d.]+)", line).group(1)) for line in steps]  # type: ignore[union-attr]
    assert losses[-1] < losses[0]  # the loss goes down as it trains
    # packing: tensors done and bytes written
    pack = [line for line in err if line.startswith("pack pack:code: tensor ")]
    assert pack and re.match(
        r"pack pack:code: tensor (\d+)/\1 \(100%\), [\d.]+ KiB written", pack[-1]
    )


def test_captured_build_ends_with_a_summary_table(qs: dict) -> None:
    err = qs["stderr"]
    head = next(line for line in err.splitlines() if line.startswith("node "))
    assert head.split() == ["node", "action", "time", "written", "peak", "RSS", "output"]
    rows = {
        line.split()[0]: line.split() for line in err.splitlines()[err.splitlines().index(head) :]
    }
    for node in QUICKSTART_NODES:
        assert rows[node][1] == "built", rows[node]
    total = rows["total"]
    assert total[1:3] == ["12", "nodes"]
    assert re.search(r"built 12, reused 0; [\d.]+ MiB written", err)


def test_json_ends_with_one_object_describing_every_node(qs: dict) -> None:
    last = json.loads(qs["stdout"].strip().splitlines()[-1])
    assert last["ok"] is True and "error" not in last
    assert set(last["built"]) == QUICKSTART_NODES and last["failed"] == []
    nodes = {n["id"]: n for n in last["nodes"]}
    assert set(nodes) == QUICKSTART_NODES
    for n in nodes.values():
        assert n["action"] == "built" and n["seconds"] > 0
        assert n["bytes"] > 0 and n["peak_rss"] > 10 * 2**20, n
    assert last["totals"]["bytes"] == sum(n["bytes"] for n in nodes.values())
    assert last["totals"]["actions"] == {"built": 12}


def test_events_are_json_lines_covering_every_node(qs: dict) -> None:
    events = [json.loads(line) for line in qs["events"]]
    assert events[0]["event"] == "plan" and set(events[0]["nodes"]) == QUICKSTART_NODES
    assert events[-1]["event"] == "summary" and events[-1]["ok"] is True
    for kind in ("started", "finished"):
        assert {e["node"] for e in events if e["event"] == kind} == QUICKSTART_NODES
    progress = [e for e in events if e["event"] == "progress" and e["node"] == "source:arith"]
    assert progress[-1]["done"] == progress[-1]["total"] == 150
    assert all("loss" in e and e["unit"] == "step" for e in progress)
    packed = [e for e in events if e["event"] == "progress" and e["node"] == "pack:arith"][-1]
    assert packed["unit"] == "tensor" and packed["bytes"] > 0
    # each node's events in order: started, progress..., finished
    order = [e["event"] for e in events if e.get("node") == "pack:arith"]
    assert order[0] == "started" and order[-1] == "finished" and "progress" in order


def test_reporter_lines_and_quiet() -> None:
    buf = io.StringIO()
    rep = Reporter(Console(file=buf, width=200), interval=0.0)
    with rep.task("train n", 3, unit="step") as advance:
        for loss in (3.0, 2.0, 1.0):
            advance(1, loss=loss)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("train n: step 1/3 (33%), loss 3, ") and "ETA" in lines[0]
    assert lines[-1].startswith("train n: step 3/3 (100%), loss 1 (first 3), ")
    tty = io.StringIO()
    rep = Reporter(Console(file=tty, force_terminal=True, width=150))
    with rep.task("train n", 3, unit="step") as advance:
        for loss in (3.0, 2.0, 1.0):
            advance(1, loss=loss)
    assert "3/3" in tty.getvalue() and "loss 1 █▄▁" in tty.getvalue()  # bar, loss, its curve
    quiet = io.StringIO()
    events = io.StringIO()
    rep = Reporter(Console(file=quiet, quiet=True), events=EventSink(events), interval=0.0)
    with rep.task("pack p", 2, unit="tensor") as advance:
        advance(1, bytes=10)
        advance(1, bytes=5)
    rep.log("a line")
    assert quiet.getvalue() == ""  # -q: nothing on the console
    last = json.loads(events.getvalue().splitlines()[-1])
    assert (last["done"], last["bytes"], last["unit"]) == (2, 15, "tensor")


def test_quiet_make_prints_nothing(path_project: Path) -> None:
    r = CliRunner().invoke(main, ["make", str(path_project), "-q"])
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


# -- failures ---------------------------------------------------------------------------------


@pytest.fixture
def failing_project(path_project: Path) -> Path:
    """pack:bad fails: its source holds a NaN (pre-flight lets it through: same architecture)."""
    models = path_project.parent / "models"
    make_nan_source(models / "bad", models / "x")
    text = path_project.read_text().replace('packs = ["x", "y"]', 'packs = ["x", "bad"]')
    text = text.replace("weights = { x = 1.0, y = 0.5 }", "weights = { x = 1.0 }")
    path_project.write_text(text + '\n[sources.bad]\npath = "models/bad"\n')
    return path_project


def test_json_and_events_on_a_failed_build(failing_project: Path, tmp_path: Path) -> None:
    events = tmp_path / "ev.jsonl"
    r = CliRunner().invoke(main, ["make", str(failing_project), "--json", "--events", str(events)])
    assert r.exit_code == 2
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["ok"] is False and last["failed"] == ["pack:bad"]
    assert last["error"]["node"] == "pack:bad" and last["error"]["exit_code"] == 2
    assert last["error"]["message"].startswith("pack:bad: ")
    assert "base" in last["built"]  # what finished before the failure is reported
    # the one error line names the node that was running
    assert r.stderr.strip().splitlines()[-1].startswith("error: pack:bad: ")
    # the summary table shows the failure
    assert re.search(r"^pack:bad\s+failed", r.stderr, re.M)
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    failed = [e for e in lines if e["event"] == "failed"]
    assert [e["node"] for e in failed] == ["pack:bad"] and failed[0]["exit_code"] == 2
    assert lines[-1]["event"] == "summary" and lines[-1]["error"]["node"] == "pack:bad"


def test_json_on_an_input_error(path_project: Path) -> None:
    path_project.write_text(path_project.read_text().replace('path = "models/y"', 'path = "no"'))
    r = CliRunner().invoke(main, ["make", str(path_project), "--json"])
    assert r.exit_code == 2
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["ok"] is False and last["error"]["exit_code"] == 2
    assert "not found" in last["error"]["message"]
    assert last["error"]["node"] == "source:y" and last["failed"] == ["source:y"]


# -- pictures ---------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_inspect_plot_writes_a_png(qs: dict, tmp_path: Path) -> None:
    recipe = qs["root"] / "recipes" / "quickstart.toml"
    out = tmp_path / "arith.png"
    r = CliRunner().invoke(
        main, ["inspect", "pack:arith", "--recipe", str(recipe), "--plot", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert png_size(out) == (1200, 900)
    assert "per role:" in r.stdout  # the tables are still printed


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_opens_in_headless_chromium(qs: dict, tmp_path: Path) -> None:
    recipe = qs["root"] / "recipes" / "quickstart.toml"
    page = tmp_path / "report.html"
    r = CliRunner().invoke(main, ["report", str(recipe), "-o", str(page)])
    assert r.exit_code == 0, r.output
    text = page.read_text()
    for section in ("nodes", "dag", "evals", "eval-skills", "packs", "pack-arith", "pack-code",
                    "pack-lang", "gates", "environments"):  # fmt: skip
        assert f'id="{section}"' in text, section
    assert text.count("data:image/png;base64,") == 3  # one plot per pack
    assert "<svg" in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert all(f'id="dag-{n.replace(":", "-")}"' in text for n in QUICKSTART_NODES)
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/test.sh installs it in CI)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None
    # the page's own check ran: every section there, every image decoded, no script error
    assert 'data-ready="yes"' in body.group(0) and 'data-images="3"' in body.group(0), body.group(0)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, "--window-size=1300,2400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert png_size(shot) == (1300, 2400)


def test_model_card_links_the_report(qs: dict) -> None:
    card = (qs["root"] / "out" / "quickstart" / "release" / "release" / "README.md").read_text()
    assert "(report.html#eval-skills)" in card and "(report.html#packs)" in card


def test_events_of_a_remote_cache(path_project: Path, tmp_path: Path) -> None:
    """A build pushes each node it builds; another cache then pulls them: one event each."""
    remote = (tmp_path / "remote").as_uri()
    text = path_project.read_text().replace(
        'cache = "cache"', f'cache = "cache"\nremote = "{remote}"'
    )
    path_project.write_text(text)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    r = CliRunner().invoke(main, ["make", str(path_project), "--events", str(first)])
    assert r.exit_code == 0, r.output
    shutil.rmtree(path_project.parent / "cache")
    shutil.rmtree(path_project.parent / "out")
    r = CliRunner().invoke(main, ["make", str(path_project), "--events", str(second)])
    assert r.exit_code == 0, r.output
    steps = {"pack:x", "pack:y", "fuse:release"}
    pushed = [json.loads(x) for x in first.read_text().splitlines()]
    pulled = [json.loads(x) for x in second.read_text().splitlines()]
    assert {e["node"] for e in pushed if e["event"] == "pushed"} == steps
    assert {e["node"] for e in pulled if e["event"] == "pulled"} == steps
    finished = {e["node"]: e for e in pulled if e["event"] == "finished"}
    assert all(finished[n]["action"] == "pulled" and finished[n]["bytes"] > 0 for n in steps)
    assert not [e for e in pulled if e["event"] == "started"]  # nothing built


def test_report_page_shows_gates_and_environments() -> None:
    from graftbuild.release.gates import check
    from graftbuild.release.html import ReportData, render

    metrics = {
        "base": {"general": {"loss": 2.0, "perplexity": 7.39, "tokens": 10}},
        "fuse:r": {"general": {"loss": 2.3, "perplexity": 9.97, "tokens": 10}},
    }
    gates = check(
        "e",
        [
            {"model": "fuse:r", "data": "general", "max_increase": 0.05},
            {"model": "fuse:r", "data": "general", "max_loss": 3.0},
        ],
        "base",
        metrics,
    )
    nodes = [
        {"id": "base", "step": "input", "state": "built", "output_hash": "ab", "output": "",
         "deps": {}, "env": "e1"},
        {"id": "fuse:r", "step": "fuse", "state": "stale", "output_hash": None, "output": "o",
         "deps": {"base": "base"}, "env": None},
    ]  # fmt: skip
    page = render(
        ReportData(
            project="p",
            version="1",
            recipe="r.toml",
            nodes=nodes,
            graph_text="base  [input]\nfuse:r  [fuse]  <- base (base)",
            evals=[{"name": "e", "models": ["base", "fuse:r"], "metrics": metrics}],
            gates=[
                {"describe": g.describe(), "passed": g.passed, "json": g.to_json()} for g in gates
            ],
            environments={"e1": {"torch": "2.13.0+cpu", "cpu_flags": ["avx2", "fma"]}},
            env_nodes={"e1": ["base"]},
        )
    )
    gates_html = page[page.index('id="gates"') : page.index('id="environments"')]
    assert gates_html.count('class="fail">FAIL') == 1 and gates_html.count('class="pass">pass') == 1
    assert "+0.3000" in gates_html and "loss increase vs base" in gates_html
    envs = page[page.index('id="environments"') :]
    assert "2.13.0+cpu" in envs and "avx2 fma" in envs and "<td>base</td>" in envs
    assert 'id="dag-fuse-r"' in page and "fuse · stale" in page
    assert page.count("<svg") == 2  # the DAG and one chart (one dataset)
