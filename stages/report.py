"""Stage `report`: the compliance report a reviewer signs, the bill of materials and the model cards, in
models/release/. The last stage of the DAG (record, which only closes the MLflow run, comes after it).

    python -m stages.report

It collects (collect_report) every data source with its declaration, hash, rows kept and rejected by clean
(with the reasons) and PII findings; every stage with its dvc.lock input and output hashes, params,
provenance.json and MLflow run; the training params and environment; the evaluation, with what the quantize
stage checked of each GGUF in llama.cpp (size, bits per weight, tensor type mix, loss, tokenizer, chat prompts,
stop tokens, greedy answers) and the llama.cpp build it used; the evaluate stage's task metrics per data source,
general-text loss, gates, drift against the last release and standard benchmarks; the memorization audit
(metrics/audit.json: extraction per source, PII in answers, canaries, its gate); and every produced artifact
(adapter, merged model, each GGUF with its own chat template) with its SHA-256. Then it writes models/release/:

    report.json, report.md, report.html   the report, for machines and for humans
    evaluation/side_by_side.html          the evaluate stage's page of every test example, base vs tuned
    sbom.cdx.json                         CycloneDX 1.6 ML-BOM, validated against its schema before writing
    adapter/, merged/, gguf-<type>/       each artifact's files (hard links: no extra disk) and its model
                                          card README.md with the concluded license: a folder to publish;
                                          a GGUF's folder also holds its Ollama Modelfile
    MANIFEST.sha256                       every file above and every artifact, `sha256sum -c` format

`python -m ftpipe.release.verify` checks the release against the disk, dvc.lock and the stages' own records.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.audit.provenance_chain import lock_hashes
from ftpipe.compliance.declarations import declaration_mismatches
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import read_json, sha256_file
from ftpipe.core.params import Params
from ftpipe.core.paths import (
    ADAPTER_DIR,
    AUDIT_DIR,
    BASE_DIR,
    CLEAN_DIR,
    COMPLIANCE_DIR,
    EVALUATION_DIR,
    GGUF_DIR,
    MERGED_DIR,
    PARAMS_FILE,
    PROVENANCE_FILE,
    RAW_DIR,
    RELEASE_DIR,
    STAGE_OUTPUTS,
    metrics_file,
)
from ftpipe.core.provenance import git_state, utc_now
from ftpipe.core.stage import Stage
from ftpipe.evaluation.drift import drift_metrics
from ftpipe.evaluation.gates import VERDICT_FILE
from ftpipe.release.model_card import CARD_FILE
from ftpipe.release.publish import MANIFEST_FILE, REPORT_FILES, SIDE_BY_SIDE_FILE, write_release
from ftpipe.release.sbom import SBOM_FILE
from ftpipe.tracking.mlflow_ui import DEFAULT_HOST, DEFAULT_PORT

REPORT_VERSION = 1
DVC_LOCK = Path("dvc.lock")
VERIFY_COMMAND = "python -m ftpipe.release.verify"
UI_COMMAND = ".venv/bin/python -m ftpipe.tracking.mlflow_ui"
# PEFT writes a placeholder card ("License: [More Information Needed]") into the adapter folder; the
# release folder carries ours instead.
NOT_RELEASED = {ADAPTER_DIR / CARD_FILE}
# What the quantize stage measured of each GGUF (metrics/quantize.json files.<type>) that the report shows.
GGUF_FACTS = ("bytes", "bits_per_weight", "types", "validation_loss", "loss_gap", "tokenizer_mismatches",
              "chat_prompts_compared", "chat_prompt_mismatches", "stop_token_problems")
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
# What the evaluate stage measured beyond loss and ROUGE-L (metrics/evaluate.json), carried over as written.
EVALUATION_FACTS = ("test_examples_sha256", "task", "general_text", "gate", "drift", "harness")
SIDE_BY_SIDE_SOURCE = EVALUATION_DIR / "side_by_side.html"
# What the report keeps of each canary's result (metrics/audit.json): its numbers, never a secret, even if a
# later audit wrote one there.
CANARY_FACTS = ("id", "repeats", "exposure", "max_exposure", "rank", "extracted")


# --- collecting ------------------------------------------------------------------------------------------

def collect_report(mlflow: dict[str, Any]) -> dict[str, Any]:
    """The report.json content, from the files the stages wrote (paths relative to the project root). It reads
    no params.yaml key: each value comes from the record of the stage that used it (the training params from
    the adapter's provenance.json), so the report says what was done, not what params.yaml says now."""
    compliance = read_json(COMPLIANCE_DIR / "conclusion.json")
    base_record = read_json(BASE_DIR / PROVENANCE_FILE)
    git = git_state()
    base_id = compliance["declarations"]["base_model"]["id"]
    sources = data_sources(compliance["declarations"]["sources"])
    return {
        "report_version": REPORT_VERSION,
        "created_at": utc_now(),
        "title": f"Fine-tuned {base_id} (QLoRA, ftpipe)",
        "project": {"git_commit": git["commit"], "git_dirty": git["dirty"],
                    "params_sha256": sha256_file(PARAMS_FILE), "dvc_lock_sha256": sha256_file(DVC_LOCK),
                    "compliance_conclusion_sha256": sha256_file(COMPLIANCE_DIR / "conclusion.json")},
        "mlflow": mlflow_section(mlflow),
        "compliance": compliance["conclusion"],
        "base_model": {**compliance["declarations"]["base_model"], "observed": base_record.get("source", {}),
                       **{key: base_record.get(key) for key in ("digest", "architecture", "parameters", "dtype")},
                       # how a hub model was retrieved; a GGUF base's check against llama.cpp (base provenance)
                       **{key: base_record[key] for key in ("retrieval", "gguf_check") if key in base_record}},
        "data_sources": sources,
        "declaration_mismatches": declaration_mismatches(sources),
        "splits": read_json(CLEAN_DIR / "summary.json")["kept"],
        "stages": stages_from_lock(),
        "training": training_section(),
        "evaluation": evaluation_section(),
        "audit": audit_section(),
        "artifacts": artifacts_section(),
        "release": {"folder": RELEASE_DIR.as_posix(),
                    **{key: (RELEASE_DIR / name).as_posix() for key, name in REPORT_FILES.items()},
                    "sbom": (RELEASE_DIR / SBOM_FILE).as_posix(), "manifest": (RELEASE_DIR / MANIFEST_FILE).as_posix(),
                    "verify_command": VERIFY_COMMAND},
    }


def mlflow_section(reference: dict[str, Any]) -> dict[str, Any]:
    experiment, pipeline_run = reference.get("experiment_id"), reference.get("pipeline_run_id")
    return {"tracking_uri": reference.get("tracking_uri"), "experiment_id": experiment,
            "pipeline_run_id": pipeline_run, "report_run_id": reference.get("run_id"),
            "ui_url": (f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/#/experiments/{experiment}/runs/{pipeline_run}"
                       if experiment and pipeline_run else None),
            "ui_command": UI_COMMAND}


def data_sources(declarations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each declared source with what ingest read and what clean kept, rejected and redacted."""
    ingested = {source["name"]: source for source in read_json(RAW_DIR / PROVENANCE_FILE)["sources"]}
    cleaned = read_json(CLEAN_DIR / "summary.json")["sources"]
    sources = []
    for declared in declarations:
        name = declared["name"]
        if name not in ingested or name not in cleaned:
            raise PipelineError(f"compliance.sources declares {name!r}, but {RAW_DIR}/ or {CLEAN_DIR}/ has no such "
                                f"source: run `dvc repro` so that every stage sees the same params.yaml")
        raw, clean = ingested[name], cleaned[name]
        rejected = clean.get("rejected", {})
        sources.append({**declared, "observed_origin": raw["origin"], "file": (RAW_DIR / raw["file"]).as_posix(),
                        "sha256": raw["sha256"], "retrieved_at": raw["retrieved_at"], "rows_in": clean["rows_in"],
                        "rows_kept": clean["kept"], "rows_rejected": sum(rejected.values()),
                        "rejected_by_reason": rejected, "repaired": clean.get("repaired", {}),
                        "formats": clean.get("formats", {}), "pii": clean.get("pii", {})})
    return sources


def stages_from_lock() -> list[dict[str, Any]]:
    """Every stage that ran before this one, in dvc.lock's order: its command, input and output hashes as DVC
    recorded them, its params, its provenance.json and its MLflow run."""
    if not DVC_LOCK.exists():
        raise PipelineError(f"{DVC_LOCK}: not found. Run the pipeline with `dvc repro` (it writes dvc.lock).")
    lock = yaml.safe_load(DVC_LOCK.read_text(encoding="utf-8"))["stages"]
    stages = []
    for name, output_dir in STAGE_OUTPUTS.items():
        if name == "report" or name not in lock:
            continue
        entry, provenance_path = lock[name], output_dir / PROVENANCE_FILE
        provenance = read_json(provenance_path) if provenance_path.exists() else {}
        stages.append({
            "name": name, "cmd": entry.get("cmd"), **lock_hashes(entry),
            "params": entry.get("params", {}).get(str(PARAMS_FILE), {}),
            "provenance": {"file": provenance_path.as_posix(), "created_at": provenance.get("created_at"),
                           "git_commit": provenance.get("git", {}).get("commit"), "digest": provenance.get("digest"),
                           "sha256": sha256_file(provenance_path) if provenance_path.exists() else None},
            "mlflow_run_id": (provenance.get("mlflow") or {}).get("run_id"),
        })
    return stages


def training_section() -> dict[str, Any]:
    trained = read_json(ADAPTER_DIR / PROVENANCE_FILE)
    return {"params": trained["params"], "metrics": read_json(metrics_file("train")),
            "environment": trained.get("environment", {})}   # where training ran: a GPU machine's, if there


def evaluation_section() -> dict[str, Any]:
    """The test-split scores (overall and per data source), general-text loss, the evaluate stage's gates, drift
    against the last release and standard benchmarks (when run), its side-by-side page; the merge gap, and what
    the quantize stage checked of each GGUF in llama.cpp (its metrics) with the llama.cpp build and converter it
    used (its provenance.json). The keys the evaluate stage wrote keep their names and shapes; baseline_metrics is
    what a later run's drift is measured against, should this release become the baseline (ftpipe.release.baseline
    reads it)."""
    evaluation, merge = read_json(metrics_file("evaluate")), read_json(metrics_file("merge"))
    quantized, quantize_record = read_json(metrics_file("quantize")), read_json(GGUF_DIR / PROVENANCE_FILE)
    return {"test_examples": evaluation["examples"], "base": evaluation["base"], "tuned": evaluation["tuned"],
            **{key: evaluation[key] for key in EVALUATION_FACTS if key in evaluation},
            # what `python -m ftpipe.release.baseline` makes the next runs' drift baseline of
            **({"baseline_metrics": drift_metrics(evaluation)} if "task" in evaluation else {}),
            "side_by_side": side_by_side(),
            "merged_validation_loss": merge["validation_loss"]["merged"],
            "merge_gap_vs_adapter": merge["gap_vs_adapter"],
            "gguf": {gguf_type: {key: entry.get(key) for key in GGUF_FACTS}
                     for gguf_type, entry in quantized["files"].items()},
            "gguf_greedy": quantized.get("greedy"),
            "gguf_harness": quantized.get("harness"),   # evaluate.harness's tasks on quantize.harness_gguf
            "end_of_turn_tokens": quantized.get("end_of_turn_tokens"),
            "end_of_turn_ids": quantized.get("end_of_turn_ids"),
            "llama_cpp": quantize_record.get("llama_cpp"), "gguf_converter": quantize_record.get("converter")}


def side_by_side() -> dict[str, Any]:
    """The evaluate stage's page of every test example: write_release copies it into the release folder (so the
    manifest hashes it); `link` is its address relative to report.html."""
    if not SIDE_BY_SIDE_SOURCE.is_file():
        raise PipelineError(f"{SIDE_BY_SIDE_SOURCE}: not found. The evaluate stage writes it: run `dvc repro` "
                            "(or `dvc repro -f evaluate` if its outputs were changed by hand).")
    return {"source": SIDE_BY_SIDE_SOURCE.as_posix(), "sha256": sha256_file(SIDE_BY_SIDE_SOURCE),
            "path": (RELEASE_DIR / SIDE_BY_SIDE_FILE).as_posix(), "link": SIDE_BY_SIDE_FILE}


def audit_section() -> dict[str, Any]:
    """The memorization audit (metrics/audit.json): extraction per data source, PII values in the tuned model's
    answers, the canaries when training planted any (their numbers only: the audit never writes a secret, and the
    report keeps only CANARY_FACTS of each), and the audit gate."""
    path = metrics_file("audit")
    if not path.is_file():
        raise PipelineError(f"{path}: not found. The audit stage writes it (the memorization audit the report "
                            "shows): run `dvc repro` so that it runs before the report.")
    audit, verdict = read_json(path), AUDIT_DIR / VERDICT_FILE
    canaries = audit.get("canaries")
    if canaries:
        canaries = {**{key: canaries.get(key) for key in ("count", "repeats", "candidates", "digits")},
                    "results": [{key: result.get(key) for key in CANARY_FACTS}
                                for result in canaries.get("results") or []]}
    return {"metrics_file": path.as_posix(), "extraction": audit["extraction"], "pii": audit["pii"],
            "canaries": canaries or None, "gate": audit["gate"],
            "verdict_sha256": sha256_file(verdict) if verdict.is_file() else None}


def artifacts_section() -> list[dict[str, Any]]:
    """Every produced artifact and its files, hashed now: what the release ships and the cards list."""
    def files(paths: list[Path]) -> list[dict[str, Any]]:
        return [{"path": path.as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
                for path in paths]

    def folder(path: Path) -> list[Path]:
        return sorted(p for p in path.iterdir() if p.is_file() and p not in NOT_RELEASED)

    artifacts = [
        {"name": "adapter", "kind": "lora-adapter", "stage": "train", "folder": ADAPTER_DIR.as_posix(),
         "release_folder": (RELEASE_DIR / "adapter").as_posix(), "files": files(folder(ADAPTER_DIR))},
        {"name": "merged", "kind": "merged-model", "stage": "merge", "folder": MERGED_DIR.as_posix(),
         "release_folder": (RELEASE_DIR / "merged").as_posix(),
         "dtype": read_json(MERGED_DIR / PROVENANCE_FILE)["merged_into"]["dtype"],
         "files": files(folder(MERGED_DIR))},
    ]
    for gguf_type, entry in read_json(metrics_file("quantize"))["files"].items():
        path = GGUF_DIR / entry["file"]
        artifacts.append({"name": f"gguf-{gguf_type}", "kind": "gguf", "stage": "quantize",
                          "folder": GGUF_DIR.as_posix(),
                          "release_folder": (RELEASE_DIR / f"gguf-{gguf_type}").as_posix(),
                          "gguf_type": gguf_type, "files": files([path]), "chat_template": gguf_chat_template(path)})
    return artifacts


def gguf_chat_template(path: Path) -> str | None:
    """The GGUF's own tokenizer.chat_template: what llama.cpp applies, and what its Modelfile translates."""
    from ftpipe.gguf.contents import metadata

    try:
        template = metadata(path, (CHAT_TEMPLATE_KEY,))[CHAT_TEMPLATE_KEY]
    except (ValueError, OSError) as error:   # gguf's reader: not a GGUF file, or a truncated one
        raise PipelineError(f"{path}: not a readable GGUF file ({error}). Run the quantize stage again "
                            "(`dvc repro -f quantize`).") from error
    return str(template) if template is not None else None


def tracked_params(params: Params) -> dict:
    """None: see collect_report (dvc.yaml lists no params for this stage; tests/test_dvc_yaml.py checks)."""
    return {}


def main() -> None:
    with Stage("report", tracked_params) as stage:
        report = collect_report(stage.tracker.reference())
        with stage.output(provenance_first=True) as out_dir:   # provenance.json is in the manifest too
            manifest = write_release(report, out_dir)
        for mismatch in report["declaration_mismatches"]:
            print(f"warning: {mismatch['message']}", file=sys.stderr)
        stage.finish({"artifacts": len(report["artifacts"]), "files": len(manifest),
                      "data_sources": len(report["data_sources"]),
                      "declaration_mismatches": len(report["declaration_mismatches"]),
                      "commercial_use_allowed": report["compliance"]["commercial_use_allowed"],
                      "evaluate_gate_passed": (report["evaluation"].get("gate") or {}).get("passed"),
                      "audit_gate_passed": report["audit"]["gate"]["passed"],
                      "canaries_used": report["audit"]["canaries"] is not None,
                      "concluded_license": report["compliance"]["concluded_license"]})
        for name in (*REPORT_FILES.values(), SBOM_FILE, MANIFEST_FILE):
            stage.tracker.log_artifact(RELEASE_DIR / name, "release")
    print(f"report: {report['compliance']['concluded_license']}, {len(report['artifacts'])} artifacts, "
          f"{len(manifest)} files hashed -> {RELEASE_DIR}/ (open {RELEASE_DIR}/report.html; check with "
          f"`{VERIFY_COMMAND}`)")


if __name__ == "__main__":
    run_stage(main)
