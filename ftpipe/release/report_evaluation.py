"""The compliance report's evaluation and memorization-audit sections: base against tuned on the test split,
the gates' checks, task metrics per source, general-text loss, drift, benchmarks, each GGUF in llama.cpp; and
extraction per source, PII in answers, canaries (report_render.py renders them).
"""
from __future__ import annotations

from typing import Any

from ftpipe.release.gguf_release import (
    GREEDY_FILE_TYPE,
    chat_prompts,
    converter_text,
    greedy_passed,
    greedy_summary,
    llama_cpp_build,
    tensor_mix,
)
from ftpipe.release.report_charts import comparison_chart, gguf_gap_chart
from ftpipe.release.report_document import (
    BR,
    Chart,
    Code,
    Fields,
    Heading,
    Inline,
    Items,
    LocalLink,
    Mark,
    Para,
    Table,
    joined,
    size,
    value,
)

# --- evaluation ---

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


