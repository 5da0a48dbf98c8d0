"""The MLflow UI, started with the documented `python -m ftpipe.tracking.mlflow_ui`, shows the pipeline's runs,
their params and their metric charts in a real browser: headless Chromium (Debian's `chromium`; `make test`
installs it), loopback only.

Chromium's `--dump-dom` under a `--virtual-time-budget` returns the DOM once the single-page app has
fetched and drawn: virtual time stands still while requests are pending, so a slow server delays the dump
instead of emptying it. A page that still lacks what it should show is rendered once more on a longer budget.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ftpipe.tracking.mlflow_ui import experiment_id, experiment_page, running_ui
from tests.chromium import require_chromium

pytestmark = pytest.mark.slow   # an MLflow server and Chromium: `make test-fast` leaves it out

WINDOW = (1600, 1000)
# (run name, train.learning_rate, final loss): loss(step) = final * 10 / step, so step 1 is 10x step 10
PIPELINE_RUNS = [("first run", "0.0005", 0.3), ("train.learning_rate=0.001 (was 0.0005)", "0.001", 0.2)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A project folder whose mlflow.db holds what the pipeline records: experiment "ftpipe", one "pipeline"
    parent run per `dvc repro`, one child run per executed stage with its params and metrics."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    root = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ftpipe", artifact_location=(root / "mlartifacts").as_uri())
    now = int(time.time() * 1000)
    runs = {"root": root, "uri": uri, "experiment": exp, "parents": [], "train": [], "evaluate": []}
    for name, learning_rate, final_loss in PIPELINE_RUNS:
        parent = client.create_run(exp, run_name=name, tags={"pipeline": "true"}).info.run_id
        for stage in ("train", "evaluate"):
            tags = {"mlflow.parentRunId": parent, "stage": stage}   # what nests a run under its parent
            run_id = client.create_run(exp, run_name=stage, tags=tags).info.run_id
            params = [Param("train.learning_rate", learning_rate), Param("train.lora.r", "8")]
            if stage == "train":   # step metrics, as the train stage logs them
                metrics = [Metric("loss", round(final_loss * 10 / step, 4), now, step) for step in range(1, 11)]
            else:
                metrics = [Metric("tuned.rougeL", round(0.5 - final_loss, 4), now, 0)]
            client.log_batch(run_id, metrics=metrics, params=params)   # one write instead of a dozen
            client.set_terminated(run_id)
            runs[stage].append(run_id)
        client.set_terminated(parent)
        runs["parents"].append(parent)
    return runs


@pytest.fixture(scope="module")
def ui(store) -> str:
    """The documented command on the store's project folder, on a free loopback port; stopped after the module."""
    env = {"DVC_ROOT": str(store["root"]), "MLFLOW_TRACKING_URI": store["uri"]}   # never the real project's store
    with running_ui(store["root"] / "mlflow-ui.log", env=env) as url:
        yield url


@pytest.fixture(scope="module")
def chromium() -> Path:
    return require_chromium()   # a failure, never a skip: CI must really open the UI


class Page(HTMLParser):
    """A rendered DOM as a reader sees it: visible text, table rows (cell texts), links and every tag."""

    def __init__(self, url: str, dom: str, screenshot: Path):
        super().__init__()
        self.url, self.dom, self.screenshot = url, dom, screenshot
        self.text, self.rows, self.links, self.tags = "", [], [], []
        self._hidden, self._row, self._link = 0, None, None
        self.feed(dom)
        self.text = " ".join(self.text.split())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in ("script", "style", "noscript"):
            self._hidden += 1
        elif tag == "tr":
            self._row = []
        elif tag in ("th", "td") and self._row is not None:
            self._row.append("")
        elif tag == "a":
            self._link = {**attrs, "text": ""}

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript"):
            self._hidden -= 1
        elif tag == "tr" and self._row is not None:
            self.rows.append([" ".join(cell.split()) for cell in self._row])
            self._row = None
        elif tag == "a" and self._link is not None:
            self.links.append({**self._link, "text": " ".join(self._link["text"].split())})
            self._link = None

    def handle_data(self, data):
        if self._hidden:
            return
        self.text += f" {data}"
        if self._row:
            self._row[-1] += f" {data}"
        if self._link is not None:
            self._link["text"] += data

    def row(self, header: str) -> list[str] | None:
        return next((cells[1:] for cells in self.rows if cells and cells[0] == header), None)

    def with_class(self, tag: str, name: str) -> list[dict]:
        return [attrs for t, attrs in self.tags if t == tag and name in (attrs.get("class") or "").split()]

    def svg_texts(self, name: str) -> list[str]:
        """Texts of plotly's <text class=name> elements (axis titles): plotly keeps each in data-unformatted."""
        return [attrs.get("data-unformatted", "") for attrs in self.with_class("text", name)]

    def check(self, missing: list[str]) -> None:
        """Fail with what is missing, where to look and what the page showed instead."""
        app = self.dom[max(self.dom.find('<div id="root"'), 0):]   # past the inlined CSS
        assert not missing, (f"the MLflow UI page lacks: {'; '.join(missing)}\n  page {self.url}\n  screenshot "
                             f"{self.screenshot}\n  visible text: {self.text[:1500]}\n  DOM: {app[:1500]}")


def render(chromium: Path, url: str, out: Path, ready) -> Page:
    """The page's DOM and a screenshot, from a fresh profile. Only 127.0.0.1 resolves, so nothing leaves the
    machine (MLflow's UI links docs and fonts it must not fetch). Rendered again on a longer virtual-time
    budget while `ready(page)` is false."""
    for attempt, budget_ms in enumerate((15_000, 60_000)):
        screenshot = out.with_name(f"{out.name}-{attempt}.png")
        command = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                   f"--user-data-dir={out.with_name(f'{out.name}-profile-{attempt}')}",
                   f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={budget_ms}",
                   "--dump-dom", f"--screenshot={screenshot}", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        page = Page(url, done.stdout, screenshot)
        if ready(page):
            break
    check_screenshot(screenshot)
    return page


def check_screenshot(png: Path) -> None:
    """A real picture: the window's size and many colours (a blank or error page has a handful)."""
    from PIL import Image

    assert png.is_file() and png.stat().st_size > 20_000, f"{png}: missing or tiny"
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
        assert image.size == WINDOW and len(colours) > 200, f"{png}: {image.size}, {len(colours)} colours"


def test_ui_serves_the_store_with_telemetry_off(store, ui):
    with urllib.request.urlopen(f"{ui}/ajax-api/3.0/mlflow/ui-telemetry", timeout=10) as answer:
        assert json.load(answer)["disable_ui_telemetry"] is True
    assert experiment_id(store["uri"]) == store["experiment"]
    assert experiment_id(f"sqlite:///{store['root'] / 'absent.db'}") is None
    assert not (store["root"] / "absent.db").exists()   # looked up read-only, never created
    log = (store["root"] / "mlflow-ui.log").read_text()
    assert experiment_page(ui, store["experiment"]) in log   # the URL the command prints is the one we open


def test_experiment_page_lists_the_pipeline_runs(store, ui, chromium, tmp_path):
    names = [name for name, _, _ in PIPELINE_RUNS]
    page = render(chromium, experiment_page(ui, store["experiment"]), tmp_path / "experiment",
                  lambda page: all(name in page.text for name in names))
    hrefs = {link.get("href") for link in page.links}
    missing = [f"run name {name!r}" for name in names if name not in page.text]
    missing += [f"link to pipeline run {run}" for run in store["parents"]
                if f"#/experiments/{store['experiment']}/runs/{run}" not in hrefs]
    if "6 matching runs" not in page.text:   # the stage runs are there, nested (collapsed) under their pipeline run
        missing.append("'6 matching runs' (2 pipeline runs + 4 stage runs)")
    page.check(missing)


def test_compare_page_shows_params_and_charts_and_links_the_loss_curve(store, ui, chromium, tmp_path):
    # MLflow 3.17's route, from its bundle (Routes.getCompareRunPageRoute): JSON lists in the hash's query
    runs, experiments = json.dumps(store["train"]), json.dumps([store["experiment"]])
    url = f"{ui}/#/compare-runs?runs={urllib.parse.quote(runs)}&experiments={urllib.parse.quote(experiments)}"
    page = render(chromium, url, tmp_path / "compare",
                  lambda page: page.row("train.lora.r") and page.with_class("g", "parcoords"))
    expected_rows = {"Run ID:": store["train"], "Run Name:": ["train", "train"],
                     "train.learning_rate": [lr for _, lr, _ in PIPELINE_RUNS], "train.lora.r": ["8", "8"]}
    missing = [f"row {header!r} = {cells} (got {page.row(header)})" for header, cells in expected_rows.items()
               if page.row(header) != cells]
    if not page.with_class("g", "parcoords"):   # plotly's parallel coordinates: one axis per param and metric
        missing.append("a plotly parallel-coordinates chart (svg g.parcoords)")
    axes = page.svg_texts("axis-title")
    missing += [f"chart axis {axis!r} (got {axes})" for axis in ("train.learning_rate", "loss") if axis not in axes]
    loss_links = [link for link in page.links if link.get("title") == "Plot chart" and link["text"] == "loss"]
    if len(loss_links) != 1:
        missing.append("the 'Plot chart' link of metric loss")
    page.check(missing)

    # the link opens the metric page: loss against step, one line per run
    chart = render(chromium, f"{ui}/{loss_links[0]['href']}", tmp_path / "loss-chart",
                   lambda page: len(page.with_class("path", "js-line")) >= 2)
    lines = {attrs.get("d") for attrs in chart.with_class("path", "js-line")}   # plotly draws each line twice
    points = sorted(len(re.findall(r"[ML]", d or "")) for d in lines)   # it may drop points on a straight stretch
    ticks = re.findall(r'<g class="xtick"><text [^>]*data-unformatted="([^"]*)"', chart.dom)
    missing = [] if chart.with_class("div", "js-plotly-plot") else ["a plotly chart (div.js-plotly-plot)"]
    if len(points) != 2 or points[0] < 5:
        missing.append(f"2 loss lines of 5+ points each (svg path.js-line; got {points} points)")
    steps = [str(step) for step in range(1, 11)]   # plotly picks which steps to label by the chart's width
    if len(ticks) < 3 or not set(ticks) <= set(steps) or steps.index(ticks[-1]) < 7:
        missing.append(f"x axis: steps 1..10 (got ticks {ticks})")
    if chart.text.count("train (loss)") < 2:
        missing.append("legend 'train (loss)' for each run")
    for name, _, final in PIPELINE_RUNS:   # the table under the chart: latest/min at step 10, max at step 1
        for summary in (f"{final:g} (step=10)", f"{final * 10:g} (step=1)"):
            if summary not in chart.text:
                missing.append(f"{summary!r} of run {name!r}")
    chart.check(missing)
