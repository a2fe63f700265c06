"""Small inline SVG plots and colour scales; every text in them is escaped."""

from __future__ import annotations

import json
import math

from markupsafe import Markup, escape

from ..tokens import Span


def token_spans(spans: list[Span], peak: int, scale: float = 0.0) -> Markup:
    """A window's text with what viewer.js needs to cut it into spans of whole characters (see
    :func:`neuronatlas.tokens.display_spans`) and colour each by its activation (the max of its tokens').

    One element per window, not per span: a report page holds hundreds of tokens. Its data: ``q`` each
    token's value in thousandths of the holder's ``data-scale`` (:func:`scale_text`) as two base-64
    digits (:func:`quantum_text`; ".." when unknown), or ``v`` the values themselves where there is
    no scale (empty when unknown); ``s`` each span's length in characters (code points), one base-36 digit for a span of
    one token shorter than 36, else "~length:tokens;"; ``m`` the tooltips of those spans (each token's text and value,
    and the max); ``p`` the peak token (outlined). Without scripts the text still reads.
    """
    lengths, titles, texts = [], [], []
    unit = float(scale_text(scale)) / QUANTA if scale > 0 and math.isfinite(scale) else 0.0
    for span in spans:
        text = span.text.replace("\r", "\n")  # the HTML parser reads \r as \n: lengths must match what it keeps
        texts.append(text)
        lengths.append(_span_length(len(text), len(span.tokens)))
        if len(span.tokens) > 1:
            titles.append(_span_title(span))
    values = [value for span in spans for value in span.activations]
    if unit:
        data = f' data-q="{"".join(quantum_text(value, unit) for value in values)}"'
    else:
        data = f' data-v="{",".join(compact_number(value) for value in values)}"'
    data += f' data-s="{"".join(lengths)}" data-p="{peak}"'
    if titles:
        data += f' data-m="{escape(json.dumps(titles, ensure_ascii=False))}"'
    return Markup(f'<span class="tokens"{data}>{escape("".join(texts))}</span>')  # direction: the CSS's plaintext


QUANTA = 1000  # window values are written in thousandths of the neuron's colour scale
BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _span_length(characters: int, tokens: int) -> str:
    """A span in ``data-s``: its length as one base-36 digit, or "~length:tokens;" (see token_spans)."""
    return BASE36[characters] if tokens == 1 and characters < len(BASE36) else f"~{characters}:{tokens};"


def scale_text(scale: float) -> str:
    """The colour scale as a page writes it (``data-scale``); window values are multiples of a thousandth of it."""
    return f"{scale:.4g}"


BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
QUANTUM_OFFSET = 2048  # two base-64 digits hold 0..4095: quanta -2048..2047


def quantum_text(value: float | None, unit: float) -> str:
    """``value`` in ``unit`` (a thousandth of the scale) as two base-64 digits; ".." when unknown."""
    if value is None or not math.isfinite(value):
        return ".."
    code = min(max(round(value / unit), -QUANTUM_OFFSET), QUANTUM_OFFSET - 1) + QUANTUM_OFFSET
    return BASE64[code >> 6] + BASE64[code & 63]


def edges_text(edges: list[float]) -> str:
    return ",".join(f"{edge:.4g}" for edge in edges)


def compact_number(value: float | None, decimals: int = 4) -> str:
    """A value rounded to ``decimals`` in few characters: "-.0125", "12.3456", "0"; "" for None or not finite."""
    if value is None or not math.isfinite(value):
        return ""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    text = text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text
    return "0" if text in ("", "-0") else text


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


def histogram(edges: list[float], counts: list[int], title: str, width: int = 560, height: int = 170,
              shared_edges: bool = False) -> Markup:
    """An empty plot that viewer.js draws: a bar per non-empty bin on a log count scale, bins drawn equally
    wide (the edges are log-spaced), each bar's tooltip its bin and count. The bins travel as data (``e``:
    the edges, ``c``: the counts), a tenth of the drawn bars' size: a report holds thousands.
    ``shared_edges``: leave the edges out (a report's pages.js holds them once: every neuron's are the same)."""
    data = "" if shared_edges else f'data-e="{edges_text(edges)}" '
    data += f'data-c="{",".join(str(int(c)) for c in counts)}"'
    return Markup(f'<svg class="plot hist" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                  f'{data}><title>{escape(title)}</title>'
                  f'<text x="0" y="14" class="plot-title">{escape(title)}</text></svg>')
