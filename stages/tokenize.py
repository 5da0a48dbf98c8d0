"""Stage `tokenize`: apply the base model's tokenizer and chat template to the clean splits.

    python -m stages.tokenize

Writes data/tokenized/<split>.parquet with input_ids and labels per example (labels are
-100 outside the assistant's turns when tokenize.assistant_only_loss is on), and
stats.json: examples, tokens, loss tokens, truncated and dropped counts per split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.errors import PipelineError, run_stage
from ftpipe.io import atomic_dir, file_hashes, read_jsonl, sha256_text, write_json
from ftpipe.modeling import IGNORE_INDEX, load_tokenizer, render_chat
from ftpipe.params import Params, TokenizeParams, flatten, load_params
from ftpipe.paths import BASE_DIR, CLEAN_DIR, PROVENANCE_FILE, SPLITS, TOKENIZED_DIR, metrics_file
from ftpipe.provenance import stage_record
from ftpipe.tracking import stage_run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def assistant_spans(tokenizer, messages: list[dict], full_text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in the rendered conversation.

    Each span runs from the end of the prompt rendered with the generation prompt up to the end
    of the conversation rendered through that turn, so it includes the end-of-turn marker: the
    model learns to stop."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[:index + 1])
        if not (full_text.startswith(through) and through.startswith(before)):
            raise PipelineError(
                "the base model's chat template renders a conversation differently from its prefixes, so the "
                "assistant's tokens cannot be located. Use a template whose rendering of the first k turns is "
                "a prefix of the whole, or set tokenize.assistant_only_loss: false."
            )
        spans.append((len(before), len(through)))
    return spans


def tokenize_example(tokenizer, messages: list[dict], params: TokenizeParams) -> dict[str, Any] | None:
    """Token ids and labels of one conversation; None when it must be dropped (reason in 'dropped')."""
    text = render_chat(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if params.assistant_only_loss:
        spans = assistant_spans(tokenizer, messages, text)
        labels = [token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
                  for token, (begin, _) in zip(input_ids, offsets)]
    else:
        labels = list(input_ids)
    truncated = len(input_ids) > params.max_seq_length
    if truncated:
        if params.truncation == "drop":
            return {"dropped": "too_long", "length": len(input_ids)}
        input_ids, labels = input_ids[:params.max_seq_length], labels[:params.max_seq_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):   # position 0 is never predicted
        return {"dropped": "no_loss_tokens", "length": len(input_ids)}
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def tokenize_splits(clean_dir: Path, tokenizer, params: TokenizeParams, out_dir: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats: dict[str, Any] = {}
    for split in SPLITS:
        rows, dropped, truncated, lengths = [], {}, 0, []
        for example in read_jsonl(clean_dir / f"{split}.jsonl"):
            result = tokenize_example(tokenizer, example["messages"], params)
            if "dropped" in result:
                dropped[result["dropped"]] = dropped.get(result["dropped"], 0) + 1
                continue
            truncated += result["truncated"]
            lengths.append(len(result["input_ids"]))
            rows.append({"id": example["id"], "input_ids": result["input_ids"], "labels": result["labels"]})
        if split == "train" and not rows:
            raise PipelineError(f"tokenize: every training example was dropped ({dropped}); "
                                f"raise tokenize.max_seq_length or set tokenize.truncation: truncate")
        table = pa.table({"id": [r["id"] for r in rows], "input_ids": [r["input_ids"] for r in rows],
                          "labels": [r["labels"] for r in rows]})
        pq.write_table(table, out_dir / f"{split}.parquet")
        stats[split] = {
            "examples": len(rows), "dropped": dropped, "truncated": truncated,
            "tokens": sum(lengths),
            "loss_tokens": sum(sum(1 for label in r["labels"][1:] if label != IGNORE_INDEX) for r in rows),
            "max_length": max(lengths, default=0),
            "mean_length": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
        }
    return stats


def load_tokenized(split: str, folder: Path = TOKENIZED_DIR) -> list[dict]:
    """The rows of one tokenized split, as written by this stage."""
    import pyarrow.parquet as pq

    path = Path(folder) / f"{split}.parquet"
    if not path.exists():
        raise PipelineError(f"{path}: not found. Run `dvc repro tokenize` first.")
    return pq.read_table(path).to_pylist()


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.tokenize, "tokenize")


def main() -> None:
    params = load_params()
    stage_params = tracked_params(params)
    with stage_run("tokenize", stage_params) as tracker:
        tokenizer = load_tokenizer(BASE_DIR)
        with atomic_dir(TOKENIZED_DIR) as out_dir:
            stats = tokenize_splits(CLEAN_DIR, tokenizer, params.tokenize, out_dir)
            write_json(out_dir / "stats.json", stats)
            tokenizer_hashes = {k: v for k, v in file_hashes(BASE_DIR).items() if k in TOKENIZER_FILES}
            write_json(out_dir / PROVENANCE_FILE, stage_record(
                "tokenize", stage_params, tokenizer_files_sha256=tokenizer_hashes,
                chat_template_sha256=sha256_text(tokenizer.chat_template or "")))
        metrics = {f"{split}.{key}": value for split, s in stats.items()
                   for key, value in s.items() if isinstance(value, (int, float))}
        write_json(metrics_file("tokenize"), metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(TOKENIZED_DIR / "stats.json")
    for split, s in stats.items():
        print(f"tokenize: {split}: {s['examples']} examples, {s['tokens']} tokens "
              f"(max {s['max_length']}), truncated {s['truncated']}, dropped {s['dropped']}")


if __name__ == "__main__":
    run_stage(main)
