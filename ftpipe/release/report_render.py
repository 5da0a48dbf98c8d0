"""The compliance report for people: Markdown, and one self-contained HTML page a reviewer reads and signs.

stages/report.py writes both next to report.json (tests/fixtures/report_example.json shows the dict's shape):

    (release / "report.md").write_text(render_markdown(report))
    (release / "report.html").write_text(render_html(report))

Sections, in this order (the HTML ids; the Markdown headings slugify to the same anchors):

    summary       verdict, concluded license, commercial use, commit, MLflow run, reviewer sign-off
    license       policy, each input's license, obligations (share-alike, attribution), warnings, reviewed
                  licenses (declared in params.yaml, with their reviewer), notes
    base-model    the base model as declared and as observed (file, hashes, architecture)
    data-sources  each source: declaration, observed origin, raw file hash, rows kept and rejected
    pii           personal data found per source, and what clean did with it
    stages        each DVC stage: command, dependency and output hashes, params, provenance, MLflow run
    training      params, metrics, the machine and packages it ran on
    evaluation    base vs tuned on the test split, a link to the side-by-side page of every example; the
                  evaluate gate's checks; task metrics per data source; general-text loss; drift against the
                  last release; standard benchmarks (when run); merge gap; each GGUF in llama.cpp: size, bits
                  per weight, tensor type mix, loss and gap, tokenizer, chat prompt and stop-token checks, the
                  greedy comparison, and the llama.cpp build (version, commit, flags) it was checked with
    memorization-audit
                  extraction per data source (tuned on train and on test, base on train, the gap), PII values
                  in the tuned model's answers, canaries (whether the model was trained with any; their
                  exposure, never their secrets), the audit gate's checks
    artifacts     every released file with its size and SHA-256 (a GGUF's Modelfile too), how to run a GGUF
    verification  the commands that re-check the release

Why one document model (ftpipe/release/report_document.py): build_sections() has each section written once as
blocks (fields, tables, paragraphs, charts), by report_sections.py (what was released and where it came from)
and report_evaluation.py (evaluation and the memorization audit); the two backends here only choose markup, so
the Markdown and the HTML cannot drift apart.

Why so careful with text: names, notes and URLs are declared by users. Every string is escaped for its
target (a source named "<script>" shows as text); links are made only from http(s) URLs and from relative paths
of release files (LocalLink: the side-by-side page); Markdown table
cells keep their row (| and newlines are escaped). The HTML page loads nothing: inline CSS and SVG charts
(ftpipe/release/report_charts.py), no scripts, and a Content-Security-Policy that forbids fetching anything. It
renders the same offline for every reviewer, and prints (@media print) with the sign-off block on paper.
"""
from __future__ import annotations

import html
import re
from typing import Any, Callable

from ftpipe.release.report_charts import STYLE
from ftpipe.release.report_document import (
    SAFE_PATH,
    SAFE_URL,
    SYMBOLS,
    Chart,
    Code,
    Commands,
    Fields,
    Hash,
    Heading,
    Inline,
    Items,
    Link,
    LocalLink,
    Mark,
    Para,
    Section,
    SignOff,
    Table,
)
from ftpipe.release.report_evaluation import audit_section, evaluation
from ftpipe.release.report_sections import (
    artifacts,
    base_model,
    data_sources,
    license_section,
    pii_section,
    stages_section,
    summary,
    training,
    verdict,
    verification,
)

SECTIONS: list[tuple[str, str, Callable[[dict], list]]] = [
    ("summary", "Summary", summary), ("license", "License", license_section), ("base-model", "Base model", base_model),
    ("data-sources", "Data sources", data_sources), ("pii", "PII", pii_section), ("stages", "Stages", stages_section),
    ("training", "Training", training), ("evaluation", "Evaluation", evaluation),
    ("memorization-audit", "Memorization audit", audit_section), ("artifacts", "Artifacts", artifacts),
    ("verification", "Verification", verification)]


def build_sections(report: dict) -> list[Section]:
    return [Section(section_id, title, build(report)) for section_id, title, build in SECTIONS]


# --- Markdown (GitHub-flavoured) ------------------------------------------------------------------------------

MD_SPECIAL = re.compile(r"([\\`*\[\]<>|#~&])")   # what could open markup or end a table cell
NEWLINE = re.compile(r"\r\n|\r|\n")
SIGNOFF_TEXT = ("I have reviewed this report, the licenses and obligations it lists and the evidence it points to, "
                "and decide on the release of the artifacts it lists for the intended use stated above.")
DECISION = "Decision: ☐ approved   ☐ approved with conditions   ☐ rejected"
SIGNOFF_LINES = ("Name", "Date", "Signature", "Conditions / comments")


def md_text(text: str) -> str:
    return NEWLINE.sub("<br>", MD_SPECIAL.sub(r"\\\1", text))


def md_code(text: str, cell: bool) -> str:
    """A code span that survives any content: a fence longer than its backtick runs; in a table, \\| (GFM
    splits cells before it parses code spans)."""
    text = " ".join(NEWLINE.split(text))
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|') if cell else text}{pad}{fence}" if text else ""


def md(item: Inline, cell: bool = False) -> str:
    match item:
        case str():
            return md_text(item)
        case Code(text) | Hash(text):
            return md_code(text, cell)
        case Link(text, url) if SAFE_URL.fullmatch(url):
            return f"[{md_text(text)}]({url.replace('|', '%7C').replace('(', '%28').replace(')', '%29')})"
        case Link(text, url):
            return md_text(text if text == url else f"{text} ({url})")
        case LocalLink(text, path) if SAFE_PATH.fullmatch(path):
            return f"[{md_text(text)}]({path})"
        case LocalLink(text, path):
            return md_text(f"{text} ({path})")
        case Mark(kind, text):
            return f"**{SYMBOLS[kind]} {md_text(text)}**"
        case tuple():
            return "".join(md(part, cell) for part in item)
    raise TypeError(f"not an inline value: {item!r}")


def md_line_start(text: str) -> str:
    """User text opening a list item must not open a nested list or heading ("- x", "1. x")."""
    return re.sub(r"^(\d+)([.)])", r"\1\\\2", re.sub(r"^([-+=])", r"\\\1", text))


def md_block(block: Any) -> list[str]:
    match block:
        case Fields(rows):
            return [f"- **{md_text(label)}:** {md(item)}" for label, item in rows]
        case Table(headers, rows, numeric):
            align = ["---:" if i in numeric else "---" for i in range(len(headers))]
            return [f"| {' | '.join(headers)} |", f"| {' | '.join(align)} |",
                    *(f"| {' | '.join(md(cell, cell=True) for cell in row)} |" for row in rows)]
        case Para(text, warning):
            return [f"> **⚠ Warning:** {md(text)}" if warning else md_line_start(md(text))]
        case Items(items, ordered):
            return [f"{f'{i}.' if ordered else '-'} {md_line_start(md(item))}" for i, item in enumerate(items, 1)]
        case Heading(text):
            return [f"### {md(text)}"]
        case Commands(lines):
            fence = "`" * max([3, *(len(run) + 1 for line in lines for run in re.findall("`+", line))])
            return [f"{fence}sh", *(" ".join(NEWLINE.split(line)) for line in lines), fence]
        case Chart():
            return []
        case SignOff():
            return ["### Reviewer sign-off", "", SIGNOFF_TEXT, "", DECISION, "",
                    *(f"- {line}: {'_' * 40}" for line in SIGNOFF_LINES)]
    raise TypeError(f"not a block: {block!r}")


def render_markdown(report: dict) -> str:
    """The report as GitHub-flavoured Markdown: the HTML's sections and tables, without the charts."""
    sections = build_sections(report)
    lines = [f"# {md_text(report['title'])}", "", f"Compliance report created {md_text(report['created_at'])}; "
             f"{md_code(report['release']['report_json'], False)} is the authoritative record.", "",
             *(f"{i}. [{section.title}](#{section.id})" for i, section in enumerate(sections, 1)), ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            rendered = md_block(block)
            lines += [*rendered, ""] if rendered else []
    return "\n".join(lines).rstrip("\n") + "\n"


# --- HTML: one page, nothing fetched -----------------------------------------------------------------------------

# Defence in depth under the escaping: even injected markup could run no script and fetch nothing.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def h(item: Inline) -> str:
    match item:
        case str():
            return esc(item).replace("\n", "<br>")
        case Code(text):
            return f"<code>{esc(text)}</code>"
        case Hash(text):
            return f'<code class="hash" title="{esc(text)}">{esc(text)}</code>'
        case Link(text, url) if SAFE_URL.fullmatch(url):
            shown = ' class="url"' if text == url else ""   # print adds no second copy of a shown URL
            return f'<a{shown} href="{esc(url)}">{esc(text)}</a>'
        case Link(text, url):
            return esc(text if text == url else f"{text} ({url})")
        case LocalLink(text, path) if SAFE_PATH.fullmatch(path):
            return f'<a href="{esc(path)}">{esc(text)}</a>'
        case LocalLink(text, path):
            return esc(f"{text} ({path})")
        case Mark(kind, text):
            return f'<span class="mark {kind}">{SYMBOLS[kind]} {esc(text)}</span>'
        case tuple():
            return "".join(map(h, item))
    raise TypeError(f"not an inline value: {item!r}")


def h_table(headers: tuple, rows: list, numeric: tuple) -> str:
    num = [' class="num"' if i in numeric else "" for i in range(len(headers))]
    head = "".join(f'<th scope="col"{num[i]}>{esc(header)}</th>' for i, header in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{num[i]}>{h(item)}</td>" for i, item in enumerate(row)) + "</tr>\n"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody></table>"


def h_block(block: Any) -> str:
    match block:
        case Fields(rows):
            body = "".join(f'<tr><th scope="row">{esc(label)}</th><td>{h(item)}</td></tr>\n' for label, item in rows)
            return f'<table class="fields"><tbody>{body}</tbody></table>' if rows else ""
        case Table(headers, rows, numeric):
            return h_table(headers, rows, numeric)
        case Para(text, warning):
            return f'<p class="warning" role="note"><strong>⚠ Warning:</strong> {h(text)}</p>' if warning \
                else f"<p>{h(text)}</p>"
        case Items(items, ordered):
            tag = "ol" if ordered else "ul"
            return f"<{tag}>{''.join(f'<li>{h(item)}</li>' for item in items)}</{tag}>"
        case Heading(text):
            return f"<h3>{h(text)}</h3>"
        case Commands(lines):
            return f"<pre><code>{esc(chr(10).join(lines))}</code></pre>"
        case Chart(svg, caption):
            return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"
        case SignOff():
            lines = "".join(f'<tr><th scope="row">{esc(line)}</th><td></td></tr>' for line in SIGNOFF_LINES)
            return (f'<div class="signoff"><h3>Reviewer sign-off</h3><p>{esc(SIGNOFF_TEXT)}</p><p>{esc(DECISION)}</p>'
                    f"<table>{lines}</table></div>")
    raise TypeError(f"not a block: {block!r}")


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG; no script, nothing fetched)."""
    sections = build_sections(report)
    toc = "".join(f'<li><a href="#{section.id}">{esc(section.title)}</a></li>' for section in sections)
    body = "\n".join(f'<section id="{section.id}">\n<h2>{esc(section.title)}</h2>\n'
                     + "\n".join(filter(None, map(h_block, section.blocks))) + "\n</section>" for section in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(report['title'])} — compliance report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f'<header><p class="kicker">Compliance report</p><h1>{esc(report["title"])}</h1>'
            f"<p>Created {esc(report['created_at'])} · {h(verdict(report['compliance']))}</p></header>\n"
            f'<nav aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>\n<main>\n{body}\n</main>\n'
            f"<footer>Rendered by ftpipe.release.report_render from {esc(report['release']['report_json'])}, the "
            f"authoritative record; check it with {esc(report['release']['verify_command'])}.</footer>\n</body>\n"
            f"</html>\n")

