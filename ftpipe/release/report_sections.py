"""The compliance report's sections on what was released and where it came from: summary and sign-off,
licenses, base model, data sources, personal data, DVC stages, training, artifacts and verification
(report_evaluation.py has evaluation and the memorization audit; report_render.py renders them all).
"""
from __future__ import annotations

import shlex

from ftpipe.compliance.licenses import commercial_use_of
from ftpipe.gguf.modelfile import chatml_format
from ftpipe.release.gguf_release import (
    modelfile_facts,
    run_commands,
)
from ftpipe.release.report_charts import rows_chart
from ftpipe.release.report_document import (
    BR,
    Chart,
    Code,
    Commands,
    Fields,
    Hash,
    Heading,
    Inline,
    Items,
    Link,
    Mark,
    Para,
    SignOff,
    Table,
    joined,
    listing,
    records,
    size,
    value,
)
from ftpipe.release.report_evaluation import canaries_statement, gate_verdict


def personal_data(entry: dict) -> Inline:
    return ("yes — legal basis: ", value(entry["personal_data_legal_basis"])) if entry["personal_data"] else "no"


def licensed(license_id: str | None, url: str | None) -> Inline:
    name = Code(license_id) if license_id else "— (not declared)"
    return (name, " — ", Link(url, url)) if url else name




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


