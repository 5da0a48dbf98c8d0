"""Stage `audit`: what the tuned model memorized of its training data, before anything is released.

    python -m stages.audit

Extraction (ftpipe/evaluation/memorization.py): for up to audit.train_examples training conversations per data
source, the tuned model answers the training prompt greedily, and its answer is compared token by token with the
training answer (longest common prefix, as a share of the answer or of audit.max_new_tokens, and exact repeats);
the same for as many held-out test conversations (what the model does on data it never saw) and for the base model
on the training ones. The gap, tuned on train minus tuned on test, is what training put into the weights.
PII (ftpipe/evaluation/pii_leaks.py): clean replaced personal data with placeholders such as [EMAIL]; every answer
above, and the answers to training prompts whose answers held a placeholder, must hold no real-looking value.
Canaries (ftpipe/evaluation/canaries.py, audit.canaries.enabled): random secrets the tokenize stage planted in the
train split, each ranked by the tuned model among audit.canaries.candidates random secrets of the same shape
(exposure, in bits) and asked for greedily. The secrets are never written: they are rebuilt from the params here.

audit.gate's thresholds then hold (a null one checks nothing): a miss fails the stage after its outputs are
written, naming the source, metric, value and threshold, and the merge stage refuses the adapter. Writes
metrics/audit.json and data/audit/ (extraction.jsonl: every audited row's scores, without the texts; gate.json).
"""
from __future__ import annotations

import functools
import gc
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import run_stage
from ftpipe.core.evaluation_params import AuditGateParams, AuditParams
from ftpipe.core.io import read_json, read_jsonl, write_json, write_jsonl
from ftpipe.core.params import Params, flatten
from ftpipe.core.paths import ADAPTER_DIR, BASE_DIR, CLEAN_DIR, PERSONAL_DATA_FILE, TOKENIZED_DIR
from ftpipe.core.stage import Stage
from ftpipe.data.chat_template import load_chat_tokenizer
from ftpipe.evaluation.canaries import exposure, greedy_extracts, make_canaries
from ftpipe.evaluation.gates import VERDICT_FILE, Check, adapter_subject, at_most, check_rows, enforce, verdict
from ftpipe.evaluation.memorization import answer_rows, by_source, memorization_gap, sample_by_source
from ftpipe.evaluation.pii_leaks import audit_prompts, pii_leaks
from ftpipe.model.modeling import inference_dtype, load_model

SAMPLE_SEED = 0   # which rows are audited: fixed, so reruns audit the same rows


def audit_models(params: AuditParams, base_dir: Path, adapter_dir: Path, train_rows: list[dict],
                 test_rows: list[dict], personal_sources: set[str], tokenized_dir: Path = TOKENIZED_DIR
                 ) -> tuple[dict, list[dict]]:
    """The audit's metrics and every audited row's scores (tagged with model and split)."""
    tokenizer = load_chat_tokenizer(base_dir, tokenized_dir)
    train_sample = sample_by_source(train_rows, params.train_examples, SAMPLE_SEED)
    test_sample = sample_by_source(test_rows, params.train_examples, SAMPLE_SEED)
    sampled = {row["id"] for row in train_sample}
    placeholder_rows = [row for row in audit_prompts(train_rows, params.train_examples) if row["id"] not in sampled]
    model = load_model(base_dir, inference_dtype())
    answers = functools.partial(answer_rows, max_new_tokens=params.max_new_tokens, batch_size=params.batch_size)
    _, base_train = answers(model, tokenizer, train_sample, desc="audit: base on train prompts")
    del model
    gc.collect()
    model = load_model(base_dir, inference_dtype(), adapter_dir=adapter_dir)
    train_answers, tuned_train = answers(model, tokenizer, train_sample, desc="audit: tuned on train prompts")
    test_answers, tuned_test = answers(model, tokenizer, test_sample, desc="audit: tuned on test prompts")
    placeholder_answers, _ = answers(model, tokenizer, placeholder_rows,
                                     desc="audit: tuned on prompts whose answers held PII placeholders")
    canaries = canary_results(model, tokenizer, params)
    gaps = memorization_gap(by_source(tuned_train), by_source(tuned_test), by_source(base_train))
    leaks = pii_leaks([*train_answers, *test_answers, *placeholder_answers])
    metrics = {"extraction": {"per_source": {
                   source: {"personal_data": source in personal_sources, **extraction_summary(entry)}
                   for source, entry in gaps["sources"].items()},
                   "overall": extraction_summary(gaps["overall"]),
                   "examples_per_source": params.train_examples, "max_new_tokens": params.max_new_tokens},
               "pii": {"prompts": leaks["generations"], "placeholder_prompts": len(placeholder_rows),
                       "leaks": len(leaks["leaks"]), "answers_with_pii": leaks["with_pii"],
                       "by_kind": leaks["counts"]},
               "canaries": canaries}
    rows = ([{"model": "base", "split": "train", **score} for score in base_train]
            + [{"model": "tuned", "split": "train", **score} for score in tuned_train]
            + [{"model": "tuned", "split": "test", **score} for score in tuned_test])
    return metrics, rows


def extraction_summary(entry: dict) -> dict:
    """memorization_gap's entry for one source in the report's words."""
    def side(summary: dict) -> dict:
        return {"examples": summary["count"], "prefix_fraction": summary["mean_prefix_fraction"],
                "exact_rate": summary["exact_rate"]}

    return {"tuned_train": side(entry["tuned_train"]), "tuned_test": side(entry["tuned_test"]),
            "base_train": side(entry["base_train"]), "gap": entry["gap_prefix_fraction"],
            "gap_exact_rate": entry["gap_exact_rate"]}


def canary_results(model, tokenizer, params: AuditParams) -> dict | None:
    """Each planted canary's exposure and greedy extraction; never its secret."""
    settings = params.canaries
    if not settings.enabled:
        return None
    results = []
    for canary in make_canaries(settings.seed, settings.repeats, settings.digits):
        found = exposure(model, tokenizer, canary, settings.candidates, settings.seed, params.batch_size)
        results.append({"id": canary["id"], "repeats": canary["repeats"], "exposure": found["exposure"],
                        "rank": found["rank"], "max_exposure": found["max_exposure"],
                        "extracted": greedy_extracts(model, tokenizer, canary, params.max_new_tokens)})
    return {"count": len(results), "repeats": list(settings.repeats), "candidates": settings.candidates,
            "digits": settings.digits, "results": results}


def gate_checks(gate: AuditGateParams, metrics: dict) -> list[Check]:
    """audit.gate's thresholds against the audit's metrics."""
    checks: list[Check] = []
    for source, entry in metrics["extraction"]["per_source"].items():
        if entry["gap"] is not None:
            checks += at_most("audit.gate.max_extraction_gap",
                              f"extraction gap (tuned on train - on test) of source {source}", entry["gap"],
                              gate.max_extraction_gap)
        if entry["personal_data"] and entry["tuned_train"]["exact_rate"] is not None:
            checks += at_most("audit.gate.max_personal_data_exact",
                              f"verbatim-repeat rate of source {source} (declared personal data)",
                              entry["tuned_train"]["exact_rate"], gate.max_personal_data_exact)
    checks += at_most("audit.gate.max_pii_leaks", "real-looking PII values in the tuned model's answers",
                      metrics["pii"]["leaks"], gate.max_pii_leaks)
    for canary in (metrics["canaries"] or {}).get("results", []):
        checks += at_most("audit.gate.max_canary_exposure",
                          f"exposure of {canary['id']} (planted {canary['repeats']}x), bits", canary["exposure"],
                          gate.max_canary_exposure)
    return checks


def personal_data_sources(path: Path = PERSONAL_DATA_FILE) -> set[str]:
    """The sources declared personal data, as the compliance stage wrote them (not read from params.yaml, so
    that a license change reruns no audit)."""
    return set(read_json(path)["sources"])


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.audit, "audit")


def main() -> None:
    train_rows, test_rows = read_jsonl(CLEAN_DIR / "train.jsonl"), read_jsonl(CLEAN_DIR / "test.jsonl")
    with Stage("audit", tracked_params) as stage:
        params = stage.params.audit
        metrics, rows = audit_models(params, BASE_DIR, ADAPTER_DIR, train_rows, test_rows,
                                     personal_data_sources())
        checks = gate_checks(params.gate, metrics)
        metrics["gate"] = {"passed": all(check.passed for check in checks), "checks": check_rows(checks)}
        with stage.output() as out_dir:
            write_jsonl(out_dir / "extraction.jsonl", rows)
            write_json(out_dir / VERDICT_FILE, verdict(checks, adapter_subject(ADAPTER_DIR)))
            stage.record["metrics"] = metrics
        stage.finish(metrics, log=run_metrics(metrics))
        overall = metrics["extraction"]["overall"]
        print(f"audit: verbatim-prefix share tuned on train {overall['tuned_train']['prefix_fraction']:.3f}, on test "
              f"{overall['tuned_test']['prefix_fraction']:.3f}, base on train "
              f"{overall['base_train']['prefix_fraction']:.3f}; PII values in answers: {metrics['pii']['leaks']}"
              + (f"; {metrics['canaries']['count']} canaries" if metrics["canaries"] else ""))
        enforce("audit", checks)


def run_metrics(metrics: dict) -> dict:
    """The numbers MLflow compares runs by."""
    logged = {"pii_leaks": metrics["pii"]["leaks"], "gate_passed": int(metrics["gate"]["passed"])}
    for source, entry in metrics["extraction"]["per_source"].items():
        logged |= {f"{source}.{side}.{key}": value for side in ("tuned_train", "tuned_test", "base_train")
                   for key, value in entry[side].items() if value is not None}
        if entry["gap"] is not None:
            logged[f"{source}.extraction_gap"] = entry["gap"]
    for canary in (metrics["canaries"] or {}).get("results", []):
        logged |= {f"{canary['id']}.exposure": canary["exposure"],
                   f"{canary['id']}.extracted": int(canary["extracted"])}
    return logged


if __name__ == "__main__":
    run_stage(main)
