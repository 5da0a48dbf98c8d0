"""ftpipe.release.report_render: the compliance report as Markdown and as one offline HTML page a reviewer signs.

The example report (tests/fixtures/report_example.json) renders with every section in order and every hash;
hostile declared text stays text; the page fetches nothing; a minimal report (one source, no GGUF, no MLflow,
no PII) renders too; and headless Chromium shows the sections and the charts (tests/chromium.py).
"""
from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ftpipe.release.report_render import render_html, render_markdown
from tests.chromium import RenderedPage, assert_screenshot_drawn, require_chromium, run_chromium

EXAMPLE = Path(__file__).parents[1] / "fixtures" / "report_example.json"
SECTIONS = [("summary", "Summary"), ("license", "License"), ("base-model", "Base model"),
            ("data-sources", "Data sources"), ("pii", "PII"), ("stages", "Stages"), ("training", "Training"),
            ("evaluation", "Evaluation"), ("memorization-audit", "Memorization audit"), ("artifacts", "Artifacts"),
            ("verification", "Verification")]
HOSTILE = "<script>alert(1)</script>"
DIGEST = re.compile(r"\b[0-9a-f]{32,64}(?:\.dir)?\b")


@pytest.fixture
def report() -> dict:
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


def minimal(report: dict) -> dict:
    """One source, no GGUF, MLflow unavailable, no PII found, and an unknown license that is only flagged."""
    report = copy.deepcopy(report)
    report["data_sources"] = report["data_sources"][:1]
    report["evaluation"]["gguf"] = {}
    report["artifacts"] = [artifact for artifact in report["artifacts"] if artifact["kind"] != "gguf"]
    report["mlflow"] = {key: None for key in report["mlflow"]}
    report["stages"][0]["mlflow_run_id"] = None
    compliance = report["compliance"]
    compliance["policy"]["unknown_blocks"] = False
    compliance["inputs"] = compliance["inputs"][:2]
    compliance["inputs"][1]["declared"] = compliance["inputs"][1]["chosen"] = "LicenseRef-House"
    compliance["unknown_licenses"] = [{"source": "python_stdlib_docs", "license": "LicenseRef-House",
                                       "reason": "no properties row for LicenseRef-House"}]
    compliance.update(share_alike=[], non_commercial_sources=[], notes=[], commercial_use_allowed=False)
    return report


def digests(item) -> set[str]:
    """Every hex digest (md5, SHA-256, commit, run ids) anywhere in the report."""
    if isinstance(item, dict):
        return set().union(*map(digests, item.values())) if item else set()
    if isinstance(item, list):
        return set().union(*map(digests, item)) if item else set()
    return set(DIGEST.findall(item)) if isinstance(item, str) else set()


class Page(HTMLParser):
    """What the tests read of an HTML page: each section's id, h2 text and text, every src or href, the text of
    code.hash elements, the SVG charts (aria-label and text), every attribute name, and the visible text."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.sections, self.refs, self.hashes, self.charts, self.tags, self.text = [], [], [], [], [], ""
        self.attributes: set[str] = set()
        self._capture: list | None = None   # [kind, text]: a section's h2 or a code.hash
        self._style, self._svg = False, 0
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attributes |= set(attrs)
        self.refs += [(tag, name, attrs[name]) for name in ("src", "href", "srcset", "data") if attrs.get(name)]
        if tag == "section":
            self.sections.append([attrs.get("id"), "", ""])
        elif tag == "h2" and self.sections and not self.sections[-1][1]:
            self._capture = ["h2", ""]
        elif tag == "code" and "hash" in (attrs.get("class") or "").split():
            self._capture = ["hash", ""]
        elif tag == "svg":
            self.charts.append({"label": attrs.get("aria-label"), "text": ""})
        self._style |= tag == "style"
        self._svg += tag == "svg"

    def handle_endtag(self, tag):
        if self._capture and tag in ("h2", "code"):
            kind, text = self._capture
            if kind == "h2":
                self.sections[-1][1] = text.strip()
            else:
                self.hashes.append(text)
            self._capture = None
        self._style &= tag != "style"
        self._svg -= tag == "svg"

    def handle_data(self, data):
        if self._style:
            return
        self.text += data
        if self.sections:
            self.sections[-1][2] += data
        if self._capture:
            self._capture[1] += data
        if self._svg:
            self.charts[-1]["text"] += data + " "


def md_headings(markdown: str, level: str = "##") -> list[str]:
    return [line[len(level) + 1:] for line in markdown.splitlines() if line.startswith(level + " ")]


def md_subsection(markdown: str, heading: str) -> str:
    """The text under a ### heading, up to the next heading."""
    return markdown.split(f"\n### {heading}\n", 1)[1].split("\n#", 1)[0]


def md_tables(markdown: str) -> list[list[list[str]]]:
    """Each GFM table as rows of cells: split on pipes not escaped with a backslash."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif current:
            tables.append(current)
            current = []
    return tables


# --- Markdown -------------------------------------------------------------------------------------------------

def test_markdown_has_every_section_in_order_with_a_contents_list(report):
    markdown = render_markdown(report)
    assert markdown.startswith(f"# {report['title']}\n")
    assert md_headings(markdown) == [title for _, title in SECTIONS]
    for section_id, title in SECTIONS:   # the anchors GitHub derives from the headings are the HTML ids
        assert f"[{title}](#{section_id})" in markdown


def test_markdown_shows_every_hash_and_the_verdict(report):
    markdown = render_markdown(report)
    expected = digests(report)
    assert len(expected) > 20   # the example has many: the test is not vacuous
    assert sorted(digest for digest in expected if digest not in markdown) == []
    assert "✓ PASS" in markdown and f"`{report['compliance']['concluded_license']}`" in markdown
    assert "sha256sum -c models/release/MANIFEST.sha256" in markdown and "python -m ftpipe.release.verify" in markdown
    assert "Reviewer sign-off" in markdown and "- Signature: ____" in markdown


def test_markdown_names_the_non_commercial_source_and_its_license(report):
    markdown = render_markdown(report)
    non_commercial = md_subsection(markdown, "Non-commercial sources")
    assert "| lab_notes | CC-BY-NC-4.0 |" in non_commercial
    summary = markdown.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    assert "not allowed" in summary and "lab_notes (CC-BY-NC-4.0)" in summary


def test_markdown_cells_keep_their_row_whatever_the_declared_text(report):
    report["compliance"]["inputs"][1]["name"] = "docs | part\ntwo"
    report["compliance"]["attribution"][0]["notice"] = "keep `NOTICE` | and\r\nstate changes"
    report["stages"][0]["cmd"] = "python -m stages.base | tee log"
    markdown = render_markdown(report)
    tables = md_tables(markdown)
    assert len(tables) > 10
    for table in tables:
        assert len({len(row) for row in table}) == 1, f"a row lost its shape: {table}"
    (inputs,) = [table for table in tables if table[0] == ["Role", "Name", "Declared", "Chosen"]]
    assert inputs[3] == ["data source", r"docs \| part<br>two", "PSF-2.0", "PSF-2.0"]
    assert r"keep \`NOTICE\` \| and<br>state changes" in markdown
    assert r"`python -m stages.base \| tee log`" in markdown


def test_markdown_escapes_markup_in_declared_text(report):
    report["data_sources"][0]["name"] = HOSTILE
    report["compliance"]["notes"] = ["# not a heading", "1. not a list"]
    markdown = render_markdown(report)
    assert HOSTILE not in markdown and r"\<script\>alert(1)\</script\>" in markdown
    assert "- \\# not a heading" in markdown and "- 1\\. not a list" in markdown
    assert md_headings(markdown) == [title for _, title in SECTIONS]


# --- HTML -----------------------------------------------------------------------------------------------------

def test_html_has_every_section_in_order_with_a_table_of_contents(report):
    page = Page(render_html(report))
    assert [tuple(section[:2]) for section in page.sections] == SECTIONS
    toc = [value for tag, name, value in page.refs if tag == "a" and value.startswith("#")]
    assert toc[:len(SECTIONS)] == [f"#{section_id}" for section_id, _ in SECTIONS]
    assert page.tags[:2] == ["html", "head"] and "✓ PASS" in page.text


def test_html_escapes_hostile_declared_text(report):
    report["data_sources"][1]["name"] = HOSTILE
    report["compliance"]["notes"].append(f'" onmouseover="alert(2) {HOSTILE}')
    report["data_sources"][2]["license_url"] = "javascript:alert(3)"
    html = render_html(report)
    page = Page(html)
    assert "script" not in page.tags and HOSTILE in page.text   # shown as text, never an element
    assert f'" onmouseover="alert(2) {HOSTILE}' in page.text and not [a for a in page.attributes if a.startswith("on")]
    assert not [ref for ref in page.refs if "javascript:" in ref[2]]
    assert "javascript:alert(3)" in page.text   # the URL is still shown, as text
    assert any(HOSTILE in chart["text"] for chart in page.charts)   # the chart's label is escaped too


def test_html_references_nothing_external(report):
    html = render_html(report)
    page = Page(html)
    allowed = {report["mlflow"]["ui_url"], report["base_model"]["license_url"],
               *(source["license_url"] for source in report["data_sources"])}
    for tag, name, value in page.refs:
        assert value.startswith("#") or (tag, name) == ("a", "href") and value in allowed, (tag, name, value)
    assert not {"link", "script", "img", "iframe", "object", "embed", "video", "audio"} & set(page.tags)
    assert "@import" not in html and "url(" not in html and "@font-face" not in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert "@media print" in html


def test_html_hashes_are_monospace_and_whole(report):
    page = Page(render_html(report))
    run_ids = {report["mlflow"]["pipeline_run_id"], report["mlflow"]["report_run_id"],
               *(stage["mlflow_run_id"] for stage in report["stages"])}   # ids, shown as links or code
    expected = digests(report) - run_ids
    assert len(expected) > 20 and sorted(expected - set(page.hashes)) == []
    assert re.search(r'<code class="hash" title="([0-9a-f]{64})">\1</code>', render_html(report))


def test_html_charts_show_rows_models_and_gguf_gaps_with_their_numbers(report):
    page = Page(render_html(report))
    charts = {chart["label"]: " ".join(chart["text"].split()) for chart in page.charts}
    assert len(charts) == 3
    rows = next(text for label, text in charts.items() if label.startswith("Rows per data source"))
    for needle in ("python_stdlib_docs", "1,517", "answer_too_short 86", "contaminates_evaluation 2",
                   "forum_answers", "placeholder_answer 7", "lab_notes", "kept 40"):
        assert needle in rows
    legend = rows.split("kept 40", 1)[1]   # the legend follows the last bar: every category, once
    assert all(reason in legend for reason in ("kept", "answer_too_long", "near_duplicate", "placeholder_answer"))
    models = next(text for label, text in charts.items() if label.startswith("Base vs tuned"))
    assert all(needle in models for needle in ("ROUGE-L", "0.1124", "0.2383", "Loss", "3.862", "2.568", "tuned model"))
    gguf = next(text for label, text in charts.items() if "GGUF" in label)
    assert "f16" in gguf and "q8_0" in gguf and "+0.001143" in gguf and "q4_k_m" in gguf and "+0.05378" in gguf


def test_both_documents_show_each_gguf_as_llama_cpp_checked_it(report):
    """Size, bits per weight and the real tensor mix of each GGUF (a Q4_K_M file on 576-wide rows is mostly Q5_0 and
    Q8_0), its llama.cpp checks, the greedy comparison and the llama.cpp build."""
    markdown, page = render_markdown(report), Page(render_html(report))
    section = markdown.split("\n### GGUF files\n", 1)[1].split("\n## ", 1)[0]
    tables = md_tables(section)
    assert tables[0][0] == ["Type", "Size", "Bits per weight", "Tensor types (share of weights)"]
    assert tables[0][4] == ["q4_k_m", "105,453,984 B (100.6 MiB)", "6.165",
                            r"Q5_0 166 tensors (58.0% of weights), Q8_0 15 (22.2%), Q4_K 16 (10.5%), Q6_K 14 (9.2%), "
                            r"F32 61 (\<0.1%)"]
    assert tables[0][2][2] == "16.004"
    assert tables[1][0] == ["Type", "Validation loss (llama.cpp)", "Loss gap vs merged", "Tokenizer mismatches",
                            "Chat prompt mismatches", "Stop-token problems"]
    assert tables[1][4] == ["q4_k_m", "2.799", "0.05378", "0", "0 of 81", "none"]
    assert ("- **Checked in:** llama.cpp commit 0c1e57098 (llama-cpp-python 0.3.36), built with -DGGML_NATIVE=OFF "
            "(GNU 12.2.0)") in section
    assert "- **Converter (float types, q8_0):** llama.cpp convert_hf_to_gguf.py 0c1e57098 (gguf 0.19.0)" in section
    assert "- **End-of-turn tokens:** `<|im_end|>`" in section
    greedy = md_subsection(markdown, "Greedy answers: the f16 GGUF in llama.cpp vs the merged model")
    assert ("- **Result:** **✓ pass** — the same text as the merged model on 9 of 10 validation prompts (9 needed); "
            "stopped at the end-of-turn token where the merged model stopped on 10 of 10") in greedy
    pairs = md_tables(greedy)[0]
    assert len(pairs) == 2 + 10 and ["What does \\`yield\\` do?", "It makes the function a generator that produces "
                                     "values lazily.", "It makes the function a generator that produces values one "
                                     "by one.", "no", "yes / yes"] in pairs
    evaluation = page.sections[7][2]
    for needle in ("Q5_0 166 tensors (58.0% of weights)", "0 of 81", "✓ pass", "llama.cpp commit 0c1e57098",
                   "-DGGML_NATIVE=OFF", "9 of 10 (9 needed: quantize.min_greedy_agreement)"):
        assert needle in evaluation, needle


def test_failed_gguf_checks_are_marked(report):
    report["evaluation"]["gguf"]["q8_0"].update(chat_prompt_mismatches=2, tokenizer_mismatches=1,
                                                stop_token_problems=["llama.cpp does not end generation at 2"])
    report["evaluation"]["gguf_greedy"].update(same_text=4)
    markdown = render_markdown(report)
    (checks,) = [table for table in md_tables(markdown) if table[0][0:2] == ["Type", "Validation loss (llama.cpp)"]]
    assert checks[3] == ["q8_0", "2.746", "0.001143", "**⚠ 1**", "**⚠ 2 of 81**",
                         "**⚠ llama.cpp does not end generation at 2**"]
    assert "- **Result:** **✗ FAIL** — the same text as the merged model on 4 of 10" in markdown


def test_gguf_artifacts_list_their_modelfile_and_how_to_run(report):
    from ftpipe.release.gguf_release import modelfile_facts

    markdown = render_markdown(report)
    artifact = next(a for a in report["artifacts"] if a["name"] == "gguf-q4_k_m")
    listed = md_subsection(markdown, "gguf-q4_k_m")
    facts = modelfile_facts(report, artifact)
    row = f"| `models/release/gguf-q4_k_m/Modelfile` | {facts['bytes']:,} B (2.2 KiB) | `{facts['sha256']}` |"
    assert row in listed
    assert "- **Run with Ollama:** `ollama create smollm2-135m-instruct-ftpipe-q4_k_m -f Modelfile`" in listed
    assert "`python -m ftpipe.chat --model gguf:q4_k_m`<br>`python -m ftpipe.serve --gguf q4_k_m`" in listed
    assert "ChatML: the Modelfile writes it as an explicit TEMPLATE with the template's default SYSTEM" in listed
    assert "im_start" not in listed   # the Jinja template itself stays in report.json


def test_html_shows_a_failed_gate_with_its_violations(report):
    report["compliance"].update(verdict="fail", violations=[
        {"source": "lab_notes", "role": "data source", "license": "CC-BY-NC-4.0", "rule": "non-commercial",
         "reason": "non-commercial license, intended_use is commercial", "fix": "remove the data source"}])
    page = Page(render_html(report))
    assert "✗ FAIL" in page.text and "1 violation(s)" in page.text and "✓ PASS" not in page.text
    assert "non-commercial license, intended_use is commercial" in page.text
    assert "Warning:" in page.text   # the violations are flagged in words, not only by colour
    assert "✗ FAIL" in render_markdown(report)


# --- a minimal report -------------------------------------------------------------------------------------------

def test_minimal_report_renders_both_ways(report):
    small = minimal(report)
    markdown, page = render_markdown(small), Page(render_html(small))
    summary = page.sections[0][2], markdown.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    assert all("MLflow pipeline run" in text and "not logged to MLflow" in text for text in summary)
    for text in (markdown, page.text):
        assert "none found" in text
        assert "none: no GGUF file was produced" in text and "model-q8_0.gguf" not in text
        assert "LicenseRef-House" in text and "are only flagged" in text
    assert [section[0] for section in page.sections] == [section_id for section_id, _ in SECTIONS]
    assert md_headings(markdown) == [title for _, title in SECTIONS]
    assert "PII: none found in any data source." in markdown
    assert "> **⚠ Warning:** 1 license(s) unknown to ftpipe" in markdown
    assert "forum_answers" not in markdown.split("## Data sources", 1)[1].split("## PII", 1)[0]
    assert len(page.charts) == 2   # rows and base vs tuned; no GGUF chart without GGUF files
    assert "127.0.0.1" not in markdown and not [ref for ref in page.refs if ref[2].startswith("http://")]


# --- as a reviewer sees it: rendered by a real browser, offline ------------------------------------------------

def rendered_in_chromium(report: dict, tmp_path: Path) -> tuple:
    """(chromium, the page file, its DOM after Chromium rendered it, RenderedPage, Page) of `report` as HTML."""
    chromium = require_chromium()
    page_file = tmp_path / "report.html"
    page_file.write_text(render_html(report), encoding="utf-8")
    dom = run_chromium(chromium, tmp_path / "profile-dom", page_file.as_uri(), "--dump-dom")
    return chromium, page_file, dom, RenderedPage(dom), Page(dom)


def test_chromium_renders_every_section_and_the_charts(report, tmp_path):
    chromium, page_file, dom, rendered, outline = rendered_in_chromium(report, tmp_path)
    assert [tuple(section[:2]) for section in outline.sections] == SECTIONS
    for _, title in SECTIONS:
        assert title in rendered.text
    assert "Reviewer sign-off" in rendered.text and "lab_notes" in rendered.text
    assert len(outline.charts) == 3 and dom.count("<rect") > 15
    assert rendered.links["#data-sources"] == "Data sources"

    assert_screenshot_drawn(chromium, tmp_path / "profile-screenshot", page_file.as_uri(), tmp_path / "report.png",
                            1280, 2000)


# --- commercial use not established, and licenses a reviewer declared ------------------------------------------

def test_an_unknown_license_only_flagged_reads_not_established_with_the_fix(report):
    small = minimal(report)   # an older report: commercial_use_allowed false, no commercial_use key
    for compliance in (small["compliance"], dict(small["compliance"], commercial_use="unknown")):
        small["compliance"] = compliance
        markdown, page = render_markdown(small), Page(render_html(small))
        summary = markdown.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
        assert ("- **Commercial use:** **⚠ not established** — no input's license forbids it, but these licenses "
                "are unknown to ftpipe: python_stdlib_docs (LicenseRef-House); the license gate only flagged them "
                "because compliance.unknown_blocks is false. To establish it, read each license's text and declare it "
                "under `compliance.reviewed_licenses` in params.yaml") in summary
        assert "not allowed" not in summary and "✓ PASS" in summary
        for text in (page.sections[0][2], page.sections[1][2]):
            assert "⚠ not established" in text and "declare it under compliance.reviewed_licenses" in text
        assert "declare it under `compliance.reviewed_licenses` in params.yaml (its properties, URL and reviewer)" \
            in md_subsection(markdown, "Unknown licenses")


def test_a_reviewed_license_is_listed_with_its_reviewer_and_a_link_to_its_text(report):
    small = minimal(report)
    small["compliance"].update(unknown_licenses=[], commercial_use="allowed", commercial_use_allowed=True,
                               reviewed_licenses=[{
                                   "id": "LicenseRef-House", "name": "House License",
                                   "url": "https://house.example/license",
                                   "properties": {"commercial_use": True, "copyleft": "none", "no_derivatives": False,
                                                  "attribution": None, "notes": ""},
                                   "reviewed_by": f"J. Doe {HOSTILE}, 2026-11-30", "used_by": ["python_stdlib_docs"]}])
    markdown, page_html = render_markdown(small), render_html(small)
    page = Page(page_html)
    assert ("- **Commercial use:** **✓ allowed** — LicenseRef-House as declared by a reviewer: see Reviewed "
            "licenses") in markdown
    reviewed = md_subsection(markdown, "Reviewed licenses")
    assert md_tables(reviewed) == [[
        ["License", "Name", "Text", "Reviewed by", "Used by", "Properties"], ["---"] * 6,
        ["`LicenseRef-House`", "House License", "[https://house.example/license](https://house.example/license)",
         "J. Doe \\<script\\>alert(1)\\</script\\>, 2026-11-30", "python_stdlib_docs",
         "commercial_use: yes, copyleft: none, no_derivatives: no, attribution: —, notes:"]]]
    assert ("a", "href", "https://house.example/license") in page.refs
    assert "<script>" not in page_html and f"J. Doe {HOSTILE}, 2026-11-30" in page.text   # text, not markup
    assert "Reviewed licenses" in page.sections[1][2]


def test_a_report_without_reviewed_licenses_says_none(report):
    reviewed = md_subsection(render_markdown(report), "Reviewed licenses")
    assert reviewed.strip() == ("none: the properties of every known license come from "
                                "ftpipe/compliance/license_table.py")


def test_a_hub_base_model_shows_its_commit_page_and_every_file_hash(report):
    from tests.release_fixtures import HUB_COMMIT, HUB_FILES_SHA256, with_hub_base

    report = with_hub_base(report)
    url = f"https://huggingface.co/tiny-org/tiny-llama/tree/{HUB_COMMIT}"
    markdown, page = render_markdown(report), render_html(report)
    section = markdown.split("\n## Base model\n", 1)[1].split("\n## ", 1)[0]
    assert f"[{url}]({url})" in section and f'href="{url}"' in page
    files = md_tables(md_subsection(markdown, "Base model source files"))[0]
    assert files[0] == ["File", "SHA-256"]
    assert files[2:] == [[f"`{name}`", f"`{digest}`"] for name, digest in sorted(HUB_FILES_SHA256.items())]
    assert "downloaded" in section


def test_a_gguf_base_models_check_against_llama_cpp_is_shown(report):
    import html

    from tests.release_fixtures import GGUF_CHECK

    report["base_model"]["gguf_check"] = GGUF_CHECK   # mean KL 0.00465 nats
    for text in (render_markdown(report), html.unescape(render_html(report))):
        assert ("mean KL divergence of llama.cpp's next-token distributions from transformers' 0.00465 nats (limit "
                "0.1) over 72 positions of 6 texts; top-1 agreement 92%") in text


# --- the evaluate stage's gates, per-source metrics, drift, general text, harness; the memorization audit -------

@pytest.fixture
def gated(report) -> dict:
    from tests.release_fixtures import with_gates_and_audit

    return with_gates_and_audit(report)


def test_both_documents_show_the_evaluate_gate_per_source_metrics_drift_general_text_and_harness(gated):
    markdown, page = render_markdown(gated), Page(render_html(gated))
    gate = md_tables(md_subsection(markdown, "Release gate"))[0]
    assert gate[0] == ["Key", "Metric", "Value", "Threshold", "Result"]
    assert gate[2] == ["`evaluate.gate.min_gain`", "rougeL gain of tuned over base", "0.13", "≥ 0.05", "**✓ pass**"]
    assert gate[3][3:] == ["≤ 0.25", "**✓ pass**"]
    verdict = "- **Verdict:** **✓ PASSED** — all 2 check(s) of evaluate.gate met"
    assert verdict in md_subsection(markdown, "Release gate")
    per_source = md_tables(md_subsection(markdown, "Task metrics per data source"))[0]
    assert per_source[0] == ["Source", "Examples", "ROUGE-L", "chrF", "Exact match", "Token F1"]
    assert per_source[2] == ["all sources", "2", "0.11 → 0.24 (+0.13)", "0.21 → 0.37 (+0.16)", "0 → 0.5 (+0.5)",
                             "0.14 → 0.31 (+0.17)"]
    assert per_source[3][:3] == ["forum_answers", "1", "0.12 → 0.3 (+0.18)"]
    assert [row[0] for row in per_source[2:]] == ["all sources", "forum_answers", "python_stdlib_docs"]
    general = md_subsection(markdown, "General text")
    assert "- **Text:** `builtin:python-docs-prose` — Python 3.12 documentation, tutorial prose" in general
    assert "- **License:** `PSF-2.0`" in general and "- **Loss increase (tuned − base):** **⚠ +0.11**" in general
    assert md_tables(general)[0][2:] == [["base", "2.91", "18.36"], ["tuned", "3.02", "20.49"]]
    drift = md_subsection(markdown, "Drift against the last release")
    assert md_tables(drift)[0][2] == ["rougeL", "0.22", "0.24", "-0.02", "0.02", "**✓ ok**"]
    assert "- loss: not compared, measured on other examples than the baseline's" in drift
    harness = md_tables(md_subsection(markdown, "Standard benchmarks"))[0]
    assert harness[2] == ["arc_easy", "acc", "0.58", "0.57", "-0.01 (worse)"]
    # the main table names the new task metrics
    (scores,) = [table for table in md_tables(markdown) if table[0][0] == "Metric" and table[0][1] == "Base"]
    assert ["chrF", "0.21", "0.37", "+0.16 (better)"] in scores
    assert ["Exact match", "0", "0.5", "+0.5 (better)"] in scores
    evaluation = page.sections[7][2]
    for needle in ("Release gate", "✓ PASSED", "evaluate.gate.min_gain", "0.12 → 0.3 (+0.18)", "tutorial prose",
                   "✓ ok", "arc_easy", "side-by-side page"):
        assert needle in evaluation, needle


def test_the_side_by_side_page_is_linked_relative_to_the_report(gated):
    markdown, html = render_markdown(gated), render_html(gated)
    assert "[side-by-side page](evaluation/side_by_side.html)" in markdown
    assert ("a", "href", "evaluation/side_by_side.html") in Page(html).refs
    assert "`models/release/evaluation/side_by_side.html`" in markdown
    # only a plain relative path becomes a link: nothing that leaves the release folder or names a scheme
    for hostile in ("../../etc/passwd", "javascript:alert(1)", "/abs/page.html", "file:///x.html"):
        gated["evaluation"]["side_by_side"]["link"] = hostile
        page = Page(render_html(gated))
        assert not [ref for ref in page.refs if hostile in ref[2]] and hostile in page.text
        assert f"]({hostile})" not in render_markdown(gated)


def test_a_missed_gate_and_a_regression_are_marked_fail(gated):
    gated["evaluation"]["gate"]["passed"] = False
    gated["evaluation"]["gate"]["checks"][0].update(value=0.01, passed=False)
    gated["evaluation"]["drift"]["rows"][1].update(worse_by=0.09, regressed=True)
    markdown = render_markdown(gated)
    gate = md_subsection(markdown, "Release gate")
    assert "- **Verdict:** **✗ FAILED** — 1 of 2 check(s) of evaluate.gate missed" in gate
    assert md_tables(gate)[0][2][-1] == "**✗ FAIL**"
    assert md_tables(md_subsection(markdown, "Drift against the last release"))[0][3][-1] == "**✗ REGRESSED**"
    summary = markdown.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    assert "- **Evaluation gate:** **✗ FAILED** — 1 of 2 check(s) of evaluate.gate missed" in summary
    gated["evaluation"]["drift"]["on_regression"] = "warn"
    drift = md_subsection(render_markdown(gated), "Drift against the last release")
    assert md_tables(drift)[0][3][-1] == "**⚠ regressed (warning only)**" and "warn (the stage passes)" in drift


def test_no_baseline_and_no_harness_say_so_or_stay_out(gated):
    gated["evaluation"]["drift"] = None
    del gated["evaluation"]["harness"]
    markdown = render_markdown(gated)
    assert md_subsection(markdown, "Drift against the last release").strip() == (
        "no baseline: evaluate.drift.baseline is null, so this run was not compared with a release")
    assert "### Standard benchmarks" not in markdown


def test_the_memorization_audit_shows_extraction_pii_canaries_and_its_gate(gated):
    from tests.release_fixtures import CANARY_SECRET

    markdown, html = render_markdown(gated), render_html(gated)
    page = Page(html)
    assert [section[0] for section in page.sections][8] == "memorization-audit"
    extraction = md_tables(md_subsection(markdown, "Extraction per data source"))[0]
    assert extraction[0] == ["Source", "Personal data", "Tuned on train", "Tuned on test", "Base on train",
                             "Gap (train − test)"]
    assert extraction[2] == ["forum_answers", "**⚠ yes**", "0.21 of the answer, 12% whole (of 8)",
                             "0.08 of the answer, 0% whole (of 1)", "0.03 of the answer, 0% whole (of 8)", "+0.13"]
    assert extraction[3][:2] == ["lab_notes", "no"]
    pii = md_subsection(markdown, "PII in the tuned model's answers")
    assert "- **Real-looking PII values:** **✓ none**" in pii and "- **Answers checked:** 27, 3 of them" in pii
    canaries = md_subsection(markdown, "Canaries")
    assert ("> **⚠ Warning:** Trained with canaries: this model was trained with 2 canaries (random secrets planted "
            "in the train split, repeated 1, 8 times)") in canaries
    assert md_tables(canaries)[0][3] == ["canary-2", "8", "6.6", "9.97", "10", "no"]
    summary = markdown.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    assert "- **Canaries:** **⚠ used** — this model was trained with 2 canaries" in summary
    assert "- **Memorization audit:** **✓ PASSED** — all 3 check(s) of audit.gate met" in summary
    gate = md_tables(md_subsection(markdown, "Audit gate"))[0]
    assert gate[4] == ["`audit.gate.max_canary_exposure`", "exposure of canary-2 (planted 8x), bits", "6.6", "≤ 8",
                       "**✓ pass**"]
    audit = page.sections[8][2]
    assert "this model was trained with 2 canaries" in audit and "✓ PASSED" in audit and "canary-2" in audit
    assert CANARY_SECRET not in markdown and CANARY_SECRET not in html


def test_an_extracted_canary_and_a_pii_leak_are_marked(gated):
    audit = gated["audit"]
    audit["canaries"]["results"][1]["extracted"] = True
    audit["pii"].update(leaks=2, by_kind={"email": 2})
    markdown = render_markdown(gated)
    assert md_tables(md_subsection(markdown, "Canaries"))[0][3][-1] == "**✗ yes**"
    pii = md_subsection(markdown, "PII in the tuned model's answers")
    assert "- **Real-looking PII values:** **✗ 2**" in pii and "- **By kind:** email: 2" in pii


def test_without_canaries_the_report_says_none_were_planted(gated):
    gated["audit"]["canaries"] = None
    markdown, page = render_markdown(gated), Page(render_html(gated))
    assert md_subsection(markdown, "Canaries").strip() == (
        "not used: no canary was planted in the training data (`audit.canaries.enabled` is false)")
    assert "- **Canaries:** not used: no canary was planted in the training data" in markdown
    assert "trained with" not in page.sections[8][2] and "Warning" not in page.sections[8][2]


def test_a_report_from_before_the_audit_stage_says_not_audited(report):
    markdown = render_markdown(report)
    section = markdown.split("\n## Memorization audit\n", 1)[1].split("\n## ", 1)[0]
    assert section.strip() == "not audited: this report was made before the pipeline had an audit stage"
    assert "### Release gate" not in markdown and "Canaries" not in markdown


def test_chromium_renders_the_gates_and_the_audit(gated, tmp_path):
    _, _, dom, rendered, outline = rendered_in_chromium(gated, tmp_path)
    assert [tuple(section[:2]) for section in outline.sections] == SECTIONS
    assert rendered.links["#memorization-audit"] == "Memorization audit"
    assert rendered.links["evaluation/side_by_side.html"] == "side-by-side page"
    for needle in ("Release gate", "✓ PASSED — all 2 check(s) of evaluate.gate met", "0.12 → 0.3 (+0.18)",
                   "Drift against the last release", "general_loss", "arc_easy", "Extraction per data source",
                   "0.21 of the answer, 12% whole (of 8)", "Trained with canaries: this model was trained with 2 "
                   "canaries", "audit.gate.max_canary_exposure"):
        assert needle in rendered.text, needle
    rows = [row["text"] for row in rendered.rows]
    assert "evaluate.gate.min_gain rougeL gain of tuned over base 0.13 ≥ 0.05 ✓ pass" in rows
    assert "canary-2 8 6.6 9.97 10 no" in rows


def test_the_harness_on_a_gguf_shows_its_scores_or_why_it_did_not_run(report):
    report = copy.deepcopy(report)
    report["evaluation"]["gguf_harness"] = {"gguf_type": "q8_0", "tasks": {"arc_easy": {"acc": 0.61,
                                                                                       "acc_stderr": 0.02}}}
    markdown = render_markdown(report)
    assert "Standard benchmarks on the q8_0 GGUF in llama.cpp" in markdown
    assert "| arc_easy | acc | 0.61 |" in markdown and "acc_stderr" not in markdown
    report["evaluation"]["gguf_harness"] = {"gguf_type": "f16", "not_run": "model-f16.gguf adds no BOS token"}
    page = render_html(report)
    assert "Standard benchmarks on the f16 GGUF in llama.cpp" in page and "adds no BOS token" in page
