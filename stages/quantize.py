"""Stage `quantize`: export the merged model to GGUF and check each file in llama.cpp, the runtime that serves it.

    python -m stages.quantize

Each type in quantize.types becomes models/gguf/model-<type>.gguf: f16/bf16/f32/q8_0 by llama.cpp's
converter, K-quants (q4_k_m, ...) by llama.cpp's quantizer from the f16 file (ftpipe/gguf/export.py). Each
file is then loaded by llama.cpp and checked against the merged model (ftpipe/gguf/parity.py): its loss on
the validation split's assistant tokens within quantize.max_loss_gap.<type>, its tokenizer, the prompt its
chat template builds, its stop token; and the f16 file's greedy chat answers against the merged model's.
Any failure names the file and what differs, and publishes nothing.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.gguf_types import GREEDY_CHECK_TYPE
from ftpipe.core.io import read_jsonl, sha256_file
from ftpipe.core.params import Params, QuantizeParams, flatten
from ftpipe.core.paths import CLEAN_DIR, GGUF_DIR, MERGED_DIR, PROVENANCE_FILE
from ftpipe.core.stage import Stage
from ftpipe.gguf import parity
from ftpipe.gguf.contents import tensor_type_mix
from ftpipe.gguf.export import converter_info, export_all
from ftpipe.gguf.runtime import build_info, open_gguf
from ftpipe.model.modeling import end_of_turn_ids, inference_dtype, load_model, load_tokenizer, mean_loss

LOSS_BATCH = 16
SCRATCH_F16 = ".model-f16.scratch.gguf"   # the f16 GGUF K-quants and greedy answers use when f16 is not published


def greedy_prompts(rows: list[dict], conversations: dict[str, list[dict]], count: int) -> list[tuple[list, list]]:
    """(messages before the first assistant turn, their prompt token ids) of the first `count` validation rows
    by id, as the tokenize stage tokenized them. Only rows with every assistant turn labelled: then the first
    labelled tokens are the first answer's (a template may leave earlier turns unlabelled, ftpipe.data.chat_tokens)."""
    chosen = []
    for row in sorted(rows, key=lambda row: row["id"]):
        messages, starts = conversations.get(row["id"]), parity.turn_starts(list(row["labels"]))
        if messages and starts and len(starts) == sum(message["role"] == "assistant" for message in messages):
            first_answer = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
            chosen.append((messages[:first_answer], [int(t) for t in row["input_ids"][:starts[0]]]))
        if len(chosen) == count:
            break
    return chosen


def reference(params: QuantizeParams, merged_dir: Path, rows: list[dict], prompts: list) -> dict:
    """The merged model in transformers: validation loss, end-of-turn tokens, greedy answers."""
    tokenizer = load_tokenizer(merged_dir)
    model = load_model(merged_dir, inference_dtype())
    end_of_turn = end_of_turn_ids(model, tokenizer)
    loss = mean_loss(model, rows, tokenizer.pad_token_id, LOSS_BATCH, "merged validation loss")["loss"]
    answers = [parity.reference_answer(model, tokenizer, prompt_ids, end_of_turn, params.max_new_tokens)
               for _, prompt_ids in prompts]
    return {"tokenizer": tokenizer, "end_of_turn": end_of_turn, "loss": loss, "answers": answers}


def check_file(params: QuantizeParams, gguf_type: str, path: Path, rows: list[dict], conversations: dict,
               ref: dict, n_ctx: int) -> tuple[dict, list[str], object]:
    """One GGUF in llama.cpp: its metrics entry, its failures, and the open model."""
    llm = open_gguf(path, n_ctx, logits_all=True)
    texts = [llm.detokenize(list(row["input_ids"]), special=True).decode("utf-8", "replace") for row in rows]
    loss = parity.llama_loss(llm, rows, f"{gguf_type} validation loss (llama.cpp)")
    mistokenized = parity.tokenizer_mismatches(llm, ref["tokenizer"], texts)
    compared, prompt_mismatches = parity.chat_prompt_mismatches(llm, rows, conversations, f"{gguf_type} chat prompts")
    taught = parity.taught_end_of_turn(rows, ref["end_of_turn"])
    stop_problems = parity.stop_token_problems(llm, ref["end_of_turn"], ref["tokenizer"], taught)
    entry = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), "validation_loss": loss,
             "loss_gap": loss - ref["loss"], "tokenizer_mismatches": len(mistokenized),
             "chat_prompts_compared": compared, "chat_prompt_mismatches": len(prompt_mismatches),
             "stop_token_problems": stop_problems,
             # end-of-turn tokens of the generation config that answers never end with, and llama.cpp runs past
             "untaught_stop_tokens_not_ending_generation": parity.not_ending_generation(
                 llm, [token for token in ref["end_of_turn"] if token not in taught]),
             **tensor_type_mix(path)}
    failures, limit = [], params.max_loss_gap.get(gguf_type)
    if limit is not None and not abs(entry["loss_gap"]) <= limit:
        failures.append(f"{path.name}: validation loss {loss:.4f} in llama.cpp vs merged {ref['loss']:.4f}, gap "
                        f"{entry['loss_gap']:+.4f} exceeds quantize.max_loss_gap.{gguf_type} = {limit}")
    if mistokenized:
        failures.append(f"{path.name}: llama.cpp's tokenizer encodes {len(mistokenized)} of {len(texts)} validation "
                        f"texts differently from the merged model's (first: {mistokenized[0][:120]!r})")
    if prompt_mismatches:
        first = prompt_mismatches[0]
        failures.append(f"{path.name}: wrong chat template: the GGUF's tokenizer.chat_template, applied by llama.cpp, "
                        f"builds a different prompt from the tokenize stage's for {len(prompt_mismatches)} of "
                        f"{compared} validation prompts (row {first.row_id}, turn {first.turn}: expected "
                        f"{first.expected[-160:]!r}, llama.cpp built {first.got[-160:]!r})")
    failures += [f"{path.name}: wrong stop token: {problem}" for problem in stop_problems]
    return entry, failures, llm


def greedy_check(params: QuantizeParams, llm, ref: dict, prompts: list, name: str) -> tuple[dict, list[str]]:
    result = parity.greedy_comparison(llm, ref["answers"], [messages for messages, _ in prompts],
                                      params.max_new_tokens)
    needed = math.ceil(params.min_greedy_agreement * result["prompts"])
    result["needed"] = needed
    failures = []
    if result["same_text"] < needed:
        first = next(p for p in result["pairs"] if p["merged"] != p["gguf"])
        failures.append(f"{name}: llama.cpp's greedy answers equal the merged model's on {result['same_text']} of "
                        f"{result['prompts']} validation prompts; quantize.min_greedy_agreement needs {needed} "
                        f"(first difference, prompt {first['prompt'][:80]!r}: merged {first['merged'][:80]!r}, "
                        f"llama.cpp {first['gguf'][:80]!r})")
    if result["stopped_where_merged_stopped"] < result["merged_stopped"]:
        failures.append(f"{name}: wrong stop token: llama.cpp ran past the end-of-turn token on "
                        f"{result['merged_stopped'] - result['stopped_where_merged_stopped']} of the "
                        f"{result['merged_stopped']} prompts where the merged model stopped")
    return result, failures


def quantize_and_check(params: QuantizeParams, merged_dir: Path, rows: list[dict], conversations: dict,
                       out_dir: Path) -> dict:
    prompts = greedy_prompts(rows, conversations, params.greedy_prompts)
    ref = reference(params, merged_dir, rows, prompts)
    scratch = out_dir / SCRATCH_F16
    files = export_all(merged_dir, params.types, out_dir, scratch, always_f16=True)
    # twice the longest row: a GGUF whose tokenizer splits text into more tokens still evaluates, and is reported
    n_ctx = 2 * max(len(row["input_ids"]) for row in rows) + params.max_new_tokens + 16
    metrics: dict = {"merged_validation_loss": ref["loss"], "end_of_turn_ids": ref["end_of_turn"],
                     "end_of_turn_tokens": ref["tokenizer"].convert_ids_to_tokens(ref["end_of_turn"]), "files": {}}
    failures: list[str] = []
    for gguf_type, path in files.items():
        entry, file_failures, llm = check_file(params, gguf_type, path, rows, conversations, ref, n_ctx)
        metrics["files"][gguf_type] = entry
        failures += file_failures
        if gguf_type == GREEDY_CHECK_TYPE and prompts:
            metrics["greedy"], greedy_failures = greedy_check(params, llm, ref, prompts, path.name)
            failures += greedy_failures
        llm.close()
    if "greedy" not in metrics and prompts:   # f16 not published: the scratch f16 (K-quants' source) answers
        llm = open_gguf(scratch, n_ctx)
        metrics["greedy"], greedy_failures = greedy_check(params, llm, ref, prompts, "the f16 GGUF")
        failures += greedy_failures
        llm.close()
    scratch.unlink(missing_ok=True)
    if failures:
        raise PipelineError("GGUF export does not match the merged model in llama.cpp (nothing was published):\n  "
                            + "\n  ".join(failures))
    return metrics


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return {**flatten(params.quantize, "quantize"), **flatten(params.evaluate.harness, "evaluate.harness")}


def gguf_harness(params: Params, metrics: dict, out_dir: Path) -> dict | None:
    """evaluate.harness's tasks on the GGUF quantize.harness_gguf names, in llama.cpp; where the harness cannot score
    that file correctly, why it was not run (a warning, not a failure: the HF numbers stand)."""
    from ftpipe.evaluation.harness import HarnessUnsupported, run_harness_gguf

    harness, gguf_type = params.evaluate.harness, params.quantize.harness_gguf
    if gguf_type is None or not harness.tasks:
        return None
    path = out_dir / metrics["files"][gguf_type]["file"]
    include = Path(harness.include_path) if harness.include_path else None
    try:
        return {"gguf_type": gguf_type, **run_harness_gguf(harness.tasks, path, include, harness.limit,
                                                           harness.num_fewshot)}
    except HarnessUnsupported as err:
        print(f"warning: quantize: {err}", file=sys.stderr)
        return {"gguf_type": gguf_type, "not_run": str(err)}


def main() -> None:
    from ftpipe.data.tokenized import load_tokenized

    rows = load_tokenized("validation")
    conversations = {row["id"]: row["messages"] for row in read_jsonl(CLEAN_DIR / "validation.jsonl")}
    with Stage("quantize", tracked_params) as stage:
        with stage.output() as out_dir:
            metrics = quantize_and_check(stage.params.quantize, MERGED_DIR, rows, conversations, out_dir)
            harness = gguf_harness(stage.params, metrics, out_dir)
            if harness is not None:
                metrics["harness"] = harness
            stage.record.update(metrics=metrics, llama_cpp=build_info(),
                                converter=converter_info(),
                                merged_content_sha256=sha256_file(MERGED_DIR / "content.json"))
        stage.finish(metrics, log={f"{gguf_type}.{key}": entry[key] for gguf_type, entry in metrics["files"].items()
                                   for key in ("validation_loss", "loss_gap", "bytes", "bits_per_weight")})
        stage.tracker.log_artifact(GGUF_DIR / PROVENANCE_FILE)
    for gguf_type, entry in metrics["files"].items():
        mix = ", ".join(f"{name} {part['tensors']}" for name, part in entry["types"].items())
        print(f"quantize: {entry['file']}: {entry['bytes'] / 2**20:.0f} MiB ({entry['bits_per_weight']} bits/weight; "
              f"tensors {mix}), validation loss in llama.cpp {entry['validation_loss']:.4f} "
              f"(merged {metrics['merged_validation_loss']:.4f}, gap {entry['loss_gap']:+.4f})")
    greedy = metrics.get("greedy")
    if greedy:
        print(f"quantize: greedy answers, f16 in llama.cpp vs merged: {greedy['same_text']} of {greedy['prompts']} "
              f"the same; stopped at the end-of-turn token where merged did: {greedy['stopped_where_merged_stopped']} "
              f"of {greedy['merged_stopped']}")


if __name__ == "__main__":
    run_stage(main)
