"""One self-contained HTML page of a :class:`~namm.inspect.MemoryTrace` (``namm inspect``).

Every token of the prompt and the answer is shaded by the share of managed layers x KV heads that
still hold it at the end; hovering a token lists, per layer, how many KV heads kept it and the last
score the policy gave it. Below: a layer x position heatmap of the same shares and the cache
length of every layer over time. No network: CSS and JavaScript are inline, the two figures are
PNGs embedded as base64.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from namm.engine import format_conditions
from namm.inspect import MemoryTrace

__all__ = ["curve_png", "heatmap_png", "render_page", "write_page"]

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2937;background:#f8fafc}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#4b5563;margin:2px 0}.meta b{color:#111827}
.legend{display:flex;gap:14px;align-items:center;flex-wrap:wrap;font-size:13px;color:#4b5563}
.swatch{display:inline-block;width:28px;height:14px;border-radius:3px;vertical-align:middle;margin-right:4px}
#doc{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:16px;white-space:pre-wrap;
 word-break:break-word;font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;max-height:70vh;overflow:auto}
.t{border-radius:2px;cursor:default}.t:hover{outline:2px solid #2563eb}
.gone{color:#9ca3af;background:#fef2f2}.gen{border-bottom:2px solid #2563eb}.unfed{color:#6b7280;font-style:italic}
figure{margin:16px 0;background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:8px}
figure img{max-width:100%;display:block}figcaption{font-size:13px;color:#4b5563;padding:4px 8px}
#tip{position:fixed;z-index:10;background:#111827;color:#f9fafb;border-radius:6px;padding:8px 10px;font-size:12px;
 max-height:60vh;overflow:auto;box-shadow:0 4px 16px rgba(0,0,0,.25);pointer-events:none;min-width:220px}
#tip table{border-collapse:collapse;margin-top:4px}#tip td,#tip th{padding:1px 8px;text-align:right}
#tip th{color:#9ca3af;font-weight:normal}.k0{color:#fca5a5}.k1{color:#86efac}
"""

_JS = """
(function () {
  var data = JSON.parse(document.getElementById("namm-data").textContent);
  var doc = document.getElementById("doc"), tip = document.getElementById("tip");
  function fmt(s) {
    if (s === null || s === undefined) return "\\u2014";
    if (s === "inf") return "+\\u221e (forced in)";
    if (s === "-inf") return "\\u2212\\u221e (forced out)";
    return String(s);
  }
  function text(tag, content, cls) {
    var el = document.createElement(tag);
    el.textContent = content;
    if (cls) el.className = cls;
    return el;
  }
  function show(span) {
    var i = Number(span.dataset.i), kept = data.kept[i], score = data.score ? data.score[i] : null;
    tip.replaceChildren();
    var where = i < data.n_prompt ? "prompt" : "answer";
    tip.appendChild(text("div", "token " + i + " (" + where + "): " + JSON.stringify(span.textContent)));
    if (!kept) {
      tip.appendChild(text("div", "never fed to the cache (the last generated token)"));
    } else {
      var held = 0;
      kept.forEach(function (k) { held += k; });
      tip.appendChild(text("div", "held by " + held + " of " + kept.length * data.heads + " layer \\u00d7 KV-head slots"));
      var table = document.createElement("table"), head = document.createElement("tr");
      ["layer", "kept heads", "last score"].forEach(function (h) { head.appendChild(text("th", h)); });
      table.appendChild(head);
      data.layers.forEach(function (layer, j) {
        var row = document.createElement("tr");
        row.appendChild(text("td", String(layer)));
        row.appendChild(text("td", kept[j] + "/" + data.heads + (kept[j] ? " kept" : " evicted"), kept[j] ? "k1" : "k0"));
        row.appendChild(text("td", fmt(score ? score[j] : null)));
        table.appendChild(row);
      });
      tip.appendChild(table);
    }
    var box = span.getBoundingClientRect();
    tip.hidden = false;
    var left = Math.min(box.left, window.innerWidth - tip.offsetWidth - 8);
    var top = box.bottom + 6 + tip.offsetHeight > window.innerHeight ? box.top - tip.offsetHeight - 6 : box.bottom + 6;
    tip.style.left = Math.max(4, left) + "px";
    tip.style.top = Math.max(4, top) + "px";
  }
  doc.addEventListener("mouseover", function (e) {
    var span = e.target.closest(".t");
    if (span) show(span);
  });
  doc.addEventListener("mouseleave", function () { tip.hidden = true; });
  doc.addEventListener("scroll", function () { tip.hidden = true; });
})();
"""


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def heatmap_png(trace: MemoryTrace) -> bytes:
    """Layer x position image of the share of each layer's KV heads holding the token at the end."""
    from matplotlib.figure import Figure

    share = trace.held.mean(axis=1) if trace.held.size else np.ones((1, trace.seen))  # (layers, seen)
    fig = Figure(figsize=(10, min(8.0, 1.4 + 0.22 * max(len(trace.layers), 1))))
    ax = fig.subplots()
    image = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="Greens", vmin=0, vmax=1,
                      extent=(-0.5, trace.seen - 0.5, len(trace.layers) - 0.5, -0.5))
    rows = range(0, len(trace.layers), max(1, len(trace.layers) // 12))  # rows are managed layers, labelled
    ax.set_yticks(list(rows), [str(trace.layers[i]) for i in rows])
    if trace.n_prompt < trace.seen:
        ax.axvline(trace.n_prompt - 0.5, color="#2563eb", lw=1, ls="--", label="end of prompt")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.set_title("share of each layer's KV heads holding the token at the end", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    return _png(fig)


def curve_png(trace: MemoryTrace) -> bytes:
    """Cache length of every managed layer against tokens seen, with the full cache for reference."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    ax = fig.subplots()
    ax.plot([0, trace.seen], [0, trace.seen], color="#9ca3af", ls="--", lw=1, label="full cache")
    cmap = colormaps["viridis"]
    n = max(len(trace.layers), 1)
    for i, layer in enumerate(trace.layers):
        ax.plot(trace.curve_x, trace.curve_y[:, i], color=cmap(i / max(n - 1, 1)), lw=1.2,
                label=f"layer {layer}" if n <= 8 else None)
    if trace.n_prompt < trace.seen:
        ax.axvline(trace.n_prompt, color="#2563eb", lw=1, ls=":", label="end of prompt")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("tokens in the cache")
    ax.set_title("kept cache over time, per layer" + (" (colour: layer, dark = first)" if n > 8 else ""), fontsize=10)
    ax.set_xlim(0, max(trace.seen, 1))
    ax.set_ylim(0, max(trace.seen, 1) * 1.02)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def _score_value(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.4g}")


def _data(trace: MemoryTrace) -> dict:
    kept = trace.held.sum(axis=1).T.tolist()  # (seen, layers) heads holding each token
    kept += [None] * (len(trace.token_ids) - trace.seen)
    data = {"layers": trace.layers, "heads": trace.kv_heads, "n_prompt": trace.n_prompt, "kept": kept, "score": None}
    if trace.scored:
        with np.errstate(invalid="ignore"):
            mean = trace.scores.mean(axis=1).T  # (seen, layers): mean over KV heads
        data["score"] = [[_score_value(x) for x in row] for row in mean.tolist()]
    return data


def _tokens_html(trace: MemoryTrace) -> str:
    share = trace.share
    spans = []
    for i, piece in enumerate(trace.tokens):
        classes = ["t"]
        style = ""
        if i >= trace.seen:
            classes.append("unfed")
        elif share[i] == 0:
            classes.append("gone")
        else:
            style = f' style="background:rgba(22,163,74,{0.12 + 0.68 * float(share[i]):.2f})"'
        if i >= trace.n_prompt:
            classes.append("gen")
        spans.append(f'<span class="{" ".join(classes)}" data-i="{i}"{style}>{html.escape(piece)}</span>')
    return "".join(spans)


def _summary_html(trace: MemoryTrace, title: str) -> str:
    r, meta = trace.report, trace.meta
    conditions = meta.get("conditions")
    rows = [f'<p class="meta"><b>model</b> {html.escape(str(meta.get("model", "?")))} &middot; <b>policy</b> '
            f'{html.escape(str(meta.get("policy", "?")))}</p>']
    if conditions:
        rows.append(f'<p class="meta"><b>schedule</b> {html.escape(format_conditions(conditions))}</p>')
    rows.append(
        f'<p class="meta"><b>tokens</b> {r.tokens_seen} seen ({trace.n_prompt} prompt + '
        f'{len(trace.token_ids) - trace.n_prompt} generated) &middot; <b>kept</b> {r.kept_fraction:.1%} at the end '
        f'(mean {r.mean_fraction:.1%}, peak {r.peak_fraction:.1%}) &middot; {r.evictions} eviction steps &middot; '
        f'KV {r.kv_bytes / 2**20:.2f} MiB of {r.kv_bytes_full / 2**20:.2f} MiB</p>')
    return f"<h1>{html.escape(title)}</h1>" + "".join(rows)


def _legend_html(trace: MemoryTrace) -> str:
    scores = ("its last score in each layer (mean over KV heads, at the last eviction step it was ranked)"
              if trace.scored else "no scores: this policy does not rank tokens")
    return (
        '<div class="legend">'
        '<span><span class="swatch" style="background:rgba(22,163,74,0.8)"></span>held by every layer and head</span>'
        '<span><span class="swatch" style="background:rgba(22,163,74,0.3)"></span>held by some</span>'
        '<span><span class="swatch" style="background:#fef2f2"></span>evicted everywhere</span>'
        '<span><span class="swatch" style="border-bottom:2px solid #2563eb"></span>generated</span>'
        f'<span>hover a token: kept/evicted per layer and {html.escape(scores)}</span></div>'
    )


def render_page(trace: MemoryTrace, title: str = "What the memory kept") -> str:
    """The whole page as a string (no external resources)."""
    heat = base64.b64encode(heatmap_png(trace)).decode("ascii")
    curve = base64.b64encode(curve_png(trace)).decode("ascii")
    payload = json.dumps(_data(trace), separators=(",", ":")).replace("</", "<\\/")
    answer = html.escape(trace.text.strip()) or "<i>(nothing generated)</i>"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>'
        f"{_summary_html(trace, title)}"
        f'<h2>Answer</h2><p>{answer}</p>'
        f'<h2>Document</h2>{_legend_html(trace)}<div id="doc">{_tokens_html(trace)}</div>'
        '<h2>Where and when</h2>'
        f'<figure><img alt="layer by position heatmap of the kept cache" src="data:image/png;base64,{heat}">'
        "<figcaption>Each row is a managed layer, each column a token position: the share of the layer's KV "
        "heads still holding that token at the end.</figcaption></figure>"
        f'<figure><img alt="kept cache over time per layer" src="data:image/png;base64,{curve}">'
        "<figcaption>Tokens in each layer's cache as the sequence is read and generated: it grows by every token "
        "fed and drops at each eviction step.</figcaption></figure>"
        '</main><div id="tip" hidden></div>'
        f'<script type="application/json" id="namm-data">{payload}</script><script>{_JS}</script></body></html>\n'
    )


def write_page(trace: MemoryTrace, path: str | Path, title: str = "What the memory kept") -> Path:
    """Write :func:`render_page` to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(trace, title), encoding="utf-8")
    return path
