"""The build report (``graftbuild report``) as one self-contained HTML page: inline CSS, inline
SVG for the DAG and the eval charts, pack plots as embedded PNGs, no script or font fetched.

Everything here works on plain data (``ReportData``) the command gathers; nothing is read from
disk. Section ids are stable, so a model card or a dashboard can link them: ``#dag``,
``#evals`` (``#eval-NAME``), ``#packs`` (``#pack-NAME``), ``#gates``, ``#environments``.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any

SECTIONS = ("nodes", "dag", "evals", "packs", "gates", "environments")

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1280px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 90%; } .muted { color: #777; } .pass { color: #1a7f37; font-weight: 600; }
.fail { color: #c62828; font-weight: 600; } .charts { display: flex; flex-wrap: wrap; gap: 1em; }
svg text { font: 12px system-ui, sans-serif; } img { max-width: 100%; }
"""

# Checks, once the page has loaded, that every section and image is there; sets data-ready (or
# data-errors) on <body>, so a headless browser can tell the page rendered as it should.
_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) { errors.push(String(e.message)); });
  window.addEventListener('load', function () {
    var ids = %s;
    ids.forEach(function (id) { if (!document.getElementById(id)) errors.push('missing #' + id); });
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; else errors.push('image ' + i);
    }
    document.body.setAttribute('data-images', String(ok));
    if (errors.length) document.body.setAttribute('data-errors', errors.join('; '));
    else document.body.setAttribute('data-ready', 'yes');
  });
})();
"""


@dataclass
class ReportData:
    project: str
    version: str
    recipe: str
    nodes: list[dict[str, Any]]
    """Per node: id, step, state ("built"/"stale"), output hash, output folder, deps."""
    graph_text: str
    """``graftbuild graph --format text``'s output."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Per eval: name, models (in order), metrics {model: {dataset: {loss, perplexity}}}."""
    packs: list[dict[str, Any]] = field(default_factory=list)
    """Per pack: name, report (skillpack/report.py), png (bytes or None), note."""
    gates: list[dict[str, Any]] = field(default_factory=list)
    """Per gate: describe, passed, and the gate's JSON."""
    environments: dict[str, dict[str, Any]] = field(default_factory=dict)
    env_nodes: dict[str, list[str]] = field(default_factory=dict)
    """Environment id -> the nodes the lock says were built in it."""
    generated: str = ""


def e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def dag_svg(nodes: list[dict[str, Any]]) -> str:
    """The DAG drawn left to right: a node's column is its longest path from an input."""
    by_id = {n["id"]: n for n in nodes}
    depth: dict[str, int] = {}

    def level(nid: str) -> int:
        if nid not in depth:
            deps = [d for d in by_id[nid]["deps"].values() if d in by_id]
            depth[nid] = 1 + max((level(d) for d in deps), default=-1)
        return depth[nid]

    for n in nodes:
        level(n["id"])
    columns: dict[int, list[str]] = {}
    for n in nodes:  # the graph's order within a column
        columns.setdefault(depth[n["id"]], []).append(n["id"])
    bw, bh, gx, gy, pad = 150, 40, 45, 18, 10
    pos = {
        nid: (pad + c * (bw + gx), pad + r * (bh + gy))
        for c, ids in columns.items()
        for r, nid in enumerate(ids)
    }
    width = pad * 2 + len(columns) * (bw + gx) - gx
    height = pad * 2 + max(len(v) for v in columns.values()) * (bh + gy) - gy
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" style="max-width: 100%; height: auto" role="img" '
        'aria-label="build graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>',
    ]
    for n in nodes:
        x2, y2 = pos[n["id"]]
        for role, dep in sorted(n["deps"].items()):
            if dep not in pos:
                continue
            x1, y1 = pos[dep]
            a, b = (x1 + bw, y1 + bh / 2), (x2, y2 + bh / 2)
            mid = (a[0] + b[0]) / 2
            parts.append(
                f'<path d="M{a[0]},{a[1]} C{mid},{a[1]} {mid},{b[1]} {b[0]},{b[1]}" fill="none" '
                f'stroke="#888" marker-end="url(#arrow)"><title>{e(dep)} → {e(n["id"])} '
                f"({e(role)})</title></path>"
            )
    fills = {"built": "#e3f4e8", "stale": "#fff4d6"}
    for n in nodes:
        x, y = pos[n["id"]]
        fill = fills.get(n["state"], "#eee")
        parts.append(
            f'<g id="dag-{slug(n["id"])}"><rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="5" '
            f'fill="{fill}" stroke="#666"/><text x="{x + 8}" y="{y + 16}" font-weight="600">'
            f'{e(n["id"])}</text><text x="{x + 8}" y="{y + 32}" fill="#555">{e(n["step"])} · '
            f"{e(n['state'])}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, values: list[tuple[str, float]]) -> str:
    """A horizontal bar chart of ``values`` (label, value) as inline SVG."""
    finite = [v for _, v in values if math.isfinite(v)]
    top = max(finite, default=1.0) or 1.0
    lw, bw, bh, gap = 130, 260, 18, 6
    height = 28 + len(values) * (bh + gap)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{lw + bw + 70}" height="{height}" '
        f'role="img" aria-label="{e(title)}"><text x="0" y="16" font-weight="600">{e(title)}'
        "</text>"
    ]
    for i, (label, v) in enumerate(values):
        y = 26 + i * (bh + gap)
        w = 0 if not math.isfinite(v) else max(1.0, bw * v / top)
        parts.append(
            f'<text x="{lw - 6}" y="{y + 13}" text-anchor="end">{e(label)}</text>'
            f'<rect x="{lw}" y="{y}" width="{w:.1f}" height="{bh}" fill="#4c78a8"/>'
            f'<text x="{lw + w + 4:.1f}" y="{y + 13}">{v:.3f}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(head: list[str], rows: list[list[str]], num: set[int] | None = None) -> str:
    num = num or set()
    out = ["<table><tr>", *(f"<th>{e(h)}</th>" for h in head), "</tr>"]
    for r in rows:
        cells = (
            f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        out += ["<tr>", *cells, "</tr>"]
    out.append("</table>")
    return "".join(out)


def render(data: ReportData) -> str:
    from graftbuild.release.card import human_bytes

    ids = [*SECTIONS]
    body: list[str] = [
        f"<h1>{e(data.project)} {e(data.version)}: build report</h1>",
        f'<p class="muted">recipe <code>{e(data.recipe)}</code>; generated {e(data.generated)} '
        "by <code>graftbuild report</code></p>",
        '<nav>Sections: <a href="#nodes">nodes</a> · <a href="#dag">graph</a> · '
        '<a href="#evals">evals</a> · <a href="#packs">packs</a> · <a href="#gates">gates</a> · '
        '<a href="#environments">environments</a></nav>',
    ]
    rows = [
        [
            f"<code>{e(n['id'])}</code>",
            e(n["step"]),
            f'<span class="{"pass" if n["state"] == "built" else "fail"}">{e(n["state"])}</span>',
            f"<code>{e(n['output_hash'] or '-')}</code>",
            e(n.get("env") or "-"),
            f"<code>{e(n['output'] or '')}</code>",
        ]
        for n in data.nodes
    ]
    body += [
        '<section id="nodes"><h2>Nodes</h2>',
        _table(["node", "step", "state", "object", "environment", "output"], rows),
        "</section>",
    ]
    body += [
        '<section id="dag"><h2>Build graph</h2>',
        '<p class="muted">Drawn from <code>graftbuild graph</code>: inputs on the left; green: '
        "built (in the cache), yellow: stale.</p>",
        '<div style="overflow-x: auto">',
        dag_svg(data.nodes) if data.nodes else "<p>no nodes</p>",
        "</div>",
        "<details><summary><code>graftbuild graph</code> output</summary><pre>"
        f"{e(data.graph_text)}</pre></details></section>",
    ]
    body.append('<section id="evals"><h2>Evaluations: held-out loss</h2>')
    if not data.evals:
        body.append("<p>No <code>[[eval]]</code> built.</p>")
    for ev in data.evals:
        sid = f"eval-{slug(ev['name'])}"
        ids.append(sid)
        metrics, models = ev["metrics"], ev["models"]
        datasets = sorted({d for m in metrics.values() for d in m})
        rows = [
            [f"<code>{e(m)}</code>"]
            + [
                f"{metrics[m][d]['loss']:.4f} ({metrics[m][d]['perplexity']:.2f})"
                if d in metrics.get(m, {})
                else ""
                for d in datasets
            ]
            for m in models
        ]
        charts = [
            bar_chart(
                f"{d}: loss",
                [(m, metrics[m][d]["loss"]) for m in models if d in metrics.get(m, {})],
            )
            for d in datasets
        ]
        body += [
            f'<div id="{sid}"><h3>eval:{e(ev["name"])}</h3>',
            "<p>Loss (perplexity) per model and dataset; lower is better.</p>",
            _table(["model", *datasets], rows, set(range(1, len(datasets) + 1))),
            '<div class="charts">',
            *charts,
            "</div></div>",
        ]
    body.append("</section>")
    body.append('<section id="packs"><h2>SkillPacks</h2>')
    if not data.packs:
        body.append("<p>No pack built.</p>")
    for p in data.packs:
        sid = f"pack-{slug(p['name'])}"
        ids.append(sid)
        r = p["report"]
        line = (
            f"{r['payload_bytes']:,} bytes of payload ({human_bytes(r['payload_bytes'])}), "
            f"{r['size_vs_fp16']:.2%} of the fp16 delta"
            + (f", relative error {r['rel_error']:.4f}" if r.get("rel_error") is not None else "")
        )
        roles = [
            [
                e(g["role"]),
                str(g["tensors"]),
                e(", ".join(g["codecs"])),
                f"{g['bytes']:,}",
                f"{g['share']:.1%}",
                "" if g.get("rel_error") is None else f"{g['rel_error']:.4f}",
            ]
            for g in r["by_role"]
        ]
        body += [f'<div id="{sid}"><h3>pack:{e(p["name"])}</h3><p>{e(line)}</p>']
        if p.get("png"):
            b64 = base64.b64encode(p["png"]).decode("ascii")
            body.append(
                f'<img alt="pack:{e(p["name"])} per layer and role" src="data:image/png;base64,'
                f'{b64}" width="1200" height="900">'
            )
        elif p.get("note"):
            body.append(f'<p class="muted">{e(p["note"])}</p>')
        body += [
            _table(["role", "tensors", "codecs", "bytes", "share", "rel err"], roles, {1, 3, 4, 5}),
            "</div>",
        ]
    body.append("</section>")
    body.append('<section id="gates"><h2>Release gates</h2>')
    if data.gates:
        body.append(
            _table(
                ["gate", "value", "threshold", "result"],
                [
                    [
                        e(g["describe"]),
                        f"{g['json']['value']:+.4f}",
                        f"{g['json']['threshold']:g}",
                        '<span class="pass">pass</span>'
                        if g["passed"]
                        else '<span class="fail">FAIL</span>',
                    ]
                    for g in data.gates
                ],
                {1, 2},
            )
        )
    else:
        body.append("<p>No gates declared (or their evals are not built).</p>")
    body.append("</section>")
    body.append('<section id="environments"><h2>Build environments (from the lockfile)</h2>')
    if data.environments:
        keys = sorted({k for env in data.environments.values() for k in env})
        envs = sorted(data.environments)
        rows = [
            [e(k)]
            + [f"<code>{e(_fmt(data.environments[x].get(k)))}</code>" for x in envs]
            for k in keys
        ]
        rows.append(["nodes"] + [e(", ".join(data.env_nodes.get(x, []))) for x in envs])
        body.append(_table(["", *envs], rows))
    else:
        body.append("<p>No lockfile yet: run <code>graftbuild make</code>.</p>")
    body.append("</section>")
    script = _SCRIPT % ("[" + ", ".join(f'"{i}"' for i in ids) + "]")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(data.project)}: build report</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style><script>{script}</script></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return str(v)
