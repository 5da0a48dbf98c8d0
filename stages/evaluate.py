"""Stage `evaluate`: the base model vs the tuned one (base + adapter) on the held-out test split.

    python -m stages.evaluate

For each model: loss and perplexity on the assistant tokens, and ROUGE-L (F1 of the longest
common word subsequence) of its greedy answer against the reference answer; answers end at any of
the model's end-of-sequence ids (its generation config's, e.g. Gemma's <end_of_turn>, and the
tokenizer's). Writes metrics/evaluate.json (DVC metrics, with the batch sizes each pass ran at) and
data/evaluation/samples.jsonl with side-by-side generations for a reader.

evaluate.batch_size: auto sizes each pass to the GPU memory left free by the loaded model
(ftpipe/model/batch_memory.py; 16 on the CPU); a batch that runs out of GPU memory is retried at
half the size, with a warning.
"""
from __future__ import annotations

import gc
import re
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import read_jsonl, write_jsonl
from ftpipe.core.params import EvaluateParams, Params, flatten
from ftpipe.core.paths import ADAPTER_DIR, BASE_DIR, CLEAN_DIR, EVALUATION_DIR, TOKENIZED_DIR
from ftpipe.core.stage import Stage
from ftpipe.data.chat_template import load_chat_tokenizer
from ftpipe.model.batch_memory import batch_sizes, fitting_mean_loss
from ftpipe.model.modeling import generate, inference_dtype, load_model, render_chats

WORD = re.compile(r"[a-z0-9]+")


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lowercase alphanumeric words (as rouge-score tokenizes, without stemming)."""
    pred, ref = WORD.findall(prediction.lower()), WORD.findall(reference.lower())
    if not pred or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for word in pred:   # longest common subsequence, one DP row at a time
        current = [0]
        for j, ref_word in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if word == ref_word else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def select_examples(examples: list[dict], tokenized: list[dict], max_examples: int | None) -> tuple[list, list]:
    """A fixed subset: the test rows in id (content-hash) order, so the choice is stable."""
    by_id = {row["id"]: row for row in tokenized}
    kept = sorted((e for e in examples if e["id"] in by_id), key=lambda e: e["id"])[:max_examples]
    if not kept:
        raise PipelineError("evaluate: the test split is empty; lower clean.test_fraction's minimum or add data")
    return kept, [by_id[e["id"]] for e in kept]


def evaluate_models(params: EvaluateParams, base_dir: Path, adapter_dir: Path, examples: list[dict],
                    tokenized: list[dict], tokenized_dir: Path = TOKENIZED_DIR) -> tuple[dict, list[dict]]:
    """Metrics for the base and the tuned model, and per-example generations; prompts rendered with the chat
    template the tokenize stage saved in `tokenized_dir`."""
    examples, tokenized = select_examples(examples, tokenized, params.max_examples)
    tokenizer = load_chat_tokenizer(base_dir, tokenized_dir)
    prompts = render_chats(tokenizer, [e["messages"][:-1] for e in examples], add_generation_prompt=True)
    references = [e["messages"][-1]["content"] for e in examples]
    # the longest prompt and row: batches are padded to their longest, so these size a batch's memory
    prompt_tokens = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
    loss_tokens = max(len(row["input_ids"]) for row in tokenized)
    metrics: dict = {"examples": len(examples), "batch_size": {"requested": params.batch_size}}
    answers: dict[str, list[str]] = {}
    for name, adapter in (("base", None), ("tuned", adapter_dir)):
        model = load_model(base_dir, inference_dtype(), adapter_dir=adapter)
        sizes = batch_sizes(params.batch_size, model, prompt_tokens, params.max_new_tokens, loss_tokens,
                            len(examples))
        print(f"evaluate: {name} model, batches of {sizes['loss']} rows (loss) and {sizes['generation']} prompts "
              f"(generation); evaluate.batch_size: {params.batch_size}")
        loss, sizes["loss"] = fitting_mean_loss(model, tokenized, tokenizer.pad_token_id, sizes["loss"],
                                                f"{name} loss")
        answers[name], sizes["generation"] = generate(model, tokenizer, prompts, params.max_new_tokens,
                                                      sizes["generation"], f"{name} generations")
        metrics["batch_size"][name] = sizes   # as run: after any halving for lack of GPU memory
        scores = [rouge_l(answer, reference) for answer, reference in zip(answers[name], references)]
        metrics[name] = {"loss": loss["loss"], "perplexity": loss["perplexity"],
                         "rougeL": sum(scores) / len(scores),
                         "mean_answer_words": sum(len(a.split()) for a in answers[name]) / len(examples)}
        del model
        gc.collect()   # the GPU memory of this model is free before the next one loads and measures what is left
    metrics["rougeL_gain"] = metrics["tuned"]["rougeL"] - metrics["base"]["rougeL"]
    samples = [{"id": e["id"], "prompt": e["messages"][-2]["content"], "reference": reference,
                "base": base, "tuned": tuned, "rougeL_base": rouge_l(base, reference),
                "rougeL_tuned": rouge_l(tuned, reference)}
               for e, reference, base, tuned in zip(examples, references, answers["base"], answers["tuned"])]
    return metrics, samples


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.evaluate, "evaluate")


def main() -> None:
    from ftpipe.data.tokenized import load_tokenized

    examples, tokenized = read_jsonl(CLEAN_DIR / "test.jsonl"), load_tokenized("test")
    with Stage("evaluate", tracked_params) as stage:
        params = stage.params.evaluate
        metrics, samples = evaluate_models(params, BASE_DIR, ADAPTER_DIR, examples, tokenized)
        with stage.output() as out_dir:
            write_jsonl(out_dir / "samples.jsonl", samples[:params.num_samples])
            write_jsonl(out_dir / "generations.jsonl", samples)
            stage.record["metrics"] = metrics
        stage.finish(metrics, log={**{f"{model}.{key}": value for model in ("base", "tuned")
                                      for key, value in metrics[model].items()},
                                   **{f"{model}.{what}_batch_size": size for model in ("base", "tuned")
                                      for what, size in metrics["batch_size"][model].items()},
                                   "rougeL_gain": metrics["rougeL_gain"]})
        stage.tracker.log_artifact(EVALUATION_DIR / "samples.jsonl")
        stage.tracker.log_input(CLEAN_DIR / "test.jsonl", "clean/test", "evaluation")
    print(f"evaluate: {metrics['examples']} test examples; ROUGE-L base {metrics['base']['rougeL']:.3f} -> "
          f"tuned {metrics['tuned']['rougeL']:.3f}; loss base {metrics['base']['loss']:.3f} -> "
          f"tuned {metrics['tuned']['loss']:.3f}")


if __name__ == "__main__":
    run_stage(main)
