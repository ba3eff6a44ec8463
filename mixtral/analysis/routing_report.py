"""Renders a routing analysis (`RoutingAnalysis.to_json()`) into report.json, PNG figures and one HTML page.

`write_report(report, out_dir)` writes `report.json`, `expert_share.png` (paper Figure 7),
`repetition.png` (Figure 10), `specialisation.png`, `cache.png`, `tokens.png` (Figure 8) and a
self-contained `report.html` (figures inlined as data URIs, no external resources). Every file is
written atomically. Figures use `matplotlib.figure.Figure` directly, so no global backend is set.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mixtral.atomic import write_atomic

MONO = "DejaVu Sans Mono"
WRAP = 100  # characters per line in tokens.png
MAX_FIGURE_SAMPLES = 3
DPI = 110


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # glyphs missing from the font in token text
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _palette(n: int, names: Sequence[str]) -> list[tuple[float, float, float]]:
    colours = [c for name in names for c in colormaps[name].colors]
    return [tuple(colours[i % len(colours)][:3]) for i in range(n)]


def domain_colours(n: int) -> list[tuple[float, float, float]]:
    return _palette(n, ["tab10"] if n <= 10 else ["tab20"])


def expert_colours(n: int) -> list[str]:
    """Light background colour per expert id (hex), cycling when there are more experts than colours."""
    base = _palette(n, ["tab10"] if n <= 10 else ["tab20", "tab20b", "tab20c"])
    white = 0.55 if n <= 10 else 0.25  # blend with white so black text stays legible (tab20 has light tints)
    light = [(1 - white) * np.array(c) + white for c in base]
    return ["#" + "".join(f"{round(255 * v):02x}" for v in c) for c in light]


def _weights(report: dict) -> np.ndarray:
    w = np.array([report["tokens"].get(d, 0) for d in report["domains"]], dtype=np.float64)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / max(1, len(w)))


# figures -------------------------------------------------------------------------------------


def fig_expert_share(report: dict) -> Figure:
    layers, domains, E = report["layers"], report["domains"], report["n_experts"]
    colours = domain_colours(len(domains))
    fig = Figure(
        figsize=(min(24.0, max(8.0, 0.09 * E * len(domains) + 2.5)), 2.2 * len(layers) + 0.6),
        layout="constrained",
    )
    axes = np.atleast_1d(fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0])
    width = 0.85 / len(domains)
    x = np.arange(E)
    for ax, layer in zip(axes, layers, strict=True):
        for i, d in enumerate(domains):
            share = report["expert_share"][d]["either"][layer]
            ax.bar(x - 0.425 + (i + 0.5) * width, share, width, color=colours[i], label=d)
        ax.axhline(1 / E, color="k", ls="--", lw=1, label="uniform (1/E)")
        ax.set(ylabel="share of assignments", title=f"layer {layer}")
        ax.set_xticks(x[:: max(1, E // 32)])
        ax.set_xlim(-0.6, E - 0.4)
    axes[-1].set_xlabel("expert id")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"Expert share per domain (top-{report['top_k']} assignments)")
    return fig


def fig_repetition(report: dict) -> Figure:
    domains, base, L = report["domains"], report["baselines"], report["n_layers"]
    colours = domain_colours(len(domains))
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = [("same_first", "same first choice"), ("topk_overlap", f"top-{report['top_k']} sets overlap")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, d in enumerate(domains):
            ax.plot(range(L), report["repetition"][d][key], "o-", ms=3, lw=1.2, color=colours[i], label=d)
        ax.axhline(base[key], color="k", ls="--", lw=1, label="random routing")
        ax.set(title=title, xlabel="layer", ylim=(0, 1))
        ax.set_xticks(range(0, L, max(1, L // 16)))
    axes[0].set_ylabel("fraction of consecutive token pairs")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    return fig


def fig_specialisation(report: dict) -> Figure:
    sp, L, domains = report["specialisation"], report["n_layers"], report["domains"]
    x = np.arange(L)
    js, (lo, hi) = np.array(sp["js_bits"]), np.array(sp["ci95"])
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    ax.fill_between(x, 0, sp["null_p95"], color="0.8", label="permutation null (up to p95)")
    ax.plot(x, sp["null_mean"], color="0.45", ls="--", lw=1, label="permutation null mean")
    # JS is biased upward by sampling noise, so the bootstrap interval can lie wholly above a
    # near-zero observed value: drawn as a band, not as error bars around the point.
    ax.fill_between(x, lo, hi, color="C0", alpha=0.25, label="95% bootstrap interval")
    ax.plot(x, js, "o-", color="C0", label="observed JS")
    for layer in report["layers"]:
        ax.axvline(layer, color="C1", lw=0.8, alpha=0.4)
    ax.set(xlabel="layer", ylabel="JS divergence (bits)", title="Routing divergence between domains")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best")
    colours = domain_colours(len(domains))
    for i, d in enumerate(domains):
        if d in sp.get("per_domain_js_bits", {}):
            ax2.plot(x, sp["per_domain_js_bits"][d], "o-", ms=3, lw=1, color=colours[i], label=d)
    ax2.set(xlabel="layer", ylabel="JS(domain, mixture) (bits)", title="Per domain vs all domains")
    ax2.set_ylim(bottom=0)
    for a in (ax, ax2):
        a.set_xticks(range(0, L, max(1, L // 16)))
    fig.legend(*ax2.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    return fig


def cache_curves(report: dict) -> tuple[np.ndarray, np.ndarray]:
    """Token-weighted mean over domains of the routed and random LRU hit rates: two `[L, E]` arrays."""
    w = _weights(report)
    curves = [np.einsum("d,dle->le", w, [report["cache"][kind][d] for d in report["domains"]])
              for kind in ("routed", "random")]  # fmt: skip
    return curves[0], curves[1]


def fig_cache(report: dict) -> Figure:
    layers, E, sizes = report["layers"], report["n_experts"], np.array(report["cache"]["sizes"])
    routed, rand = cache_curves(report)
    fig = Figure(figsize=(max(6.0, 3.2 * len(layers)), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(layers), sharey=True, squeeze=False)[0])
    for ax, layer in zip(axes, layers, strict=True):
        ax.plot(sizes, routed[layer], "o-", ms=3, color="C0", label="routed (mean over domains)")
        ax.plot(sizes, rand[layer], "s--", ms=3, color="C3", label="random routing")
        ax.plot(sizes, sizes / E, "-", color="0.75", lw=4, zorder=1, label="c / E")
        ax.set(title=f"layer {layer}", xlabel="cache size c (experts)", ylim=(0, 1.02))
    axes[0].set_ylabel("LRU hit rate")
    axes[0].legend(fontsize=8, loc="lower right")
    return fig


def _layout(pieces: Sequence[str], width: int) -> list[tuple[int, int, str, int]]:
    """Monospace layout: (row, col, text, token index) per drawn segment; newlines break lines."""
    out, row, col = [], 0, 0
    for t, piece in enumerate(pieces):
        for j, seg in enumerate(piece.replace("\t", "    ").replace("\r", "").split("\n")):
            if j:
                row, col = row + 1, 0
            while seg:
                if col + len(seg) > width and col > 0:
                    row, col = row + 1, 0
                chunk, seg = seg[:width], seg[width:]
                out.append((row, col, chunk, t))
                col += len(chunk)
    return out


def fig_tokens(report: dict) -> Figure:
    E, layers = report["n_experts"], report["layers"]
    colours = expert_colours(E)
    lines: list[tuple[str, list[tuple[int, str, str | None]]]] = []  # (kind, [(col, text, colour)])
    legend: list[tuple[int, str, str | None]] = [(0, "experts:", None)]
    col = 9
    for e in range(E):
        if col + 5 > WRAP:
            lines.append(("legend", legend))
            legend, col = [], 9
        legend.append((col, f"e{e}", colours[e]))
        col += len(f"e{e}") + 1
    lines.append(("legend", legend))
    for s in report["samples"][:MAX_FIGURE_SAMPLES]:
        for layer in layers:
            lines.append(("blank", []))
            lines.append(
                ("header", [(0, f"{s['domain']} - layer {layer} (background: first-choice expert)", None)])
            )
            rows: dict[int, list[tuple[int, str, str | None]]] = {}
            for row, c, text, t in _layout(s["pieces"], WRAP):
                rows.setdefault(row, []).append((c, text, colours[s["experts"][layer][t][0] % E]))
            lines.extend(("text", rows.get(r, [])) for r in range(max(rows, default=-1) + 1))
    if not report["samples"]:
        lines.append(("header", [(0, "no token samples in this report", None)]))
    fs, lh = 9.0, 1.45  # font size (pt), line height (em)
    cw_in, lh_in = 0.602 * fs / 72, lh * fs / 72  # DejaVu Sans Mono advance is 0.602 em
    ncols, nrows = WRAP + 2, len(lines) + 1
    fig = Figure(figsize=(ncols * cw_in, nrows * lh_in))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1, ncols - 1)
    ax.set_ylim(nrows - 0.5, -0.5)
    ax.axis("off")
    rects, faces = [], []
    for r, (kind, items) in enumerate(lines):
        for c, text, colour in items:
            if colour is not None:
                rects.append(Rectangle((c, r - 0.5), len(text), 1.0))
                faces.append(colour)
            ax.text(c, r, text, family=MONO, size=fs, va="center_baseline", ha="left", parse_math=False,
                    weight="bold" if kind == "header" else "normal")  # fmt: skip
    ax.add_collection(PatchCollection(rects, facecolors=faces, edgecolors="none"))
    return fig


FIGURES = {
    "expert_share": fig_expert_share,
    "repetition": fig_repetition,
    "specialisation": fig_specialisation,
    "cache": fig_cache,
    "tokens": fig_tokens,
}

# html ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right} th,td:first-child{white-space:nowrap}
th:first-child,td:first-child{text-align:left}
#model td{text-align:left} .wide{overflow-x:auto} img{max-width:100%;height:auto;border:1px solid #eee}
.tok{font-family:'DejaVu Sans Mono',monospace;white-space:pre-wrap;line-height:1.7;font-size:.85em}
.tok span{border-radius:2px} .tok span:hover{outline:1px solid #000}
.note{color:#555;font-size:.9em} .good{color:#060} .bad{color:#a00}
"""

SCRIPT = """
window.addEventListener('error', function (e) {
  var b = document.body, msg = e.message || ('failed to load ' + ((e.target && (e.target.src || e.target.href)) || '?'));
  b.dataset.errors = (b.dataset.errors ? b.dataset.errors + '\\n' : '') + msg;
}, true);
window.addEventListener('load', function () { document.body.dataset.ready = '1'; });
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], head_html: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return (
        f'<div class="wide"><table><thead>{head_html}<tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def _summary(report: dict) -> str:
    sp, base, dom = report["specialisation"], report["baselines"], report["domains"]
    rows = []
    for layer in report["layers"]:
        same = float(np.mean([report["repetition"][d]["same_first"][layer] for d in dom]))
        indep = [
            report["repetition"][d].get("same_first_independent", [None] * (layer + 1))[layer] for d in dom
        ]
        indep_txt = f" ({_pct(float(np.mean(indep)))}% if independent)" if None not in indep else ""
        over = float(np.mean([report["repetition"][d]["topk_overlap"][layer] for d in dom]))
        js, p95 = sp["js_bits"][layer], sp["null_p95"][layer]
        verdict = (
            '<span class="good">above null</span>' if js > p95 else '<span class="bad">within null</span>'
        )
        tvd = report.get("token_vs_domain")
        identity = (
            f"{_pct(tvd['token_modal'][layer])}% vs {_pct(tvd['domain_modal'][layer])}%" if tvd else "n/a"
        )
        rows.append([layer, f"{js:.4f} [{sp['ci95'][0][layer]:.4f}, {sp['ci95'][1][layer]:.4f}]", f"{p95:.4f}",
                     f"{sp['p_value'][layer]:.3g}", verdict, identity,
                     f"{_pct(same)}% vs {_pct(base['same_first'])}%{indep_txt}",
                     f"{_pct(over)}% vs {_pct(base['topk_overlap'])}%"])  # fmt: skip
    header = ["layer", "JS bits [95% CI]", "null p95", "p-value", "specialisation",
              "1st choice = token's usual vs domain's usual",
              "same first (mean over domains) vs random", f"top-{report['top_k']} overlap vs random"]  # fmt: skip
    return _table(header, rows)


def _expert_share_tables(report: dict) -> str:
    E, uniform = report["n_experts"], 1 / report["n_experts"]
    out = []
    for layer in report["layers"]:
        rows = []
        named = [(d, report["expert_share"][d]["either"][layer]) for d in report["domains"]]
        for name, share in [*named, ("all (token-weighted)", report["expert_share_all"]["either"][layer])]:
            cells = [f'<span style="background:rgba(31,119,180,{min(0.6, 0.2 * v / uniform):.2f})">{_pct(v)}</span>'
                     for v in share]  # fmt: skip
            rows.append([_e(name), *cells])
        out.append(f"<h3>Layer {layer}: share of top-{report['top_k']} assignments per expert (%)</h3>")
        out.append(_table(["domain", *(f"e{e}" for e in range(E))], rows))
    return "".join(out)


def _repetition_table(report: dict) -> str:
    layers, base, k = report["layers"], report["baselines"], report["top_k"]
    n = len(layers)
    head = (f'<tr><th></th><th colspan="{n}">First choice</th>'
            f'<th colspan="{n}">{"First or second choice" if k == 2 else f"Any of top-{k}"}</th></tr>')  # fmt: skip
    rows = [[_e(d), *(_pct(report["repetition"][d][key][layer]) for key in ("same_first", "topk_overlap")
                      for layer in layers)] for d in report["domains"]]  # fmt: skip
    rows.append(["<i>random</i>", *([_pct(base["same_first"])] * n), *([_pct(base["topk_overlap"])] * n)])
    return _table(["domain", *(f"Layer {layer}" for layer in layers * 2)], rows, head)


def _cache_table(report: dict) -> str:
    routed, rand = cache_curves(report)
    rows = [[f"layer {layer} {kind}", *(_pct(v) for v in curve[layer])]
            for layer in report["layers"] for kind, curve in (("routed", routed), ("random", rand))]  # fmt: skip
    E = report["n_experts"]
    rows.append(["c / E", *(_pct(c / E) for c in report["cache"]["sizes"])])
    return _table(["LRU hit rate (%) at cache size", *(str(c) for c in report["cache"]["sizes"])], rows)


def _specialisation_table(report: dict) -> str:
    sp, L = report["specialisation"], report["n_layers"]
    per = sp.get("per_domain_js_bits", {})
    rows = [[f"layer {i}", f"{sp['js_bits'][i]:.4f}", f"{sp['ci95'][0][i]:.4f}", f"{sp['ci95'][1][i]:.4f}",
             f"{sp['null_mean'][i]:.4f}", f"{sp['null_p95'][i]:.4f}", f"{sp['p_value'][i]:.3g}",
             *(f"{per[d][i]:.4f}" for d in per)] for i in range(L)]  # fmt: skip
    header = ["", "JS bits", "CI low", "CI high", "null mean", "null p95", "p-value", *(f"JS {d}" for d in per)]  # fmt: skip
    return f'<p class="note">{_e(sp.get("measure", ""))}</p>' + _table(header, rows)


def _hover(sample: dict, t: int) -> str:
    """Token t's top-k experts and weights at every layer: "L0: e3 0.62, e5 0.38 | L1: ..."."""
    per_layer = []
    for layer, (ids, ws) in enumerate(zip(sample["experts"], sample["weights"], strict=True)):
        per_layer.append(
            f"L{layer}: " + ", ".join(f"e{e} {w:.2f}" for e, w in zip(ids[t], ws[t], strict=True))
        )
    return " | ".join(per_layer)


def _tokens_html(report: dict) -> str:
    E, colours = report["n_experts"], expert_colours(report["n_experts"])
    legend = " ".join(f'<span style="background:{colours[e]}">e{e}</span>' for e in range(E))
    out = [f'<p class="tok">experts: {legend}</p>']
    for s in report["samples"]:
        titles = [_hover(s, t) for t in range(len(s["pieces"]))]
        for layer in report["layers"]:
            spans = "".join(f'<span style="background:{colours[s["experts"][layer][t][0] % E]}" title="{_e(titles[t])}">'
                            f"{_e(p)}</span>" for t, p in enumerate(s["pieces"]))  # fmt: skip
            out.append(f'<h3>{_e(s["domain"])} &middot; layer {layer}</h3><div class="tok">{spans}</div>')
    return "".join(out)


def render_html(report: dict, pngs: dict[str, bytes]) -> str:
    """The self-contained page: `pngs` maps figure names (FIGURES keys) to PNG bytes."""
    m = report["model"]

    def img(name: str) -> str:
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}">'

    facts = [("layers", m.get("n_layers")), ("experts (E)", m.get("n_experts")), ("top-k", m.get("top_k")),
             ("dim", m.get("dim")), ("total parameters", f"{m.get('total_params', 0):,}"),
             ("active parameters per token", f"{m.get('active_params', 0):,}"),
             ("tokens analysed", f"{sum(report['tokens'].values()):,}"),
             ("domains", ", ".join(f"{d} ({report['tokens'][d]:,} tokens)" for d in report["domains"])),
             ("highlighted layers", ", ".join(map(str, report["layers"])))]  # fmt: skip
    src = report.get("source") or {}
    if src.get("model_path"):
        facts.append(("model", src["model_path"]))
    facts += [(f"data: {d}", p) for d, p in (src.get("data") or {}).items()]
    t = report.get("timing") or {}
    if t:
        facts.append(("timing", ", ".join(f"{k}={v}" for k, v in t.items())))
    model_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    sections = [
        ("summary", "Findings per highlighted layer", _summary(report)),
        ("expert-share", "Expert share per domain", img("expert_share") + _expert_share_tables(report)),
        ("repetition", "Consecutive tokens routed alike", img("repetition") + _repetition_table(report)),
        ("specialisation", "Domain specialisation", img("specialisation") + _specialisation_table(report)),
        ("cache", "Expert LRU cache", img("cache") + _cache_table(report)),
        ("tokens", "Tokens coloured by first-choice expert (hover for every layer's top-k)",
         _tokens_html(report) + f"<details><summary>as an image (tokens.png)</summary>{img('tokens')}</details>"),
    ]  # fmt: skip
    body = "".join(f'<section id="{i}"><h2>{_e(h)}</h2>{c}</section>' for i, h, c in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Mixtral routing report</title>'
            f"<style>{CSS}</style></head><body><script>{SCRIPT}</script><h1>Mixtral routing report</h1>"
            f'<div class="wide"><table id="model">{model_rows}</table></div>{body}</body></html>\n')  # fmt: skip


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """Writes report.json, PNG figures and a self-contained report.html into out_dir; returns the html path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=1).encode())
    pngs = {name: _png(make(report)) for name, make in FIGURES.items()}
    for name, data in pngs.items():
        write_atomic(out / f"{name}.png", data)
    page = out / "report.html"
    write_atomic(page, render_html(report, pngs).encode("utf-8"))
    return page
