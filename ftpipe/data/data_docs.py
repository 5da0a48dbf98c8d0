"""The data gate's Great Expectations run and its Data Docs site, readable offline.

`run_suites` validates the two tables of ftpipe.data.expectations in a throwaway file-based GX project,
builds the Data Docs site of both suites and copies it out. GX's pages fetch their logo from GX's S3
(with the data context's id in the URL), their scripts, styles and icon font from CDNs:
`make_docs_readable_offline` points the logo at the site's own copy, draws the status icons as text
marks and puts a plain list of the results at the top of index.html, so the site reads the same with
no network and reports nothing when opened.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

from ftpipe.core.params import CleanParams, ValidateParams
from ftpipe.data.expectations import (
    EXAMPLES_RESULT_FORMAT,
    REJECTIONS_SUITE_NAME,
    SOURCES_RESULT_FORMAT,
    SUITE_NAME,
    example_expectations,
    rejection_expectations,
)


def run_suites(examples: pd.DataFrame, rejections: pd.DataFrame, params: ValidateParams, clean: CleanParams,
               docs_dir: Path) -> list[tuple[str, object]]:
    """Validate both tables; copy the Data Docs site (both suites) to `docs_dir`.

    Returns (suite name, GX expectation result) for every expectation, examples suite first."""
    import great_expectations as gx  # slow (seconds): only the validate stage needs it
    from great_expectations.data_context.types.base import ProgressBarsConfig

    runs = [  # (suite = asset name, its expectations, the table, how failing rows are reported)
        (SUITE_NAME, example_expectations(gx, params, clean), examples, EXAMPLES_RESULT_FORMAT),
        (REJECTIONS_SUITE_NAME, rejection_expectations(gx, params), rejections, SOURCES_RESULT_FORMAT),
    ]
    results = []
    # A file context in a throwaway project: Data Docs are built from its stores on disk.
    with tempfile.TemporaryDirectory(prefix="gx-") as project:
        context = gx.get_context(mode="file", project_root_dir=project)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)   # no tqdm bars in the log
        data_source = context.data_sources.add_pandas("clean")
        for name, suite_expectations, frame, result_format in runs:
            batch = data_source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole_table")
            suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=suite_expectations))
            definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch,
                                                                                   suite=suite))
            with warnings.catch_warnings():
                # pandas' str.contains warns about capture groups it is not asked for; the card pattern
                # needs its groups for the back-references that keep one separator throughout
                warnings.filterwarnings("ignore", "This pattern is interpreted as a regular expression, and has "
                                        "match groups", UserWarning)
                run = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
            results += [(name, result) for result in run.results]
        site = context.build_data_docs()["local_site"]
        shutil.copytree(Path(url2pathname(urlparse(site).path)).parent, docs_dir)
    outcomes = {name: [result.success for suite, result in results if suite == name] for name, *_ in runs}
    make_docs_readable_offline(docs_dir, outcomes)
    return results


# GX's navbar logo is an image on GX's S3 whose URL carries the data context's id and a time: opening
# the docs online would report both. The site has the same images in static/images/.
REMOTE_IMAGE = re.compile(r"https://great-expectations-web-assets\.s3\.[\w.-]+\.amazonaws\.com/([\w.-]+)\?[^\"']*")
STATIC_INDEX_ID = "ftpipe-validation-results"
# GX shows each expectation's status as a Font Awesome icon, a CDN font: offline the status column is
# blank. Draw the two statuses as text marks instead (online too, for one look; !important beats Font
# Awesome's own rules).
STATUS_MARKS_CSS = (
    '<style id="ftpipe-status-marks">'
    "i.fa-check-circle.text-success::before, i.fa-times.text-danger::before {font-family: sans-serif !important; "
    "font-style: normal !important; font-weight: bold !important}"
    'i.fa-check-circle.text-success::before {content: "\\2713" !important; color: #28a745}'
    'i.fa-times.text-danger::before {content: "\\2717" !important; color: #dc3545}'
    "</style>")


def make_docs_readable_offline(docs_dir: Path, outcomes: dict[str, list[bool]]) -> None:
    """Make the Data Docs site work offline and report nothing when opened.

    GX's pages load their scripts, styles and icon font from CDNs. The validation result pages are
    plain HTML underneath (their status icons get text marks, STATUS_MARKS_CSS), but the index
    draws its list of results with those scripts: offline (this pipeline's default) that list is
    empty. So the top of index.html gets a plain list of each suite's result, linking its
    validation result page and its suite page. `outcomes`: per suite, the success of each of its
    expectations.
    """
    for page in docs_dir.rglob("*.html"):
        images = Path(os.path.relpath(docs_dir / "static" / "images", page.parent)).as_posix()
        text = REMOTE_IMAGE.sub(lambda match: f"{images}/{match.group(1)}", page.read_text(encoding="utf-8"))
        page.write_text(insert_after(page, text, r"<head(?:\s[^>]*)?>", STATUS_MARKS_CSS), encoding="utf-8")
    rows = []
    for suite, successes in outcomes.items():
        (result_page,) = (docs_dir / "validations" / suite).rglob("*.html")   # one run per suite
        failed = successes.count(False)
        status, color = ("Failed", "#dc3545") if failed else ("Succeeded", "#28a745")   # Bootstrap's danger/success
        rows.append(
            f'<tr class="{status.lower()}"><td style="color: {color}"><strong>{status}</strong></td>'
            f'<td><a href="{html.escape(result_page.relative_to(docs_dir).as_posix())}">{html.escape(suite)}</a></td>'
            f"<td>{failed} of {len(successes)} expectations failed</td>"
            f'<td><a href="expectations/{html.escape(suite)}.html">the suite\'s expectations</a></td></tr>')
    section = (f'<div id="{STATIC_INDEX_ID}" class="container-fluid pt-4 pl-5 pr-5"><h3>Validation results</h3>'
               "<table class=\"table table-sm\"><thead><tr><th>Status</th><th>Expectation suite (validation "
               "result)</th><th>Expectations</th><th>Suite</th></tr></thead><tbody>"
               + "".join(rows) + "</tbody></table></div>")
    index = docs_dir / "index.html"
    text = insert_after(index, index.read_text(encoding="utf-8"), r"<body(?:\s[^>]*)?>", section)
    index.write_text(text, encoding="utf-8")


def insert_after(page: Path, text: str, tag: str, addition: str) -> str:
    """`text` with `addition` right after the first match of the regex `tag`."""
    text, found = re.subn(tag, lambda match: match.group(0) + addition, text, count=1)
    if not found:
        raise AssertionError(f"{page}: no {tag} tag; has GX changed its page templates?")
    return text

