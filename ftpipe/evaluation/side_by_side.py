"""The side-by-side page: one offline HTML file where a reviewer reads the base and the tuned model's answer to
every test prompt next to the reference, with each metric, sortable and filterable by data source.

Hand-written because there is no maintained Python library for a static, sortable comparison page (table
generators either need a server or a CDN script); the sorting and filtering is ~50 lines of inline JavaScript.
The file is self-contained (inline CSS and JS, no external URL, font or script), so it opens from an archive or
an air-gapped machine exactly as it was reviewed. Every piece of text is HTML-escaped: model answers are
untrusted and may well contain markup.

The URL fragment sets the initial order and filter, e.g. ``side_by_side.html#sort=gain&dir=asc&source=docs``;
the default order is gain (tuned minus base of TASK_METRIC) descending. Sort keys are the column keys: ``id``,
``source``, ``prompt``, ``reference``, ``base``, ``tuned``, ``base_<metric>``, ``tuned_<metric>``, ``gain``.
Rows the filter hides carry the ``hidden`` attribute.
"""
from __future__ import annotations

import math
from html import escape
from pathlib import Path

from ftpipe.core.io import atomic_write_text
from ftpipe.evaluation.task_metrics import METRICS, TASK_METRIC

MODELS = ("base", "tuned")
TEXT_COLUMNS = (("id", "Id"), ("source", "Source"), ("prompt", "Prompt"), ("reference", "Reference"),
                ("base", "Base answer"), ("tuned", "Tuned answer"))

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1a1a1a; background: #fff; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #c8c8c8; padding: 4px 6px; vertical-align: top; }
th { background: #eef1f5; text-align: left; }
#examples th { cursor: pointer; user-select: none; }
#examples th[aria-sort=ascending]::after { content: " \\25B2"; }
#examples th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; max-width: 28em; overflow-wrap: anywhere; }
.up { color: #0a6b2d; } .down { color: #a31515; }
"""

# Sorts the example table by a column (numbers numerically, text alphabetically; ties keep the written order)
# and hides rows of other sources. The fragment (#sort=..&dir=..&source=..) sets both on load.
SCRIPT = """
(function () {
  var table = document.getElementById("examples"), body = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var filter = document.getElementById("source-filter");
  var state = {key: "gain", dir: "desc"};
  function value(row, index, numeric) {
    var cell = row.cells[index], text = cell.getAttribute("data-value");
    if (!numeric) return cell.textContent;
    var number = parseFloat(text);
    return isNaN(number) ? -Infinity : number;
  }
  function sortBy(key, dir) {
    var index = headers.findIndex(function (th) { return th.dataset.key === key; });
    if (index < 0) return;
    var numeric = headers[index].dataset.type === "num", sign = dir === "asc" ? 1 : -1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, index, numeric), y = value(b, index, numeric);
      var order = numeric ? (x > y) - (x < y) : x.localeCompare(y, undefined, {numeric: true});
      return order * sign || a.dataset.order - b.dataset.order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (th) { th.removeAttribute("aria-sort"); });
    headers[index].setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
    state = {key: key, dir: dir};
  }
  function show(source) {
    filter.value = source;
    source = filter.value;  // a source the page does not know falls back to all
    Array.prototype.forEach.call(body.rows, function (row) {
      row.hidden = source !== "" && row.dataset.source !== source;
    });
  }
  function applyFragment() {
    var params = new URLSearchParams(location.hash.slice(1));
    var key = params.get("sort") || "gain", dir = params.get("dir");
    var th = headers.find(function (h) { return h.dataset.key === key; });
    if (dir !== "asc" && dir !== "desc") dir = th && th.dataset.type === "text" ? "asc" : "desc";
    sortBy(key, dir);
    show(params.get("source") || "");
  }
  headers.forEach(function (th) {
    th.addEventListener("click", function () {
      var first = th.dataset.type === "num" ? "desc" : "asc";
      sortBy(th.dataset.key, state.key === th.dataset.key ? (state.dir === "asc" ? "desc" : "asc") : first);
    });
  });
  filter.addEventListener("change", function () { show(filter.value); });
  window.addEventListener("hashchange", applyFragment);
  applyFragment();
})();
"""


def _number(value: float | None, signed: bool = False) -> str:
    """A table cell for a score: 3 decimals shown, the full value in data-value for sorting."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="num" data-value="">–</td>'
    shown = f"{value:+.3f}" if signed else f"{value:.3f}"
    tone = ' up' if signed and value > 0 else ' down' if signed and value < 0 else ''
    return f'<td class="num{tone}" data-value="{float(value)!r}">{shown}</td>'


def _summary_table(summary: dict) -> str:
    """One row for all examples, then one per source: examples, and base, tuned and gain of each metric."""
    head = "<th>Source</th><th>Examples</th>" + "".join(
        f"<th>{escape(metric)} {label}</th>" for metric in METRICS for label in (*MODELS, "gain"))
    rows = [("all sources", summary.get("overall", {})), *summary.get("per_source", {}).items()]
    body = []
    for source, part in rows:
        cells = "".join(
            _number(part.get(MODELS[0], {}).get(metric)) + _number(part.get(MODELS[1], {}).get(metric))
            + _number(part.get("gain", {}).get(metric), signed=True) for metric in METRICS)
        body.append(f"<tr><td>{escape(str(source))}</td><td class=\"num\">{part.get('examples', 0)}</td>{cells}</tr>")
    return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _gain(sample: dict) -> float | None:
    """Tuned minus base of TASK_METRIC, or None when a score is missing."""
    scores = sample.get("scores", {})
    base, tuned = scores.get("base", {}).get(TASK_METRIC), scores.get("tuned", {}).get(TASK_METRIC)
    return None if base is None or tuned is None else tuned - base


def _example_header() -> str:
    cells = [f'<th data-key="{key}" data-type="text">{label}</th>' for key, label in TEXT_COLUMNS]
    cells += [f'<th data-key="{model}_{metric}" data-type="num">{model} {escape(metric)}</th>'
              for metric in METRICS for model in MODELS]
    cells.append(f'<th data-key="gain" data-type="num" title="tuned minus base {TASK_METRIC}">gain</th>')
    return f"<thead><tr>{''.join(cells)}</tr></thead>"


def _example_row(order: int, sample: dict) -> str:
    texts = "".join(f'<td class="text">{escape(str(sample.get(key, "")))}</td>' for key, _ in TEXT_COLUMNS)
    scores = sample.get("scores", {})
    numbers = "".join(_number(scores.get(model, {}).get(metric)) for metric in METRICS for model in MODELS)
    source = escape(str(sample.get("source", "")))
    return (f'<tr data-order="{order}" data-source="{source}">{texts}{numbers}'
            f"{_number(_gain(sample), signed=True)}</tr>")


def _source_filter(samples: list[dict]) -> str:
    sources = sorted({str(sample.get("source", "")) for sample in samples})
    options = "".join(f'<option value="{escape(source)}">{escape(source)}</option>' for source in sources)
    return (f'<label>Source <select id="source-filter"><option value="">all sources</option>{options}'
            f"</select></label>")


def render_side_by_side(samples: list[dict], summary: dict, title: str) -> str:
    """The page as a string (write_side_by_side writes it)."""
    rows = "".join(_example_row(order, sample) for order, sample in enumerate(samples))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{escape(title)}</h1>\n"
            f"<h2>Per source</h2>\n{_summary_table(summary)}\n"
            f"<h2>Examples</h2>\n<p>{len(samples)} test examples; click a column header to sort, "
            f"gain is tuned minus base {escape(TASK_METRIC)}. {_source_filter(samples)}</p>\n"
            f'<table id="examples">{_example_header()}<tbody>{rows}</tbody></table>\n'
            f"<script>{SCRIPT}</script>\n</body></html>\n")


def write_side_by_side(samples: list[dict], summary: dict, path: Path, title: str) -> None:
    """Write the page to `path` atomically (a temporary file in the same folder, then os.replace).

    samples: [{"id", "source", "prompt", "reference", "base", "tuned",
               "scores": {"base": {metric: v}, "tuned": {metric: v}}}, ...];
    summary: what ftpipe.evaluation.task_metrics.aggregate returns.
    """
    atomic_write_text(Path(path), render_side_by_side(samples, summary, title))
