"""How the HTML compliance report (ftpipe/release/report_render.py) looks: its stylesheet and its inline SVG charts.

STYLE is the page's only CSS (inline: the page fetches nothing), for the screen and for print: the reviewer
signs a printout, so sections, table rows and charts avoid page breaks and links print their address.

A reviewer takes in a shape faster than a table, so three things are also drawn, by small functions:

    rows_chart(report["data_sources"])                                     rows kept vs each rejection reason
    comparison_chart(evaluation["base"], evaluation["tuned"])              base vs tuned: ROUGE-L and loss
    gguf_gap_chart(evaluation["gguf"])                                     validation loss gap per GGUF type

Each returns one <svg> element as a string, to inline in the page: no plotting library, no files, no fonts
or scripts to fetch, so the page renders offline and prints as it shows. Every number is also a text label
(a chart is readable in black and white, and nothing is told by colour alone), each chart has a <title> for
screen readers, and the fills are the Okabe-Ito palette, distinguishable with the common colour-vision
deficiencies. All text is escaped: source names are user-declared.
"""
from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

WIDTH = 720
CHAR_WIDTH = 6.6           # average advance of a 12px sans-serif glyph: enough to place labels, never to clip
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="12" fill="#1a1a1a"'
# (fill, text colour on it): Okabe-Ito, with black or white text for contrast on each.
KEPT = ("#009E73", "#000000")
REASONS = (("#E69F00", "#000000"), ("#D55E00", "#000000"), ("#CC79A7", "#000000"), ("#56B4E9", "#000000"),
           ("#F0E442", "#000000"), ("#0072B2", "#ffffff"), ("#999999", "#000000"))
BASE, TUNED = ("#999999", "#000000"), ("#0072B2", "#ffffff")
BAR_HEIGHT = 22

# Marks (pass/fail/warn) carry a symbol and a word; their colours only repeat it. Contrast >= 7:1 throughout.
STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a1a1a; background: #fff;
       max-width: 1120px; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.6rem; margin: .1rem 0 .3rem; overflow-wrap: anywhere; }
h2 { font-size: 1.3rem; border-bottom: 2px solid #1a1a1a; padding-bottom: .2rem; margin-top: 2.2rem; }
h3 { font-size: 1.05rem; margin: 1.3rem 0 .4rem; overflow-wrap: anywhere; }
.kicker { text-transform: uppercase; letter-spacing: .08em; font-size: .8rem; margin: 0; color: #404040; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0 .9rem; font-size: .88rem; }
th, td { border: 1px solid #bdbdbd; padding: .25rem .45rem; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
thead th { background: #ececec; }
table.fields th { width: 14rem; background: #f6f6f6; font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: .86em;
       background: #f2f2f2; padding: 0 .15em; border-radius: 2px; overflow-wrap: anywhere; }
code.hash { word-break: break-all; }
pre { background: #f2f2f2; padding: .6rem .8rem; white-space: pre-wrap; overflow-wrap: anywhere; }
.mark { font-weight: 700; padding: 0 .35em; border: 1px solid currentColor; border-radius: 3px; white-space: nowrap; }
.mark.pass { color: #0f4d2a; background: #dcf5e6; }
.mark.fail { color: #7a1111; background: #fde2e2; }
.mark.warn { color: #5c3a00; background: #fdf0c8; }
.warning { border-left: 5px solid #8a5300; background: #fdf0c8; padding: .45rem .7rem; }
nav ol { columns: 2; margin: .3rem 0; }
figure { margin: .8rem 0 1rem; }
figcaption { font-size: .85rem; color: #404040; }
svg.chart { max-width: 100%; height: auto; }
.signoff { border: 2px solid #1a1a1a; padding: .5rem 1rem .8rem; margin-top: 1.2rem; }
.signoff th, .signoff td { border: none; }
.signoff th { width: 12rem; vertical-align: bottom; }
.signoff td { height: 2.4rem; border-bottom: 1px solid #1a1a1a; }
footer { margin-top: 2.5rem; font-size: .8rem; color: #404040; }
@page { size: A4; margin: 14mm; }
@media print {
  body { font-size: 9.5pt; max-width: none; padding: 0; }
  h2, h3 { break-after: avoid; }
  tr, figure, .signoff, .warning { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
  a[href^="http"]:not(.url)::after { content: " <" attr(href) ">"; font-size: .85em; overflow-wrap: anywhere; }
  .mark, .warning, thead th, table.fields th, code, pre { -webkit-print-color-adjust: exact;
                                                          print-color-adjust: exact; }
}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float | int | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:+,}" if signed else f"{value:,}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _clip(text: str, chars: int) -> str:
    """SVG text does not wrap: long user text is cut (the tables beside the chart show it whole)."""
    text = " ".join(str(text).split())
    return text if len(text) <= chars else text[:chars - 1] + "…"


def _text(x: float, y: float, text: str, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" {FONT} {extra}>{_esc(text)}</text>'


def _rect(x: float, y: float, width: float, height: float, fill: str, tooltip: str) -> str:
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{fill}" '
            f'stroke="#ffffff" stroke-width="0.5"><title>{_esc(tooltip)}</title></rect>')


def _svg(height: float, title: str, body: Sequence[str]) -> str:
    return (f'<svg class="chart" viewBox="0 0 {WIDTH} {height:.0f}" width="{WIDTH}" height="{height:.0f}" '
            f'role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>{"".join(body)}</svg>')


def _wrap(items: Sequence[str], width: float) -> list[str]:
    """Join items with " · " into lines that fit `width` pixels."""
    lines: list[str] = []
    for item in items:
        if lines and (len(lines[-1]) + 3 + len(item)) * CHAR_WIDTH <= width:
            lines[-1] += " · " + item
        else:
            lines.append(item)
    return lines


# --- (a) rows per data source --------------------------------------------------------------------------

def rows_chart(sources: Sequence[Mapping[str, Any]]) -> str:
    """One stacked bar per source, the full width being its rows in: kept, then each rejection reason
    (largest first). Shares, not counts, set the widths, so a 40-row source is as legible as a 1,600-row
    one; the counts are printed under each bar."""
    reasons = sorted({reason for source in sources for reason, n in source["rejected_by_reason"].items() if n})
    colors = {"kept": KEPT, **{reason: REASONS[i % len(REASONS)] for i, reason in enumerate(reasons)}}
    body, y = [], 4.0
    for source in sources:
        part, y = _source_bar(source, colors, y)
        body.append(part)
    legend, y = _legend(colors, y + 4)
    return _svg(y, "Rows per data source: kept, and rejected by reason (bar = rows in)", [*body, legend])


def _source_bar(source: Mapping[str, Any], colors: dict, y: float) -> tuple[str, float]:
    total, kept = source["rows_in"], source["rows_kept"]
    share = f"{kept / total:.1%} kept" if total else "no rows"
    parts = [_text(0, y + 13, f"{_clip(source['name'], 70)}: {total:,} rows in, {share}", 'font-weight="bold"')]
    segments = [("kept", kept)] + sorted(((reason, n) for reason, n in source["rejected_by_reason"].items() if n),
                                         key=lambda item: (-item[1], item[0]))
    x, top = 0.0, y + 20
    for name, n in segments:
        width = max(WIDTH * n / total, 1.5) if total and n else 0.0   # a 2-row reason still shows as a sliver
        width = min(width, WIDTH - x)
        fill, ink = colors[name]
        parts.append(_rect(x, top, width, BAR_HEIGHT, fill, f"{name}: {n:,} rows"))
        label = f"{n:,}"
        if width >= len(label) * CHAR_WIDTH + 8:   # the number inside its segment, where it fits
            parts.append(_text(x + 4, top + 15, label, f'fill="{ink}"'))
        x += width
    lines = _wrap([f"{name} {n:,}" for name, n in segments], WIDTH)
    y = top + BAR_HEIGHT
    for line in lines:
        y += 16
        parts.append(_text(0, y, line))
    return "".join(parts), y + 14


def _legend(colors: dict, y: float) -> tuple[str, float]:
    parts, x = [], 0.0
    for name, (fill, _) in colors.items():
        advance = 20 + len(name) * CHAR_WIDTH + 16
        if x and x + advance > WIDTH:
            x, y = 0.0, y + 20
        parts.append(_rect(x, y, 14, 14, fill, name) + _text(x + 19, y + 11.5, name))
        x += advance
    return f'<g class="legend">{"".join(parts)}</g>', y + 20


# --- (b) base vs tuned -----------------------------------------------------------------------------------

PANELS = (("rougeL", "ROUGE-L on the test split (higher is better)"),
          ("loss", "Loss on the test split (lower is better)"))
PANEL_WIDTH, PLOT_TOP, PLOT_BOTTOM = 340, 44, 190


def comparison_chart(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> str:
    """Two panels side by side, each with a base and a tuned bar on its own scale from zero."""
    body = [_panel(i * (WIDTH - PANEL_WIDTH), title, base.get(key), tuned.get(key))
            for i, (key, title) in enumerate(PANELS)]
    return _svg(PLOT_BOTTOM + 34, "Base vs tuned model on the test split: ROUGE-L and loss", body)


def _panel(x0: float, title: str, base: float | None, tuned: float | None) -> str:
    top = max(value for value in (base, tuned, 0.0) if value is not None) * 1.15 or 1.0
    parts = [_text(x0, 16, title, 'font-weight="bold"'),
             f'<line x1="{x0}" y1="{PLOT_BOTTOM}" x2="{x0 + PANEL_WIDTH}" y2="{PLOT_BOTTOM}" stroke="#1a1a1a"/>']
    for i, (label, value, (fill, _)) in enumerate((("base model", base, BASE), ("tuned model", tuned, TUNED))):
        x = x0 + 50 + i * 140
        height = (PLOT_BOTTOM - PLOT_TOP) * max(value or 0.0, 0.0) / top
        parts.append(_rect(x, PLOT_BOTTOM - height, 90, height, fill, f"{label}: {_num(value)}"))
        parts.append(_text(x + 45, PLOT_BOTTOM - height - 6, _num(value), 'text-anchor="middle" font-weight="bold"'))
        parts.append(_text(x + 45, PLOT_BOTTOM + 18, label, 'text-anchor="middle"'))
    return "".join(parts)


# --- (c) GGUF loss gaps -------------------------------------------------------------------------------------

LABEL_WIDTH, VALUE_WIDTH = 110, 150


def gguf_gap_chart(gguf: Mapping[str, Mapping[str, Any]]) -> str:
    """One bar per GGUF type: |validation loss - the merged model's|, labelled with the signed gap. Every
    gap is tiny (1e-3 is typical), so the scale is the largest gap, not the loss."""
    gaps = {name: entry.get("loss_gap") or 0.0 for name, entry in gguf.items()}
    largest = max((abs(gap) for gap in gaps.values()), default=0.0) or 1.0
    span = WIDTH - LABEL_WIDTH - VALUE_WIDTH
    title = "validation loss gap vs the merged model (closer to 0 is better)"
    parts, y = [_text(0, 14, title, 'font-weight="bold"')], 24.0
    for i, (name, gap) in enumerate(gaps.items()):
        width = span * abs(gap) / largest
        fill, _ = REASONS[i % len(REASONS)]
        parts.append(_text(0, y + 15, _clip(name, 16)))
        parts.append(_rect(LABEL_WIDTH, y, width, BAR_HEIGHT, fill, f"{name}: loss gap {_num(gap, signed=True)}"))
        parts.append(_text(LABEL_WIDTH + width + 6, y + 15, _num(gap, signed=True)))
        y += BAR_HEIGHT + 8
    return _svg(y + 4, "Validation loss gap of each GGUF file vs the merged model", parts)
