"""Small inline SVG plots and colour scales; every text in them is escaped."""

from __future__ import annotations

import json
import math

from markupsafe import Markup, escape

from ..tokens import Span


def token_spans(spans: list[Span], peak: int, scale: float) -> Markup:
    """One element per span of whole characters (see :func:`neuronatlas.tokens.display_spans`), coloured
    by its activation (the max of its tokens'); the tooltip gives the value, or each token's for a
    span of several; the span holding token ``peak`` outlined.

    The colour is the stylesheet's (.tok orange, .tok.neg blue) at the opacity ``--a`` the span sets:
    a page holds hundreds of tokens, so each carries only what differs.
    """
    parts = ['<span class="tokens" dir="auto">']
    for span in spans:
        value = span.activation
        known = value is not None and math.isfinite(value)
        kind = "tok" + (" neg" if known and value < 0 else "") + (" peak" if peak in span.tokens else "")
        title = escape(_span_title(span))
        if not known:
            parts.append(f'<span class="{kind}" title="{title}">{escape(span.text)}</span>')
            continue
        strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
        parts.append(f'<span class="{kind}" style="--a:{0.85 * strength:.3f}" title="{title}">{escape(span.text)}</span>')
    parts.append("</span>")
    return Markup("".join(parts))


def _span_title(span: Span) -> str:
    """The tooltip: the value of a span of one token; of several, a line per token ("piece": value) and the max."""
    def shown(value):
        return "unknown" if value is None or not math.isfinite(value) else f"{value:.4f}"

    if len(span.tokens) == 1:
        return shown(span.activation)
    lines = [f"{json.dumps(piece, ensure_ascii=False)}: {shown(value)}" for piece, value in zip(span.pieces, span.activations)]
    return "\n".join(lines + [f"max: {shown(span.activation)}"])


def heat_colour(value: float | None, peak: float) -> str:
    """A diverging background for a heatmap cell (red positive, blue negative)."""
    if value is None or peak <= 0 or not math.isfinite(value):
        return "transparent"
    strength = min(abs(value) / peak, 1.0)
    return f"rgba(200, 40, 40, {0.8 * strength:.3f})" if value > 0 else f"rgba(40, 90, 200, {0.8 * strength:.3f})"


def bar_chart(values: list[float], names: list[str], title: str, percent: bool = False,
              width: int = 420, bar_height: int = 18) -> Markup:
    """Horizontal bars, one per name, with the value written after the bar."""
    label_width, value_width = 70, 70
    plot_width = width - label_width - value_width
    peak = max((abs(v) for v in values), default=0.0) or 1.0
    height = bar_height * len(values) + 24
    parts = [f'<svg class="plot" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f"<title>{escape(title)}</title>",
             f'<text x="0" y="14" class="plot-title">{escape(title)}</text>']
    for row, (value, name) in enumerate(zip(values, names)):
        y = 22 + row * bar_height
        length = plot_width * abs(value) / peak
        shown = f"{100 * value:.2f}%" if percent else f"{value:.4g}"
        parts.append(f'<text x="{label_width - 6}" y="{y + bar_height - 5}" text-anchor="end">{escape(name)}</text>')
        parts.append(f'<rect x="{label_width}" y="{y + 2}" width="{length:.1f}" height="{bar_height - 4}" '
                     f'class="bar"><title>{escape(name)}: {escape(shown)}</title></rect>')
        parts.append(f'<text x="{label_width + length + 4:.1f}" y="{y + bar_height - 5}">{escape(shown)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def histogram(edges: list[float], counts: list[int], title: str, width: int = 560, height: int = 170) -> Markup:
    """Bars per non-empty bin on a log count scale; bins are drawn equally wide (the edges are log-spaced)."""
    bins = len(counts)
    bottom, top, left = height - 34, 20, 40
    bar_width = (width - left - 10) / max(bins, 1)
    peak = math.log1p(max(counts, default=0)) or 1.0
    parts = [f'<svg class="plot" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f"<title>{escape(title)}</title>",
             f'<text x="0" y="14" class="plot-title">{escape(title)}</text>',
             f'<line x1="{left}" y1="{bottom}" x2="{width - 10}" y2="{bottom}" class="axis"/>']
    for i, count in enumerate(counts):
        if not count:
            continue  # nothing to draw (or hover)
        bar = (bottom - top) * math.log1p(count) / peak
        x = left + i * bar_width
        parts.append(f'<rect x="{x:.1f}" y="{bottom - bar:.1f}" width="{max(bar_width - 1, 1):.1f}" height="{bar:.1f}" '
                     f'class="bar"><title>{escape(_bin_name(edges, i))}: {count:,} tokens</title></rect>')
    for i in range(0, bins, max(bins // 8, 1)):
        if 0 < i <= len(edges):
            x = left + i * bar_width
            parts.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" class="tick">{edges[i - 1]:.3g}</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" class="tick">activation (bin edges log-spaced); '
                 f'bar height: log(1 + tokens)</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _bin_name(edges: list[float], i: int) -> str:
    if i == 0:
        return f"< {edges[0]:.3g}"
    if i >= len(edges):
        return f">= {edges[-1]:.3g}"
    return f"[{edges[i - 1]:.3g}, {edges[i]:.3g})"
