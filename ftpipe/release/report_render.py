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

Why one document model: build_sections() writes each section once as blocks (fields, tables, paragraphs,
charts); the two backends only choose markup, so the Markdown and the HTML cannot drift apart.

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
import shlex
from collections import namedtuple
from dataclasses import make_dataclass
from typing import Any, Callable, Sequence, Union

from ftpipe.compliance.licenses import commercial_use_of
from ftpipe.gguf.modelfile import chatml_format
from ftpipe.release.gguf_release import (
    GREEDY_FILE_TYPE,
    chat_prompts,
    converter_text,
    greedy_passed,
    greedy_summary,
    llama_cpp_build,
    modelfile_facts,
    run_commands,
    tensor_mix,
)
from ftpipe.release.report_charts import STYLE, comparison_chart, gguf_gap_chart, rows_chart

# --- the document model: inline values and blocks --------------------------------------------------------

# Inline values (a plain str is text). Dataclasses, not tuples: a tuple is a sequence of inline values.
Code = make_dataclass("Code", ["text"], frozen=True)           # a command, path or license id: monospace
Hash = make_dataclass("Hash", ["value"], frozen=True)          # a digest: monospace, wraps anywhere
Link = make_dataclass("Link", ["text", "url"], frozen=True)
LocalLink = make_dataclass("LocalLink", ["text", "path"], frozen=True)   # a release file, relative to the report
Mark = make_dataclass("Mark", ["kind", "text"], frozen=True)   # pass/fail/warn: a symbol and a word, not colour alone
Inline = Union[str, Code, Hash, Link, LocalLink, Mark, tuple]   # a tuple: its parts in a row
BR = "\n"   # a line break: <br> in both backends (as a newline in any text is)
SYMBOLS = {"pass": "✓", "fail": "✗", "warn": "⚠"}


# Blocks: named tuples (a section is a list of them); Chart is HTML only, the tables beside it carry its numbers.
Fields = namedtuple("Fields", "rows")                                  # (label, value) pairs
Table = namedtuple("Table", "headers rows numeric", defaults=((),))    # numeric: right-aligned columns
Para = namedtuple("Para", "text warning", defaults=(False,))
Items = namedtuple("Items", "items ordered", defaults=(False,))
Heading = namedtuple("Heading", "text")                                # a sub-heading inside a section
Commands = namedtuple("Commands", "lines")                             # shell lines to copy
Chart = namedtuple("Chart", "svg caption")
SignOff = namedtuple("SignOff", "")
Section = namedtuple("Section", "id title blocks")


# --- values ------------------------------------------------------------------------------------------------

DIGEST = re.compile(r"[0-9a-f]{32,}(\.dir)?")
SAFE_URL = re.compile(r"https?://[^\s<>\"'`\\]+")   # nothing else becomes a link (no javascript:, no file:)
SAFE_PATH = re.compile(r"(?:[A-Za-z0-9_-]+/)*[A-Za-z0-9_-]+(?:\.[A-Za-z0-9]+)+")   # relative, no .., no scheme


def value(item: Any, exact: bool = False) -> Inline:
    """A report value as text: digests monospace, ints grouped, floats to 4 digits (exact: as stored)."""
    if item is None:
        return "—"
    if isinstance(item, bool):
        return "yes" if item else "no"
    if isinstance(item, int):
        return f"{item:,}"
    if isinstance(item, float):
        return repr(item) if exact else f"{item:.4g}"
    if isinstance(item, str):
        return Hash(item) if DIGEST.fullmatch(item) else item
    if isinstance(item, dict):
        return joined([(f"{key}: ", value(sub, exact)) for key, sub in item.items()]) or "none"
    if isinstance(item, (list, tuple)):
        return joined([value(sub, exact) for sub in item]) or "none"
    return str(item)


def joined(parts: Sequence[Inline], separator: Inline = ", ") -> tuple:
    return tuple(piece for i, part in enumerate(parts) for piece in ((separator, part) if i else (part,)))


def size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n:,} B ({n / scale:.1f} {unit})"
    return f"{n:,} B"


def personal_data(entry: dict) -> Inline:
    return ("yes — legal basis: ", value(entry["personal_data_legal_basis"])) if entry["personal_data"] else "no"


def licensed(license_id: str | None, url: str | None) -> Inline:
    name = Code(license_id) if license_id else "— (not declared)"
    return (name, " — ", Link(url, url)) if url else name


def records(headers: tuple, rows: list, keys: tuple) -> Table:
    """A table of `rows` (dicts), one column per key."""
    return Table(headers, [tuple(value(row.get(key)) for key in keys) for row in rows])


def listing(title: str, headers: tuple, rows: list, keys: tuple, empty: str) -> list:
    """A sub-heading and the table of `rows`, or one line when there are none."""
    return [Heading(title), records(headers, rows, keys) if rows else Para(empty)]


# --- the sections ----------------------------------------------------------------------------------------------

def summary(report: dict) -> list:
    compliance, project = report["compliance"], report.get("project") or {}
    return [Fields([("Report", report["title"]), ("Verdict", verdict(compliance)),
                    ("Concluded license", Code(compliance["concluded_license"])),
                    ("Commercial use", commercial_use(compliance)),
                    ("Intended use", compliance["policy"]["intended_use"]), ("Created at", report["created_at"]),
                    ("Git commit", git_commit(project)), *mlflow_fields(report.get("mlflow") or {}),
                    *gate_summary(report)]),
            SignOff()]


def gate_summary(report: dict) -> list:
    """The evaluate and audit gates' verdicts, and whether the model was trained with canaries (newer reports)."""
    fields = []
    gate = (report.get("evaluation") or {}).get("gate")
    if gate:
        fields.append(("Evaluation gate", (gate_verdict(gate, "evaluate.gate"), " — see Evaluation")))
    audit = report.get("audit")
    if audit:
        fields.append(("Memorization audit", (gate_verdict(audit["gate"], "audit.gate"), " — see Memorization audit")))
        fields.append(("Canaries", canaries_statement(audit.get("canaries"))))
    return fields


def verdict(compliance: dict) -> Inline:
    violations = compliance.get("violations") or []
    if compliance["verdict"] == "pass" and not violations:
        return Mark("pass", "PASS"), " — the license gate found no violation"
    return Mark("fail", compliance["verdict"].upper()), f" — {len(violations)} violation(s): see License"


def commercial_use(compliance: dict) -> Inline:
    status, reviewed = commercial_use_of(compliance), compliance.get("reviewed_licenses") or []
    if status == "allowed":
        return Mark("pass", "allowed"), (f" — {', '.join(entry['id'] for entry in reviewed)} as declared by a "
                                         "reviewer: see Reviewed licenses" if reviewed else "")
    if status == "unknown":
        unknown = [f"{entry['source']} ({entry['license']})" for entry in compliance["unknown_licenses"]]
        flagged = ("; the license gate only flagged them because compliance.unknown_blocks is false"
                   if not compliance["policy"]["unknown_blocks"] else "")
        return (Mark("warn", "not established"), f" — no input's license forbids it, but these licenses are unknown "
                f"to ftpipe: {', '.join(unknown)}{flagged}. To establish it, read each license's text and declare it "
                "under ", Code("compliance.reviewed_licenses"), " in params.yaml")
    blockers = [f"{entry['source']} ({entry['license']})" for entry in compliance["non_commercial_sources"]]
    blockers += [f"{entry['source']} (unknown: {entry['license']})" for entry in compliance["unknown_licenses"]]
    return Mark("warn", "not allowed"), (f" — because of {', '.join(blockers)}" if blockers else "")


def git_commit(project: dict) -> Inline:
    dirty = {True: " (working tree dirty: uncommitted changes)", False: " (clean working tree)"}
    commit = project.get("git_commit")
    return (Hash(commit) if commit else "unknown (not a git checkout)", dirty.get(project.get("git_dirty"), ""))


def mlflow_fields(mlflow: dict) -> list:
    run = mlflow.get("pipeline_run_id")
    if not run:
        return [("MLflow pipeline run", "not logged to MLflow")]
    link = Link(run, mlflow["ui_url"]) if mlflow.get("ui_url") else Code(run)
    fields = [("MLflow pipeline run", (link, f" (experiment {mlflow.get('experiment_id')})"))]
    if mlflow.get("ui_command"):
        fields.append(("MLflow UI", ("start it with ", Code(mlflow["ui_command"]), ", then follow the link")))
    report_run = Code(mlflow["report_run_id"]) if mlflow.get("report_run_id") else "—"
    return fields + [("MLflow report run", report_run), ("MLflow tracking URI", Code(str(mlflow.get("tracking_uri"))))]


def license_section(report: dict) -> list:
    compliance = report["compliance"]
    policy = compliance["policy"]
    blocks = [Fields([
        ("Intended use", policy["intended_use"]),
        ("Allowed licenses", joined([Code(i) for i in policy["allowed_licenses"]]) or "any license not denied"),
        ("Denied licenses", joined([Code(i) for i in policy["denied_licenses"]]) or "none"),
        ("Unknown licenses", "block the gate" if policy["unknown_blocks"] else "are only flagged (do not block)"),
        ("Concluded license", Code(compliance["concluded_license"])),
        ("Commercial use", commercial_use(compliance))]),
        Heading("Inputs"),
        Table(("Role", "Name", "Declared", "Chosen"), [(row["role"], row["name"], value(row["declared"]),
                                                          value(row["chosen"])) for row in compliance["inputs"]])]
    if compliance.get("violations"):
        blocks += [Heading("Violations"), Para("the license gate fails on each of these.", warning=True),
                   records(("Source", "Role", "License", "Rule", "Reason", "Fix"), compliance["violations"],
                           ("source", "role", "license", "rule", "reason", "fix"))]
    blocks += listing("Share-alike obligations", ("Source", "License", "Terms"), compliance["share_alike"],
                      ("source", "license", "copyleft"), "none: no input's license requires sharing alike")
    blocks += listing("Attribution notices", ("Source", "License", "Notice"), compliance["attribution"],
                      ("source", "license", "notice"), "none")
    blocks += listing("Non-commercial sources", ("Source", "License"), compliance["non_commercial_sources"],
                      ("source", "license"), "none")
    unknown = compliance["unknown_licenses"]
    blocks += [Heading("Unknown licenses")]
    if unknown:
        blocks += [Para((f"{len(unknown)} license(s) unknown to ftpipe: their obligations were not assessed. "
                         "Check each license text before release, and declare it under ",
                         Code("compliance.reviewed_licenses"), " in params.yaml (its properties, URL and reviewer)."),
                        warning=True),
                   records(("Source", "License", "Reason"), unknown, ("source", "license", "reason"))]
    else:
        blocks.append(Para("none"))
    reviewed = compliance.get("reviewed_licenses") or []
    blocks += [Heading("Reviewed licenses")]
    if reviewed:
        blocks += [Para(("Licenses ftpipe/compliance/license_table.py has no row for, whose properties a reviewer "
                         "declared in params.yaml ", Code("compliance.reviewed_licenses"), "; the gate used them as "
                         "rows of the table.")),
                   Table(("License", "Name", "Text", "Reviewed by", "Used by", "Properties"),
                         [(Code(entry["id"]), entry["name"], Link(entry["url"], entry["url"]), entry["reviewed_by"],
                           value(entry["used_by"]), value(entry["properties"])) for entry in reviewed])]
    else:
        blocks.append(Para("none: the properties of every known license come from ftpipe/compliance/license_table.py"))
    notes = compliance["notes"]
    return blocks + [Heading("Notes"), Items(list(notes)) if notes else Para("none")]


def base_model(report: dict) -> list:
    model = report["base_model"]
    # a hub model's or a folder's files get a table of their own; the hub page of its commit, a link
    observed = {key: item for key, item in model["observed"].items() if key not in ("files_sha256", "url")}
    fields = [(f"Observed {key.replace('_', ' ')}", value(item)) for key, item in observed.items()]
    if model["observed"].get("url"):
        fields.append(("Observed at", Link(model["observed"]["url"], model["observed"]["url"])))
    if model.get("retrieval"):
        fields.append(("Retrieved", value(model["retrieval"])))
    if model.get("gguf_check"):
        fields.append(("GGUF read check", gguf_read_check(model["gguf_check"])))
    blocks = [Fields([("Id", model["id"]), ("Revision", model["revision"]),
                      ("License", licensed(model["license"], model.get("license_url"))),
                      ("Origin", model["origin"]), ("Creators", value(model["creators"])),
                      ("Personal data", personal_data(model)),
                      ("Intended-use notes", value(model["intended_use_notes"])),
                      *fields, ("Digest", value(model["digest"])), ("Architecture", value(model["architecture"])),
                      ("Parameters", value(model["parameters"])), ("Dtype", value(model["dtype"]))])]
    files = model["observed"].get("files_sha256") or {}
    if files:
        blocks += [Heading("Base model source files"),
                   Table(("File", "SHA-256"), [(Code(name), Hash(digest)) for name, digest in sorted(files.items())])]
    return blocks


def gguf_read_check(check: dict) -> Inline:
    """The base stage's comparison of transformers' GGUF reader with llama.cpp (ftpipe/gguf/reader_check.py)."""
    return (Mark("pass", "passed"), f": mean KL divergence of llama.cpp's next-token distributions from transformers' "
            f"{check['mean_kl_nats']:.3g} nats (limit {check['max_allowed_kl_nats']}) over {check['positions']} "
            f"positions of {check['texts']} texts; top-1 agreement {check['top1_agreement']:.0%}")


def data_sources(report: dict) -> list:
    sources = report["data_sources"]
    overview = [(source["name"], Code(str(source["license"])), value(source["rows_in"]), value(source["rows_kept"]),
                 value(source["rows_rejected"]), f"{source['rows_kept'] / source['rows_in']:.1%}"
                 if source["rows_in"] else "—") for source in sources]
    blocks = [Fields([("Splits (rows kept)", value(report.get("splits")))]),
              Table(("Source", "License", "Rows in", "Kept", "Rejected", "Kept share"), overview, numeric=(2, 3, 4, 5)),
              Chart(rows_chart(sources), "Rows per data source: each bar is the source's rows in, split into kept "
                                         "and each rejection reason; the counts are printed under it.")]
    for source in sources:
        blocks += [Heading(source["name"]), Fields(source_fields(source))]
    return blocks


def source_fields(source: dict) -> list:
    reasons = sorted(source["rejected_by_reason"].items(), key=lambda item: (-item[1], item[0]))
    generated = ("yes, by ", value(source["generated_by"])) if source["model_generated"] else "no"
    return [("Origin", source["origin"]), ("License", licensed(source["license"], source.get("license_url"))),
            ("Creators", value(source["creators"])), ("Model-generated", generated),
            ("Personal data", personal_data(source)), ("Intended-use notes", value(source["intended_use_notes"])),
            ("Observed origin", value(source["observed_origin"])), ("Raw file", Code(source["file"])),
            ("SHA-256", Hash(source["sha256"])), ("Retrieved at", source["retrieved_at"]),
            ("Rows", f"{source['rows_in']:,} in, {source['rows_kept']:,} kept, {source['rows_rejected']:,} rejected"),
            ("Rejected by reason", joined([f"{reason}: {n:,}" for reason, n in reasons]) or "none"),
            ("Repairs", value(source["repaired"])), ("Formats", value(source["formats"]))]


PII_ACTIONS = {"redact": "redact (replaced by typed placeholders; the row is kept)",
               "reject": "reject (the row is dropped; counted as rejection reason pii)"}


def pii_section(report: dict) -> list:
    rows = []
    for source in report["data_sources"]:
        pii = source.get("pii") or {}
        found = pii.get("found") or {}
        rows.append((source["name"], PII_ACTIONS.get(pii.get("action"), value(pii.get("action"))),
                     value(pii.get("rows", 0)), value(found) if found else "none found"))
    anything = any((source.get("pii") or {}).get("found") for source in report["data_sources"])
    lead = Para("PII found by clean's patterns, counted by kind (the values themselves are never stored)."
                if anything else "PII: none found in any data source.")
    # a declaration the data contradicts (personal_data: false, PII found): the sign-off rests on it
    mismatches = [Para(f"Declaration mismatch: {mismatch['message']}", warning=True)
                  for mismatch in report.get("declaration_mismatches") or []]
    return [lead, *mismatches, Table(("Source", "Action", "Rows affected", "Found by kind"), rows, numeric=(2,))]


PROJECT_FILES = {"params_sha256": "params.yaml SHA-256", "dvc_lock_sha256": "dvc.lock SHA-256",
                 "compliance_conclusion_sha256": "compliance conclusion SHA-256"}


def stages_section(report: dict) -> list:
    project = report.get("project") or {}
    hashes = [(PROJECT_FILES.get(key, key), value(item)) for key, item in project.items() if key.endswith("_sha256")]
    rows = [(stage["name"], Code(command(stage["cmd"])), lock_files(stage["deps"]), lock_files(stage["outs"]),
             joined([f"{key} = {item}" for key, item in stage["params"].items()], BR) or "—",
             provenance(stage["provenance"]),
             Code(stage["mlflow_run_id"]) if stage["mlflow_run_id"] else "not logged to MLflow")
            for stage in report["stages"]]
    return [Fields(hashes), Table(("Stage", "Command", "Deps", "Outs", "Params", "Provenance", "MLflow run"), rows)]


def command(cmd: str | list | None) -> str:
    return " && ".join(cmd) if isinstance(cmd, list) else str(cmd)   # dvc.yaml may list several commands


def lock_files(files: list) -> Inline:
    def one(entry: dict) -> tuple:
        count = f", {entry['nfiles']:,} files" if entry.get("nfiles") is not None else ""
        return Code(entry["path"]), BR, "md5 ", value(entry.get("md5")), BR, size(entry.get("size")) + count
    return joined([one(entry) for entry in files], BR) or "—"


def provenance(record: dict) -> Inline:
    sha = ("SHA-256 ", Hash(record["sha256"])) if record.get("sha256") else "no provenance.json"
    return Code(record["file"]), BR, f"created {record.get('created_at') or '—'}", BR, sha


ENVIRONMENT = {"python": "Python", "platform": "Platform", "machine": "Machine", "processor": "CPU",
               "cpu_count": "CPU cores", "cpu_flags": "CPU flags", "torch_cuda": "CUDA (torch)", "gpu": "GPU",
               "llama_cpp": "llama.cpp"}


def training(report: dict) -> list:
    section = report["training"]
    env = dict(section.get("environment") or {})
    packages = env.pop("packages", {})
    env.setdefault("gpu", None)
    env_fields = [(ENVIRONMENT.get(key, key), value(item) if item is not None else "none") for key, item in env.items()]
    return [Heading("Parameters"),
            Table(("Parameter", "Value"), [(key, value(item, exact=True)) for key, item in section["params"].items()]),
            Heading("Metrics"),
            Table(("Metric", "Value"), [(key, value(item)) for key, item in section["metrics"].items()]),
            Heading("Environment"), Fields(env_fields),
            Table(("Package", "Version"), [(name, version) for name, version in packages.items()])]


TASK_LABELS = {"rougeL": "ROUGE-L", "chrF": "chrF", "exact_match": "Exact match", "token_f1": "Token F1"}
EVAL_METRICS = {"loss": ("Loss", -1), "perplexity": ("Perplexity", -1),
                **{key: (label, 1) for key, label in TASK_LABELS.items()},
                "mean_answer_words": ("Mean answer words", 0)}   # key -> (label, +1 higher is better / -1 lower)


def evaluation(report: dict) -> list:
    ev = report["evaluation"]
    base, tuned = ev["base"], ev["tuned"]
    keys = dict.fromkeys([*(key for key in EVAL_METRICS if key in base or key in tuned), *base, *tuned])
    rows = [metric_row(key, base.get(key), tuned.get(key)) for key in keys]
    page = ev.get("side_by_side")
    blocks = [Fields([("Test examples", value(ev["test_examples"])),
                      *([("Every example, base vs tuned", side_by_side_link(page))] if page else [])]),
              Table(("Metric", "Base", "Tuned", "Change (tuned − base)"), rows, numeric=(1, 2, 3)),
              Chart(comparison_chart(base, tuned), "Base vs tuned model on the test split."),
              Fields([("Merged model validation loss", value(ev["merged_validation_loss"])),
                      ("Merge gap vs adapter", value(ev["merge_gap_vs_adapter"]))]),
              *evaluate_gates(ev),
              Heading("GGUF files")]
    gguf = ev.get("gguf") or {}
    if not gguf:
        return blocks + [Para("none: no GGUF file was produced")]
    return blocks + gguf_blocks(ev, gguf) + (gguf_harness_blocks(ev["gguf_harness"]) if ev.get("gguf_harness") else [])


def side_by_side_link(page: dict) -> Inline:
    return (LocalLink("side-by-side page", page["link"]), " (", Code(page["path"]), "): each test example's prompt, "
            "reference and both answers with their scores")


def evaluate_gates(ev: dict) -> list:
    """What the evaluate stage measured beyond the table above (newer reports): its gate, task metrics per data
    source, general-text loss, drift against the last release, the standard harness."""
    blocks: list = []
    if "gate" in ev:
        blocks += [Heading("Release gate"), *gate_blocks(ev["gate"], "evaluate.gate")]
    if ev.get("task"):
        blocks += [Heading("Task metrics per data source"), *task_blocks(ev["task"])]
    if ev.get("general_text"):
        blocks += [Heading("General text"), *general_text_blocks(ev["general_text"])]
    if "drift" in ev:
        blocks += [Heading("Drift against the last release"), *drift_blocks(ev["drift"])]
    if ev.get("harness"):
        blocks += [Heading("Standard benchmarks"), *harness_blocks(ev["harness"])]
    return blocks


def gguf_harness_blocks(result: dict) -> list:
    """The harness's tasks on one GGUF in llama.cpp (quantize.harness_gguf), or why they were not run."""
    heading = Heading(f"Standard benchmarks on the {result.get('gguf_type')} GGUF in llama.cpp")
    if "not_run" in result:
        return [heading, Para((Mark("warn", "not run"), ": ", result["not_run"]))]
    rows = [(task, metric, value(score)) for task, scores in (result.get("tasks") or {}).items()
            for metric, score in scores.items() if not metric.endswith("_stderr")]
    return [heading, Table(("Task", "Metric", "GGUF"), rows, numeric=(2,)) if rows else Para("no task results")]


def gate_verdict(gate: dict, params_key: str) -> Inline:
    checks = gate.get("checks") or []
    missed = [check for check in checks if not check.get("passed")]
    if not gate.get("passed") or missed:
        return Mark("fail", "FAILED"), f" — {len(missed)} of {len(checks)} check(s) of {params_key} missed"
    if not checks:
        return Mark("warn", "no checks"), f" — every threshold of {params_key} is null: nothing was checked"
    return Mark("pass", "PASSED"), f" — all {len(checks)} check(s) of {params_key} met"


def gate_blocks(gate: dict, params_key: str) -> list:
    """A gate's verdict and each check: the params.yaml key, the metric, its value, the threshold, pass or FAIL."""
    checks = gate.get("checks") or []
    blocks: list = [Fields([("Verdict", gate_verdict(gate, params_key))])]
    if checks:
        blocks.append(Table(("Key", "Metric", "Value", "Threshold", "Result"),
                            [(Code(check["key"]), check["metric"], value(check["value"]),
                              f"{'≥' if check['bound'] == 'min' else '≤'} {check['threshold']:g}",
                              Mark("pass", "pass") if check["passed"] else Mark("fail", "FAIL"))
                             for check in checks], numeric=(2,)))
    return blocks


def task_cell(summary: dict, metric: str) -> Inline:
    base, tuned = (summary.get("base") or {}).get(metric), (summary.get("tuned") or {}).get(metric)
    gain = (summary.get("gain") or {}).get(metric)
    if tuned is None:
        return "—"
    return f"{value(base)} → {value(tuned)}" + (f" ({gain:+.4g})" if isinstance(gain, (int, float)) else "")


def task_blocks(task: dict) -> list:
    overall, per_source = task.get("overall") or {}, task.get("per_source") or {}
    found = {key for summary in (overall, *per_source.values()) for key in (summary.get("tuned") or {})}
    metrics = [key for key in TASK_LABELS if key in found] + sorted(found - set(TASK_LABELS))
    rows = [(name, value(summary.get("examples")), *(task_cell(summary, metric) for metric in metrics))
            for name, summary in (("all sources", overall), *per_source.items()) if summary]
    return [Para("Each cell: base → tuned (gain), the mean over the source's test examples of the greedy answers' "
                 "scores against the references (0 to 1)."),
            Table(("Source", "Examples", *(TASK_LABELS.get(metric, metric) for metric in metrics)), rows,
                  numeric=tuple(range(1, 2 + len(metrics))))]


def general_text_blocks(general: dict) -> list:
    text = general.get("set") or {}
    increase = general.get("loss_increase")
    shown = ("—" if not isinstance(increase, (int, float)) else
             Mark("warn", f"{increase:+.4g}") if increase > 0 else f"{increase:+.4g}")
    return [Para("The loss of both models on general text that is not training data: a tuned model whose loss "
                 "rises here has lost some of what the base model could do."),
            Fields([("Text", (Code(str(text.get("source"))), " — ", value(text.get("origin")))),
                    ("License", Code(str(text.get("license"))) if text.get("license") else "— (not declared)"),
                    ("Passages", f"{value(text.get('passages'))}, of at most {value(text.get('max_tokens'))} tokens"),
                    ("SHA-256", value(text.get("sha256")))]),
            Table(("Model", "Loss", "Perplexity"),
                  [(label, value((general.get(model) or {}).get("loss")),
                    value((general.get(model) or {}).get("perplexity")))
                   for model, label in (("base", "base"), ("tuned", "tuned"))], numeric=(1, 2)),
            Fields([("Loss increase (tuned − base)", shown)])]


def drift_blocks(drift: dict | None) -> list:
    if not drift:
        return [Para("no baseline: evaluate.drift.baseline is null, so this run was not compared with a release")]
    warn_only = drift.get("on_regression") == "warn"

    def result(row: dict) -> Inline:
        if not row.get("regressed"):
            return Mark("pass", "ok")
        return Mark("warn", "regressed (warning only)") if warn_only else Mark("fail", "REGRESSED")

    baseline = drift.get("baseline_release") or {}
    blocks: list = [Fields([("Last release", value(baseline) if baseline else "—"),
                            ("On regression", "warn (the stage passes)" if warn_only else "fail the stage")])]
    rows = drift.get("rows") or []
    if rows:
        blocks.append(Table(("Metric", "Last release", "This run", "Worse by", "Allowed", "Result"),
                            [(row["metric"], value(row["baseline"]), value(row["current"]), value(row["worse_by"]),
                              value(row["allowed"]), result(row)) for row in rows], numeric=(1, 2, 3, 4)))
    else:
        blocks.append(Para("no metric compared"))
    skipped = drift.get("skipped") or {}
    if skipped:
        blocks.append(Items([f"{metric}: not compared, {why}" for metric, why in skipped.items()]))
    return blocks


def harness_blocks(harness: dict) -> list:
    version = (harness.get("tuned") or harness.get("base") or {}).get("harness_version")
    rows = []
    for task, metrics in (harness.get("comparison") or {}).items():
        for metric, row in metrics.items():
            change = row.get("change")
            better = row.get("higher_is_better")
            word = ("" if better is None or not change else
                    " (better)" if (change > 0) == bool(better) else " (worse)")
            rows.append((task, metric, value(row.get("base")), value(row.get("tuned")),
                         f"{change:+.4g}{word}" if isinstance(change, (int, float)) else "—"))
    lead = Para(("EleutherAI's lm-evaluation-harness ", value(version), ", base and tuned model on the tasks "
                 "of ", Code("evaluate.harness.tasks"), "."))
    return [lead, Table(("Task", "Metric", "Base", "Tuned", "Change (tuned − base)"), rows, numeric=(2, 3, 4))
            if rows else Para("no task results")]


def gguf_blocks(ev: dict, gguf: dict) -> list:
    """Each GGUF as llama.cpp runs it: its size and real tensor types, and what the quantize stage checked of it
    against the merged model (loss, tokenizer, chat prompts, stop tokens; greedy answers on the f16 file)."""
    llama = ev.get("llama_cpp") or {}
    converter = ev.get("gguf_converter")
    blocks = [
        Fields([("Checked in", llama_cpp_build(llama)),
                ("llama.cpp CPU features", value(llama.get("system_info"))),
                ("llama-cpp-python wheel SHA-256", value(llama.get("wheel_sha256"))),
                ("Converter (float types, q8_0)", converter_text(converter)),
                ("End-of-turn tokens", joined([Code(str(token)) for token in ev.get("end_of_turn_tokens") or []])
                 or "—")]),
        Table(("Type", "Size", "Bits per weight", "Tensor types (share of weights)"),
              [(name, size(entry.get("bytes")), value(entry.get("bits_per_weight"), exact=True),
                tensor_mix(entry.get("types")))
               for name, entry in gguf.items()], numeric=(1, 2)),
        Table(("Type", "Validation loss (llama.cpp)", "Loss gap vs merged", "Tokenizer mismatches",
               "Chat prompt mismatches", "Stop-token problems"),
              [(name, value(entry.get("validation_loss")), value(entry.get("loss_gap")),
                flagged(entry.get("tokenizer_mismatches")),
                flagged(entry.get("chat_prompt_mismatches"), chat_prompts(entry)),
                stop_problems(entry.get("stop_token_problems"))) for name, entry in gguf.items()],
              numeric=(1, 2, 3, 4)),
        Chart(gguf_gap_chart(gguf), "Validation loss gap of each GGUF file vs the merged model, in llama.cpp.")]
    greedy = ev.get("gguf_greedy")
    blocks.append(Heading(f"Greedy answers: the {GREEDY_FILE_TYPE} GGUF in llama.cpp vs the merged model"))
    if not greedy:
        return blocks + [Para("not compared")]
    verdict_mark = Mark("pass", "pass") if greedy_passed(greedy) else Mark("fail", "FAIL")
    blocks += [Fields([("Result", (verdict_mark, " — ", greedy_summary(greedy))),
                       ("Same text", f"{greedy.get('same_text')} of {greedy.get('prompts')} ({greedy.get('needed')} "
                                     "needed: quantize.min_greedy_agreement)"),
                       ("Stopped where the merged model stopped",
                        f"{greedy.get('stopped_where_merged_stopped')} of {greedy.get('merged_stopped')}")])]
    pairs = greedy.get("pairs") or []
    if pairs:
        blocks.append(Table(("Prompt", "Merged model", f"llama.cpp ({GREEDY_FILE_TYPE} GGUF)", "Same text",
                             "Stopped (merged / llama.cpp)"),
                            [(pair.get("prompt", ""), pair.get("merged", ""), pair.get("gguf", ""),
                              value(pair.get("merged") == pair.get("gguf")),
                              f"{value(pair.get('merged_stopped'))} / {value(pair.get('gguf_stopped'))}")
                             for pair in pairs]))
    return blocks


def flagged(count: int | None, text: str | None = None) -> Inline:
    """A count of problems: a warning mark when there are any."""
    if count is None:
        return "—"
    return Mark("warn", text or f"{count:,}") if count else (text or value(count))


def stop_problems(problems: list | None) -> Inline:
    if problems is None:
        return "—"
    return joined([Mark("warn", str(problem)) for problem in problems], BR) if problems else "none"


def metric_row(key: str, base: Any, tuned: Any) -> tuple:
    label, better = EVAL_METRICS.get(key, (key, 0))
    if not isinstance(base, (int, float)) or not isinstance(tuned, (int, float)):
        return label, value(base), value(tuned), "—"
    change = tuned - base
    verdict_word = "" if not better or not change else (" (better)" if change * better > 0 else " (worse)")
    return label, value(base), value(tuned), f"{change:+.4g}{verdict_word}"


def audit_section(report: dict) -> list:
    audit = report.get("audit")
    if not audit:
        return [Para("not audited: this report was made before the pipeline had an audit stage")]
    extraction = audit.get("extraction") or {}
    canaries = audit.get("canaries")
    blocks: list = [Fields([("Audit gate", gate_verdict(audit["gate"], "audit.gate")),
                            ("Canaries", canaries_statement(canaries)),
                            ("Metrics", Code(str(audit.get("metrics_file"))))]),
                    Heading("Extraction per data source"),
                    Para(f"For up to {value(extraction.get('examples_per_source'))} training conversations per "
                         "source, the tuned model answers the training prompt greedily (at most "
                         f"{value(extraction.get('max_new_tokens'))} new tokens): each cell is the mean share of the "
                         "training answer it repeats word for word from its start, and how many answers it repeats "
                         "whole. The same on held-out test conversations, and for the base model. The gap (tuned on "
                         "train − tuned on test) is what training put into the weights."),
                    Table(("Source", "Personal data", "Tuned on train", "Tuned on test", "Base on train",
                           "Gap (train − test)"),
                          [(name, Mark("warn", "yes") if entry.get("personal_data") else "no",
                            extraction_cell(entry.get("tuned_train")), extraction_cell(entry.get("tuned_test")),
                            extraction_cell(entry.get("base_train")), signed(entry.get("gap")))
                           for name, entry in (extraction.get("per_source") or {}).items()], numeric=(5,))]
    pii = audit.get("pii") or {}
    leaks = pii.get("leaks")
    blocks += [Heading("PII in the tuned model's answers"),
               Fields([("Answers checked", f"{value(pii.get('prompts'))}" + (
                           f", {pii['placeholder_prompts']:,} of them to training prompts whose answers held a PII "
                           "placeholder" if pii.get("placeholder_prompts") else "")),
                       ("Real-looking PII values", Mark("pass", "none") if leaks == 0 else Mark("fail", value(leaks))
                        if leaks is not None else "—"),
                       ("By kind", value(pii.get("by_kind")) if pii.get("by_kind") else "none")])]
    blocks += [Heading("Canaries"), *canary_blocks(canaries)]
    return blocks + [Heading("Audit gate"), *gate_blocks(audit["gate"], "audit.gate")]


def extraction_cell(side: dict | None) -> Inline:
    if not side or not side.get("examples"):
        return "— (no rows)"
    exact = side.get("exact_rate")
    return (f"{value(side.get('prefix_fraction'))} of the answer, "
            f"{f'{exact:.0%}' if isinstance(exact, (int, float)) else '—'} whole (of {side['examples']:,})")


def signed(number: Any) -> Inline:
    return f"{number:+.4g}" if isinstance(number, (int, float)) and not isinstance(number, bool) else value(number)


def canaries_statement(canaries: dict | None) -> Inline:
    """Whether the model was trained with canaries: a reviewer must know before it is released."""
    if not canaries:
        return "not used: no canary was planted in the training data"
    return Mark("warn", "used"), f" — {canaries_text(canaries)}"


def canaries_text(canaries: dict) -> str:
    repeats = ", ".join(str(r) for r in canaries.get("repeats") or []) or "—"
    return (f"this model was trained with {canaries.get('count')} canaries (random secrets planted in the train "
            f"split, repeated {repeats} times) to measure what it memorizes; the secrets are in no release file")


def canary_blocks(canaries: dict | None) -> list:
    if not canaries:
        return [Para(("not used: no canary was planted in the training data (", Code("audit.canaries.enabled"),
                      " is false)"))]
    candidates = canaries.get("candidates")
    return [Para((f"Trained with canaries: {canaries_text(canaries)}. Each is ranked by the tuned model among "
                  f"{value(candidates)} random secrets of the same shape ({value(canaries.get('digits'))} digits): "
                  "the exposure, in bits, is how far above chance it ranks its own; extracted means greedy decoding "
                  "wrote it out."), warning=True),
            Table(("Canary", "Planted (times)", "Exposure (bits)", "Max exposure (bits)",
                   f"Rank among {value(candidates)}", "Extracted"),
                  [(result.get("id"), value(result.get("repeats")), value(result.get("exposure")),
                    value(result.get("max_exposure")), value(result.get("rank")),
                    Mark("fail", "yes") if result.get("extracted") else "no")
                   for result in canaries.get("results") or []], numeric=(1, 2, 3, 4))]


ARTIFACT_KEYS = ("name", "kind", "stage", "folder", "release_folder", "files", "chat_template")


def artifacts(report: dict) -> list:
    blocks: list = []
    for artifact in report["artifacts"]:
        extra = [(key.replace("_", " ").capitalize(), value(item)) for key, item in artifact.items()
                 if key not in ARTIFACT_KEYS]
        files = list(artifact["files"])
        if artifact["kind"] == "gguf":
            extra += gguf_artifact_fields(report, artifact)
            files.append(modelfile_facts(report, artifact))
        blocks += [Heading(artifact["name"]),
                   Fields([("Kind", artifact["kind"]), ("Stage", artifact["stage"]),
                           ("Folder", Code(artifact["folder"])), ("Release folder", Code(artifact["release_folder"])),
                           *extra]),
                   Table(("File", "Size", "SHA-256"), [(Code(file["path"]), size(file["bytes"]), Hash(file["sha256"]))
                                                       for file in files], numeric=(1,))]
    return blocks or [Para("none")]


def gguf_artifact_fields(report: dict, artifact: dict) -> list:
    """A GGUF's chat template (as the Modelfile beside it carries it) and the commands that run it."""
    chatml = chatml_format(artifact.get("chat_template"))
    template = ("none in the GGUF" if not artifact.get("chat_template") else
                "ChatML: the Modelfile writes it as an explicit TEMPLATE"
                + (" with the template's default SYSTEM message" if chatml and chatml.default_system else "")
                if chatml else "not ChatML: Ollama derives its template from the GGUF's own")
    commands = run_commands(report, artifact)
    return [("Chat template (Ollama)", template),
            ("Run with Ollama", joined([Code(line) for line in commands["ollama"]], BR)),
            ("Run with ftpipe", joined([Code(line) for line in commands["ftpipe"]], BR))]


def verification(report: dict) -> list:
    release = report["release"]
    manifest = release["manifest"]
    return [Items([("From the project root, with the git commit above checked out, run ",
                    Code(release["verify_command"]), ": it checks the release against the files on disk, dvc.lock "
                    "and each stage's own records."),
                   ("Check every released file's SHA-256 with ", Code(f"sha256sum -c {shlex.quote(manifest)}"),
                    ", also from the project root (the manifest's paths are relative to it)."),
                   ("The bill of materials (CycloneDX ML-BOM) is ", Code(release["sbom"]), "; the machine-readable "
                    "report is ", Code(release["report_json"]), ", rendered as ", Code(release["report_markdown"]),
                    " and ", Code(release["report_html"]), ".")], ordered=True),
            Commands([release["verify_command"], f"sha256sum -c {shlex.quote(manifest)}"])]


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
