"""Stage `evaluate`: did the model learn the task, did it lose what it could do, and may it be released?

    python -m stages.evaluate

On the held-out test split, base vs tuned (base + adapter): loss and perplexity on the assistant tokens, and
the greedy answers scored against the references with ROUGE-L, chrF, exact match and token F1
(ftpipe/evaluation/task_metrics.py), overall and per data source. General ability: the loss of both on
general text that is not training data (ftpipe/evaluation/general_text.py). The standard harness, when
evaluate.harness.tasks lists any (ftpipe/evaluation/harness.py). Then the gates of evaluate.gate and the drift
against the last release (evaluate.drift): a miss fails the stage after its outputs are written, naming the
metric, its value and the threshold, and the merge stage refuses to run (ftpipe/evaluation/gates.py).

Writes metrics/evaluate.json, data/evaluation/ with samples.jsonl (the first evaluate.num_samples examples),
generations.jsonl (all), side_by_side.html (every example, sortable by gain: a reviewer's page) and gate.json.
Answers end at any of the model's end-of-sequence ids. evaluate.batch_size: auto sizes each pass to the GPU
memory left free by the loaded model (ftpipe/model/batch_memory.py; 16 on the CPU).
"""
from __future__ import annotations

import gc
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.evaluation_params import EvaluateGateParams
from ftpipe.core.io import read_jsonl, write_json, write_jsonl
from ftpipe.core.params import EvaluateParams, Params, flatten
from ftpipe.core.paths import ADAPTER_DIR, BASE_DIR, CLEAN_DIR, EVALUATION_DIR, TOKENIZED_DIR
from ftpipe.core.stage import Stage
from ftpipe.data.chat_template import load_chat_tokenizer
from ftpipe.evaluation.drift import (
    BASELINE_ARTIFACT,
    compare,
    drift_checks,
    drift_metrics,
    examples_digest,
    load_baseline,
)
from ftpipe.evaluation.gates import (
    VERDICT_FILE,
    Check,
    adapter_subject,
    at_least,
    at_most,
    check_rows,
    enforce,
    verdict,
)
from ftpipe.evaluation.general_text import general_passages, passage_rows
from ftpipe.evaluation.side_by_side import write_side_by_side
from ftpipe.evaluation.task_metrics import aggregate, score_answer
from ftpipe.model.batch_memory import batch_sizes, fitting_mean_loss
from ftpipe.model.modeling import generate, inference_dtype, load_model, render_chats

MODELS = ("base", "tuned")


def select_examples(examples: list[dict], tokenized: list[dict], max_examples: int | None) -> tuple[list, list]:
    """A fixed subset: the test rows in id (content-hash) order, so the choice is stable."""
    by_id = {row["id"]: row for row in tokenized}
    kept = sorted((e for e in examples if e["id"] in by_id), key=lambda e: e["id"])[:max_examples]
    if not kept:
        raise PipelineError("evaluate: the test split is empty; lower clean.test_fraction's minimum or add data")
    return kept, [by_id[e["id"]] for e in kept]


def evaluate_models(params: EvaluateParams, base_dir: Path, adapter_dir: Path, examples: list[dict],
                    tokenized: list[dict], training_answers: list[str],
                    tokenized_dir: Path = TOKENIZED_DIR) -> tuple[dict, list[dict]]:
    """Metrics for the base and the tuned model, and per-example generations with their scores; prompts rendered
    with the chat template the tokenize stage saved in `tokenized_dir`."""
    examples, tokenized = select_examples(examples, tokenized, params.max_examples)
    tokenizer = load_chat_tokenizer(base_dir, tokenized_dir)
    prompts = render_chats(tokenizer, [e["messages"][:-1] for e in examples], add_generation_prompt=True)
    references = [e["messages"][-1]["content"] for e in examples]
    passages, general_set = general_passages(params.general_text, training_answers)
    general_rows = passage_rows(tokenizer, passages, params.general_text.max_tokens)
    # the longest prompt and row: batches are padded to their longest, so these size a batch's memory
    prompt_tokens = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
    loss_tokens = max(len(row["input_ids"]) for row in [*tokenized, *general_rows])
    metrics: dict = {"examples": len(examples), "test_examples_sha256": examples_digest([e["id"] for e in examples]),
                     "batch_size": {"requested": params.batch_size}, "general_text": {"set": general_set}}
    answers: dict[str, list[str]] = {}
    for name, adapter in zip(MODELS, (None, adapter_dir)):
        model = load_model(base_dir, inference_dtype(), adapter_dir=adapter)
        sizes = batch_sizes(params.batch_size, model, prompt_tokens, params.max_new_tokens, loss_tokens,
                            len(examples))
        print(f"evaluate: {name} model, batches of {sizes['loss']} rows (loss) and {sizes['generation']} prompts "
              f"(generation); evaluate.batch_size: {params.batch_size}")
        loss, sizes["loss"] = fitting_mean_loss(model, tokenized, tokenizer.pad_token_id, sizes["loss"],
                                                f"{name} loss")
        general, _ = fitting_mean_loss(model, general_rows, tokenizer.pad_token_id, sizes["loss"],
                                       f"{name} general-text loss")
        answers[name], sizes["generation"] = generate(model, tokenizer, prompts, params.max_new_tokens,
                                                      sizes["generation"], f"{name} generations")
        metrics["batch_size"][name] = sizes   # as run: after any halving for lack of GPU memory
        metrics[name] = {"loss": loss["loss"], "perplexity": loss["perplexity"],
                         "mean_answer_words": sum(len(a.split()) for a in answers[name]) / len(examples)}
        metrics["general_text"][name] = {"loss": general["loss"], "perplexity": general["perplexity"]}
        del model
        gc.collect()   # the GPU memory of this model is free before the next one loads and measures what is left
    metrics["general_text"]["loss_increase"] = (metrics["general_text"]["tuned"]["loss"]
                                                - metrics["general_text"]["base"]["loss"])
    samples = [{"id": e["id"], "source": e.get("source", "unknown"), "prompt": e["messages"][-2]["content"],
                "reference": reference, "base": base, "tuned": tuned,
                "scores": {"base": score_answer(base, reference), "tuned": score_answer(tuned, reference)}}
               for e, reference, base, tuned in zip(examples, references, answers["base"], answers["tuned"])]
    metrics["task"] = aggregate(samples)
    for name in MODELS:   # the task metrics beside loss, as before
        metrics[name].update(metrics["task"]["overall"][name])
    metrics["rougeL_gain"] = metrics["task"]["overall"]["gain"]["rougeL"]
    if params.harness.tasks:
        metrics["harness"] = standard_harness(params, base_dir, adapter_dir)
    return metrics, samples


def standard_harness(params: EvaluateParams, base_dir: Path, adapter_dir: Path) -> dict:
    """lm-evaluation-harness on base and tuned, the tasks evaluate.harness lists."""
    from ftpipe.evaluation.harness import compare as compare_harness
    from ftpipe.evaluation.harness import run_harness
    from ftpipe.model.modeling import cuda_available

    harness = params.harness
    include = Path(harness.include_path) if harness.include_path else None
    batch = 16 if params.batch_size == "auto" else params.batch_size
    runs = {name: run_harness(harness.tasks, base_dir, adapter, include, harness.limit, harness.num_fewshot, batch,
                              inference_dtype(), "cuda" if cuda_available() else "cpu")
            for name, adapter in zip(MODELS, (None, adapter_dir))}
    return {**runs, "comparison": compare_harness(runs["base"], runs["tuned"])}


def gate_checks(gate: EvaluateGateParams, metrics: dict) -> list[Check]:
    """evaluate.gate's thresholds against this run's metrics (a null threshold checks nothing)."""
    metric, task = gate.task_metric, metrics["task"]
    checks = at_least("evaluate.gate.min_gain", f"{metric} gain of tuned over base", task["overall"]["gain"][metric],
                      gate.min_gain)
    for source, summary in task["per_source"].items():
        checks += at_least("evaluate.gate.min_source_score", f"tuned {metric} on source {source}",
                           summary["tuned"][metric], gate.min_source_score)
    checks += at_most("evaluate.gate.max_tuned_loss", "tuned test loss", metrics["tuned"]["loss"],
                      gate.max_tuned_loss)
    checks += at_most("evaluate.gate.max_general_loss_increase", "general-text loss increase (tuned - base)",
                      metrics["general_text"]["loss_increase"], gate.max_general_loss_increase)
    return checks


def drift(params: EvaluateParams, metrics: dict) -> tuple[dict | None, list[Check]]:
    """The comparison with the last release, and its checks when a regression fails the stage (warnings
    otherwise)."""
    if params.drift.baseline is None:
        return None, []
    baseline = load_baseline(Path(params.drift.baseline))
    if baseline is None:
        print(f"evaluate drift: no baseline at {params.drift.baseline} yet (a first release): nothing compared. When "
              f"you ship, run `python -m ftpipe.release.baseline` and commit the file.")
        return {"baseline_release": None, "missing": params.drift.baseline, "rows": [], "skipped": {},
                "on_regression": params.drift.on_regression}, []
    comparison = compare(baseline, drift_metrics(metrics), params.drift)
    for metric, why in comparison["skipped"].items():
        print(f"evaluate drift: {metric} not compared with the last release: {why}")
    if params.drift.on_regression == "fail":
        return comparison, drift_checks(comparison)
    for row in comparison["rows"]:
        if row["regressed"]:
            print(f"warning: evaluate drift: {row['metric']} is worse than the last release by {row['worse_by']:.4f} "
                  f"(evaluate.drift.max_regression.{row['metric']}: {row['allowed']}); on_regression is warn")
    return comparison, []


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.evaluate, "evaluate")


def main() -> None:
    from ftpipe.data.tokenized import load_tokenized

    examples, tokenized = read_jsonl(CLEAN_DIR / "test.jsonl"), load_tokenized("test")
    training_answers = [row["messages"][-1]["content"] for row in read_jsonl(CLEAN_DIR / "train.jsonl")]
    with Stage("evaluate", tracked_params) as stage:
        params = stage.params.evaluate
        metrics, samples = evaluate_models(params, BASE_DIR, ADAPTER_DIR, examples, tokenized, training_answers)
        metrics["drift"], drift_gates = drift(params, metrics)
        checks = gate_checks(params.gate, metrics) + drift_gates
        metrics["gate"] = {"passed": all(check.passed for check in checks), "checks": check_rows(checks)}
        with stage.output() as out_dir:
            write_jsonl(out_dir / "samples.jsonl", samples[:params.num_samples])
            write_jsonl(out_dir / "generations.jsonl", samples)
            write_side_by_side(samples, metrics["task"], out_dir / "side_by_side.html",
                               f"Base vs tuned on {len(samples)} test examples")
            write_json(out_dir / VERDICT_FILE, verdict(checks, adapter_subject(ADAPTER_DIR)))
            stage.record["metrics"] = metrics
        stage.finish(metrics, log=run_metrics(metrics))
        stage.tracker.log_artifact(EVALUATION_DIR / "samples.jsonl")
        stage.tracker.log_artifact(EVALUATION_DIR / "side_by_side.html")
        # what `python -m ftpipe.release.baseline --mlflow-run <this run>` makes a baseline of
        stage.tracker.log_dict(drift_metrics(metrics), BASELINE_ARTIFACT)
        stage.tracker.log_input(CLEAN_DIR / "test.jsonl", "clean/test", "evaluation")
        overall = metrics["task"]["overall"]
        print(f"evaluate: {metrics['examples']} test examples; ROUGE-L base {overall['base']['rougeL']:.3f} -> "
              f"tuned {overall['tuned']['rougeL']:.3f}; loss base {metrics['base']['loss']:.3f} -> tuned "
              f"{metrics['tuned']['loss']:.3f}; general-text loss {metrics['general_text']['base']['loss']:.3f} -> "
              f"{metrics['general_text']['tuned']['loss']:.3f}")
        enforce("evaluate", checks)


def run_metrics(metrics: dict) -> dict:
    """The numbers MLflow compares runs by: per model and per source."""
    logged = {f"{model}.{key}": value for model in MODELS for key, value in metrics[model].items()}
    logged |= {f"{model}.{what}_batch_size": size for model in MODELS
               for what, size in metrics["batch_size"][model].items()}
    logged |= {f"general_text.{model}.loss": metrics["general_text"][model]["loss"] for model in MODELS}
    for source, summary in metrics["task"]["per_source"].items():
        logged |= {f"source.{source}.{model}.{key}": value for model in ("base", "tuned", "gain")
                   for key, value in summary[model].items()}
    for model in MODELS:
        for task, scores in metrics.get("harness", {}).get(model, {}).get("tasks", {}).items():
            logged |= {f"harness.{model}.{task}.{key.replace(',', '.')}": value for key, value in scores.items()
                       if isinstance(value, (int, float))}
    return {**logged, "rougeL_gain": metrics["rougeL_gain"], "gate_passed": int(metrics["gate"]["passed"])}


if __name__ == "__main__":
    run_stage(main)
