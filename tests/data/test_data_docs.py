"""The data gate's GX run and Data Docs (ftpipe.data.data_docs): every expectation of both suites is run, and
the site reads offline (rendered in headless Chromium: Debian's `chromium` package; `make test` installs it)
and sends nothing when opened."""
from __future__ import annotations

from pathlib import Path

import pytest

from ftpipe.data.data_docs import (
    STATIC_INDEX_ID,
    STATUS_MARKS_CSS,
    insert_after,
    make_docs_readable_offline,
    run_suites,
)
from ftpipe.data.expectations import REJECTIONS_SUITE_NAME, SUITE_NAME, example_frame, rejection_frame
from tests.chromium import RenderedPage, assert_screenshot_drawn, require_chromium, run_chromium
from tests.data.test_expectations import (
    CLEAN,
    GOOD_SOURCES,
    N_EXAMPLE_EXPECTATIONS,
    PARAMS,
    good_splits,
    write_splits,
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Good examples, but clean rejected half of one source: the examples suite passes, the rejections suite
    fails. Returns the Data Docs folder and run_suites' results."""
    root = tmp_path_factory.mktemp("docs")
    clean_dir = write_splits(root / "clean", good_splits(), {**GOOD_SOURCES, "scraped_forum": (10, 5)})
    docs = root / "data_docs"
    results = run_suites(example_frame(clean_dir), rejection_frame(clean_dir / "summary.json"), PARAMS, CLEAN, docs)
    return docs, results


def test_every_expectation_of_both_suites_runs_examples_first(site):
    _, results = site
    suites = [suite for suite, _ in results]
    assert suites == [SUITE_NAME] * N_EXAMPLE_EXPECTATIONS + [REJECTIONS_SUITE_NAME]
    assert all(result.success for suite, result in results if suite == SUITE_NAME)
    assert not results[-1][1].success


def test_the_site_has_a_page_per_suite_and_no_tracking_url(site):
    docs, _ = site
    assert SUITE_NAME in (docs / "index.html").read_text(encoding="utf-8")
    pages = sorted((docs / "validations").rglob("*.html"))
    assert [page.relative_to(docs / "validations").parts[0] for page in pages] == [SUITE_NAME, REJECTIONS_SUITE_NAME]
    assert "clean.max_answer_chars = 80" in pages[0].read_text(encoding="utf-8")
    assert "validate.max_rejection_rate = 0.2" in pages[1].read_text(encoding="utf-8")
    # GX's logo URL carries the data context's id, which a page opened online would send to GX
    assert not [page for page in docs.rglob("*.html") if "dataContextId" in page.read_text()]


def test_offline_pages_use_local_images_status_marks_and_a_plain_index(tmp_path):
    """On a site laid out as GX writes it: the remote logo becomes the site's copy, every page gets the
    status marks, and index.html lists each suite's result with links to its pages."""
    logo = ("https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png"
            "?d=20240101T000000.000000Z&dataContextId=1234")
    pages = {"index.html": f'<html><head><title>x</title></head><body class="x"><img src="{logo}"></body></html>',
             f"validations/{SUITE_NAME}/run/result.html": f"<html><head></head><body><img src='{logo}'></body></html>",
             f"validations/{REJECTIONS_SUITE_NAME}/run/result.html": "<html><head></head><body></body></html>"}
    for name, text in pages.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    make_docs_readable_offline(tmp_path, {SUITE_NAME: [True, True], REJECTIONS_SUITE_NAME: [True, False]})

    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert 'src="static/images/logo-long.png"' in index and "dataContextId" not in index
    assert index.startswith(f'<html><head>{STATUS_MARKS_CSS}<title>x</title></head><body class="x"><div id='
                            f'"{STATIC_INDEX_ID}"')
    assert (f'<tr class="succeeded"><td style="color: #28a745"><strong>Succeeded</strong></td><td><a href="'
            f'validations/{SUITE_NAME}/run/result.html">{SUITE_NAME}</a></td><td>0 of 2 expectations failed</td>'
            f'<td><a href="expectations/{SUITE_NAME}.html">') in index
    assert '<tr class="failed"><td style="color: #dc3545"><strong>Failed</strong></td>' in index
    assert "1 of 2 expectations failed" in index
    result = (tmp_path / f"validations/{SUITE_NAME}/run/result.html").read_text(encoding="utf-8")
    assert "src='../../../static/images/logo-long.png'" in result and STATUS_MARKS_CSS in result


def test_a_page_without_the_expected_tag_fails_loudly():
    with pytest.raises(AssertionError, match=r"page\.html: no <body.* has GX changed its page templates"):
        insert_after(Path("page.html"), "<html><head></head></html>", r"<body(?:\s[^>]*)?>", "<div></div>")
    assert insert_after(Path("p"), "<head lang='en'><head>", r"<head(?:\s[^>]*)?>", "+") == "<head lang='en'>+<head>"


# --- Data Docs as a reviewer sees them: rendered by a real browser, offline --------------------------

def test_data_docs_render_in_a_browser_with_suites_descriptions_and_status(site, tmp_path):
    chromium = require_chromium()
    docs, _ = site
    index = RenderedPage(run_chromium(chromium, tmp_path / "profile-index", (docs / "index.html").as_uri(),
                                      "--dump-dom"))
    results = {index.links[href]: docs / href for href in index.links if href.startswith("validations/")}
    assert results.keys() == {SUITE_NAME, REJECTIONS_SUITE_NAME}, f"index.html links no results: {index.text}"
    status = {row["text"].split()[1]: row["text"].split()[0] for row in index.rows
              if row["text"].startswith(("Failed", "Succeeded"))}
    assert status == {SUITE_NAME: "Succeeded", REJECTIONS_SUITE_NAME: "Failed"}

    failing_dom = run_chromium(chromium, tmp_path / "profile-rejections", results[REJECTIONS_SUITE_NAME].as_uri(),
                               "--dump-dom")
    assert 'id="ftpipe-status-marks"' in failing_dom   # the status icons get marks: their icon font is a CDN's
    failing = RenderedPage(failing_dom)
    assert f"Expectation Suite: {REJECTIONS_SUITE_NAME}" in failing.text and "Status: Failed" in failing.text
    (row,) = [row for row in failing.rows if "validate.max_rejection_rate = 0.2" in row["text"] and row["icons"]]
    assert "fa-times text-danger" in row["icons"] and "fa-check-circle" not in row["icons"]
    assert "scraped_forum" in row["text"]   # the failing source, in the table of unexpected values

    passing = RenderedPage(run_chromium(chromium, tmp_path / "profile-examples", results[SUITE_NAME].as_uri(),
                                        "--dump-dom"))
    assert f"Expectation Suite: {SUITE_NAME}" in passing.text and "Status: Succeeded" in passing.text
    checks = [row for row in passing.rows if "text-success" in row["icons"] or "text-danger" in row["icons"]]
    assert len(checks) == N_EXAMPLE_EXPECTATIONS and not [row for row in checks if "text-danger" in row["icons"]]
    for description in ("every role is one of validate.allowed_roles: system, user, assistant",
                        "no email in any turn of any example (ftpipe.data.pii pattern 'email')",
                        "distinct answers / examples is at least validate.min_unique_answer_share = 0.9"):
        assert description in passing.text

    assert_screenshot_drawn(chromium, tmp_path / "profile-screenshot", results[REJECTIONS_SUITE_NAME].as_uri(),
                            tmp_path / "rejections.png", 1280, 2000)
