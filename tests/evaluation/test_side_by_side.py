"""ftpipe.evaluation.side_by_side: the page is one offline file, its text is escaped, and in headless Chromium
(tests/chromium.py) it sorts by gain, takes its order and source filter from the URL fragment, and draws."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ftpipe.evaluation.side_by_side import render_side_by_side, write_side_by_side
from ftpipe.evaluation.task_metrics import aggregate, score_answer
from tests.chromium import RenderedPage, assert_screenshot_drawn, require_chromium, run_chromium

HOSTILE = "<script>document.title='pwned'</script>"

# (id, source, reference, base answer, tuned answer): gains differ, so the order by gain is known
CASES = [
    ("ex-1", "docs", "Use pathlib.Path.read_text", "Use open()", "Use pathlib.Path.read_text"),
    ("ex-2", "chat", "Paris is the capital", "Paris is the capital", "The capital is Lyon"),
    ("ex-3", "docs", "Call sorted with key", "Call sorted with a key", "Call sorted with key"),
    ("ex-4", "chat", "Hello there friend", "Goodbye", f"Hello there {HOSTILE}"),
]


@pytest.fixture
def samples() -> list[dict]:
    return [{"id": id_, "source": source, "prompt": f"Prompt {id_} <b>&</b>", "reference": reference,
             "base": base, "tuned": tuned,
             "scores": {"base": score_answer(base, reference), "tuned": score_answer(tuned, reference)}}
            for id_, source, reference, base, tuned in CASES]


def gains(samples: list[dict]) -> dict[str, float]:
    return {sample["id"]: sample["scores"]["tuned"]["rougeL"] - sample["scores"]["base"]["rougeL"]
            for sample in samples}


@pytest.fixture
def page_file(tmp_path, samples) -> Path:
    path = tmp_path / "out" / "side_by_side.html"
    path.parent.mkdir()
    write_side_by_side(samples, aggregate(samples), path, "Side by side <v1>")
    return path


class ExampleRows(HTMLParser):
    """The example table's body rows, in DOM order: (id cell text, hidden?, source)."""

    def __init__(self, dom: str):
        super().__init__()
        self.rows: list[list] = []
        self._in_body = self._first_cell = False
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._in_body = attrs.get("id") == "examples"
        elif tag == "tr" and self._in_body and "data-order" in attrs:
            self.rows.append(["", "hidden" in attrs, attrs.get("data-source")])
            self._first_cell = True
        elif tag == "td" and self.rows and self._first_cell:
            self._first_cell = "first"

    def handle_endtag(self, tag):
        if tag == "td" and self._first_cell == "first":
            self._first_cell = False
        elif tag == "table":
            self._in_body = False

    def handle_data(self, data):
        if self._first_cell == "first":
            self.rows[-1][0] += data


def dump(chromium: Path, profile: Path, page_file: Path, fragment: str = "") -> str:
    return run_chromium(chromium, profile, page_file.as_uri() + fragment, "--dump-dom")


def test_written_file_is_self_contained_and_escaped(page_file, samples):
    html = page_file.read_text(encoding="utf-8")
    assert [path.name for path in page_file.parent.iterdir()] == ["side_by_side.html"]   # no temporary left
    assert not re.search(r"""(?:src|href)\s*=|https?://|@import|url\(""", html), "the page must fetch nothing"
    assert HOSTILE not in html and "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in html
    assert "Side by side &lt;v1&gt;" in html and "Prompt ex-1 &lt;b&gt;&amp;&lt;/b&gt;" in html
    assert html.count("<script>") == 1   # the page's own script only


def test_render_copes_with_missing_scores_and_no_samples():
    html = render_side_by_side([{"id": "x", "source": "s", "prompt": "p", "reference": "r", "base": "", "tuned": "",
                                 "scores": {"base": {}, "tuned": {}}}], aggregate([]), "t")
    assert 'data-value="">–</td>' in html
    assert "<tbody></tbody>" in render_side_by_side([], aggregate([]), "t")


def test_chromium_shows_rows_as_text_sorted_by_gain_descending(tmp_path, page_file, samples):
    chromium = require_chromium()
    dom = dump(chromium, tmp_path / "profile", page_file)
    page = RenderedPage(dom)
    assert "Side by side <v1>" in page.text
    assert f"Hello there {HOSTILE}" in page.text   # shown as text ...
    assert "<title>Side by side &lt;v1&gt;</title>" in dom   # ... and never ran: it would have renamed the page
    expected = sorted(gains(samples), key=lambda id_: -gains(samples)[id_])
    assert len(set(gains(samples).values())) == len(samples)   # distinct gains: the order is unambiguous
    rows = ExampleRows(dom).rows
    assert [row[0] for row in rows] == expected and not any(row[1] for row in rows)
    assert re.search(r'data-key="gain"[^>]*aria-sort="descending"|aria-sort="descending"[^>]*data-key="gain"', dom)
    summary_rows = [row["text"] for row in page.rows if row["text"].startswith(("all sources", "chat ", "docs "))]
    assert [text.split()[0] for text in summary_rows] == ["all", "chat", "docs"]


def test_chromium_takes_order_and_filter_from_the_fragment(tmp_path, page_file, samples):
    chromium = require_chromium()
    ascending = ExampleRows(dump(chromium, tmp_path / "asc", page_file, "#sort=gain&dir=asc")).rows
    assert [row[0] for row in ascending] == sorted(gains(samples), key=gains(samples).get)
    by_id = ExampleRows(dump(chromium, tmp_path / "id", page_file, "#sort=id&dir=desc")).rows
    assert [row[0] for row in by_id] == ["ex-4", "ex-3", "ex-2", "ex-1"]
    filtered = ExampleRows(dump(chromium, tmp_path / "docs", page_file, "#source=docs")).rows
    assert len(filtered) == len(samples)
    assert {row[0] for row in filtered if not row[1]} == {"ex-1", "ex-3"}
    assert all(row[1] == (row[2] != "docs") for row in filtered)


def test_chromium_screenshot_is_not_blank(tmp_path, page_file):
    chromium = require_chromium()
    assert_screenshot_drawn(chromium, tmp_path / "shot", page_file.as_uri(), tmp_path / "page.png", 1280, 1000)
