"""Stage `tokenize`: apply the base model's tokenizer and the chosen chat template to the clean splits.

    python -m stages.tokenize

The chat template: the base model's own (tokenize.chat_template: null), a built-in one (ftpipe/chat_templates/)
or a .jinja file, with tokenize.chat_template_kwargs and tokenize.system_prompt written into it
(ftpipe/data/chat_template.py). It is saved as data/tokenized/chat_template.jinja: evaluate renders its prompts
with it and the merged model carries it into every GGUF. What was chosen (name, source, SHA-256, kwargs, system
prompt) is in provenance.json and metrics/tokenize.json.

Writes data/tokenized/<split>.parquet with input_ids and labels per example (labels are
-100 outside the assistant's turns when tokenize.assistant_only_loss is on). With
tokenize.packing, train.parquet instead holds packed rows of at most tokenize.max_seq_length
tokens: `ids` (the examples in the row), input_ids, labels and position_ids that restart at 0 for
each example; validation and test always stay one example per row. stats.json: examples,
tokens, loss tokens, truncated and dropped counts, assistant turns left unlabelled (earlier turns a template
writes differently in the history, e.g. Qwen3's; ftpipe/data/chat_tokens.py) per split, and for train the share
of padding with and without packing and the number of packed rows (reported whether packing is on or off).
metrics/plots/token_lengths.{csv,png}: the histogram of tokens per example in each split (the CSV
has one row per length bin, one column per split).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import (
    atomic_write_bytes,
    atomic_write_text,
    file_hashes,
    read_json,
    read_jsonl,
    sha256_text,
    write_json,
)
from ftpipe.core.params import Params, TokenizeParams, flatten
from ftpipe.core.paths import BASE_DIR, CLEAN_DIR, PLOTS_DIR, SPLITS, TOKENIZED_DIR
from ftpipe.core.stage import Stage
from ftpipe.data.chat_template import BUILTIN_DIR, TEMPLATE_FILE, apply_chat_template_to, resolve_chat_template
from ftpipe.data.chat_tokens import tokenize_batch
from ftpipe.data.length_plots import HISTOGRAM_BINS, histogram_csv, histogram_png
from ftpipe.data.packing import pack_examples, packed_rows, padding_stats
from ftpipe.data.parquet_rows import write_rows
from ftpipe.evaluation.canaries import make_canaries, plant
from ftpipe.model.modeling import IGNORE_INDEX, chunks, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")   # config.json names
# Conversations rendered and tokenized per tokenizer call. The fast tokenizer encodes a batch on all
# cores (tokenizer_threads); measured on 2 cores, batches of 1,000 are as fast as 4,000 (9,000 are
# slower) and keep memory flat.
ENCODE_BATCH = 1000
TOKEN_LENGTHS_CSV = PLOTS_DIR / "token_lengths.csv"
TOKEN_LENGTHS_PNG = PLOTS_DIR / "token_lengths.png"


def split_stats(examples: list[dict], dropped: dict[str, int], truncated: int,
                unlabelled_turns: int = 0) -> dict[str, Any]:
    """A split's figures in stats.json: examples, dropped and truncated counts, tokens, loss tokens and the
    assistant turns left unlabelled."""
    import numpy as np

    lengths = [len(example["input_ids"]) for example in examples]
    return {
        "examples": len(examples), "dropped": dropped, "truncated": truncated,
        "unlabelled_assistant_turns": unlabelled_turns,
        "tokens": int(sum(lengths)),
        "loss_tokens": int(sum(np.count_nonzero(example["labels"][1:] != IGNORE_INDEX) for example in examples)),
        "max_length": max(lengths, default=0),
        "mean_length": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
    }


def check_context_length(base_dir: Path, max_seq_length: int) -> int | None:
    """The base model's context length from its config.json (None if it states none); an error naming both
    numbers if tokenize.max_seq_length exceeds it: positions beyond it were never trained, and some
    models fail outright on them."""
    config = read_json(Path(base_dir) / "config.json")
    config = config.get("text_config", config)   # multimodal configs nest the language model's
    context = next((config[key] for key in CONTEXT_KEYS if isinstance(config.get(key), int)), None)
    if context is not None and max_seq_length > context:
        raise PipelineError(f"params.yaml tokenize.max_seq_length is {max_seq_length}, but the base model's context "
                            f"length is {context} ({Path(base_dir) / 'config.json'}). Set tokenize.max_seq_length to "
                            f"at most {context}.")
    return context


def tokenize_splits(clean_dir: Path, tokenizer, params: TokenizeParams, out_dir: Path,
                    canaries: list[dict] = ()) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Write <split>.parquet for every split into `out_dir`; return (stats, tokens per example per split).
    `canaries` (audit.canaries, ftpipe/evaluation/canaries.py) are planted into the train split."""
    stats: dict[str, Any] = {}
    lengths: dict[str, list[int]] = {}
    for split in SPLITS:
        examples, dropped, truncated, unlabelled = [], {}, 0, 0
        rows = read_jsonl(clean_dir / f"{split}.jsonl")
        if split == "train" and canaries:
            rows = plant(rows, canaries)
        for batch in chunks(rows, ENCODE_BATCH):
            results = tokenize_batch(tokenizer, [example["messages"] for example in batch], params)
            for example, result in zip(batch, results):
                if "dropped" in result:
                    dropped[result["dropped"]] = dropped.get(result["dropped"], 0) + 1
                    continue
                truncated += result["truncated"]
                unlabelled += result["unlabelled_turns"]
                examples.append({"id": example["id"], "input_ids": result["input_ids"], "labels": result["labels"]})
        if split == "train" and not examples:
            raise PipelineError(f"tokenize: every training example was dropped ({dropped}); "
                                f"raise tokenize.max_seq_length or set tokenize.truncation: truncate")
        stats[split] = split_stats(examples, dropped, truncated, unlabelled)
        if split == "train":
            stats[split]["canary_rows"] = sum(canary["repeats"] for canary in canaries)
        lengths[split] = [len(example["input_ids"]) for example in examples]
        columns = {key: [example[key] for example in examples] for key in ("id", "input_ids", "labels")}
        if split == "train":   # the padding shares are reported with packing on or off: they tell whether to pack
            bins = pack_examples(lengths[split], columns["id"], params.max_seq_length)
            stats[split].update(padding_stats(stats[split]["tokens"], len(examples), len(bins),
                                              params.max_seq_length))
            if params.packing:
                columns = packed_rows(examples, bins)
        write_rows(out_dir / f"{split}.parquet", columns)
    return stats, lengths


def length_histogram(lengths: dict[str, list[int]], max_seq_length: int) -> list[dict[str, int]]:
    """Rows {tokens, <split>: examples, ...}, one per HISTOGRAM_BINS bin from 0 to max_seq_length (the
    last bin includes max_seq_length itself); `tokens` is the bin's lower edge. One column per split:
    a DVC plot takes one y column per file, and a row per bin keeps every split's count of it together."""
    import numpy as np

    edges = np.linspace(0, max_seq_length, HISTOGRAM_BINS + 1).round().astype(int)
    counts = {split: np.histogram(values, bins=edges)[0] for split, values in lengths.items()}
    return [{"tokens": int(edge), **{split: int(counts[split][index]) for split in lengths}}
            for index, edge in enumerate(edges[:-1])]


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return {**flatten(params.tokenize, "tokenize"), **flatten(params.audit.canaries, "audit.canaries")}


def planted_canaries(params: Params) -> list[dict]:
    canaries = params.audit.canaries
    return make_canaries(canaries.seed, canaries.repeats, canaries.digits) if canaries.enabled else []


@contextlib.contextmanager
def tokenizer_threads() -> Iterator[None]:
    """Let the fast tokenizer encode a batch on every core, then restore the setting.

    ftpipe sets TOKENIZERS_PARALLELISM=false for every stage (threads and fork() do not mix); while
    it encodes, this stage forks nothing, and two cores encode a batch 1.6-1.9x faster than one."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def chat_template_facts(chosen: dict[str, Any]) -> dict[str, Any]:
    """What was chosen, for provenance.json: everything resolve_chat_template says but the text (saved beside)."""
    return {key: value for key, value in chosen.items() if key != "text"}


def untracked_template_note(chosen: dict[str, Any]) -> str | None:
    """A note when the template is a file DVC does not see (dvc.yaml tracks ftpipe/chat_templates/ only)."""
    if chosen["source"] != "file" or Path(chosen["name"]).resolve().is_relative_to(BUILTIN_DIR):
        return None
    return (f"note: DVC does not track the content of {chosen['name']} (only its name, tokenize.chat_template); "
            f"after editing it, run `dvc repro -f tokenize`.")


def main() -> None:
    stage = Stage("tokenize", tracked_params)
    params = stage.params.tokenize
    check_context_length(BASE_DIR, params.max_seq_length)   # before the MLflow run and any output
    chosen = resolve_chat_template(params, BASE_DIR)         # likewise: a missing template fails here
    note = untracked_template_note(chosen)
    if note:
        print(note)
    with stage:
        tokenizer = apply_chat_template_to(load_tokenizer(BASE_DIR), chosen["text"])
        with stage.output() as out_dir:
            with tokenizer_threads():
                stats, lengths = tokenize_splits(CLEAN_DIR, tokenizer, params, out_dir, planted_canaries(stage.params))
            write_json(out_dir / "stats.json", stats)
            atomic_write_text(out_dir / TEMPLATE_FILE, chosen["text"])
            stage.record.update(
                tokenizer_files_sha256={k: v for k, v in file_hashes(BASE_DIR).items() if k in TOKENIZER_FILES},
                chat_template=chat_template_facts(chosen), chat_template_sha256=sha256_text(chosen["text"]))
        metrics = {f"{split}.{key}": value for split, s in stats.items()
                   for key, value in s.items() if isinstance(value, (int, float))}
        metrics.update({"chat_template.source": chosen["source"], "chat_template.name": chosen["name"],
                        "chat_template.sha256": chosen["sha256"]})
        atomic_write_text(TOKEN_LENGTHS_CSV, histogram_csv(length_histogram(lengths, params.max_seq_length)))
        atomic_write_bytes(TOKEN_LENGTHS_PNG, histogram_png(lengths, params.max_seq_length))
        stage.finish(metrics)
        stage.tracker.set_tags({"chat_template": f"{chosen['source']}: {chosen['name']}",
                                "chat_template_sha256": chosen["sha256"]})
        stage.tracker.log_artifact(TOKENIZED_DIR / "stats.json")
        stage.tracker.log_artifact(TOKENIZED_DIR / TEMPLATE_FILE)
        stage.tracker.log_artifact(TOKEN_LENGTHS_PNG)
        for split in stats:
            stage.tracker.log_input(CLEAN_DIR / f"{split}.jsonl", f"clean/{split}", "source")
            stage.tracker.log_input(TOKENIZED_DIR / f"{split}.parquet", f"tokenized/{split}", split)
    baked = [f"variables {sorted(chosen['kwargs'])}"] if chosen["kwargs"] else []
    baked += ["a system prompt"] if chosen["system_prompt"] is not None else []
    print(f"tokenize: chat template {chosen['name']} ({chosen['source']}"
          f"{', with ' + ' and '.join(baked) + ' written in' if baked else ''}), saved as "
          f"{TOKENIZED_DIR / TEMPLATE_FILE}")
    for split, s in stats.items():
        print(f"tokenize: {split}: {s['examples']} examples, {s['tokens']} tokens "
              f"(max {s['max_length']}), truncated {s['truncated']}, dropped {s['dropped']}")
    unlabelled = sum(s["unlabelled_assistant_turns"] for s in stats.values())
    if unlabelled:
        print(f"tokenize: {unlabelled} earlier assistant turns are context, not targets: the chat template writes "
              f"them differently in the history than the model generates them (e.g. Qwen3 drops their think "
              f"block); each conversation's last answer is labelled")
    train = stats["train"]
    print(f"tokenize: train padding at max_seq_length {params.max_seq_length}: "
          f"{train['padding_share_unpacked']:.1%} one example per row, "
          f"{train['padding_share_packed']:.1%} packed into {train['packed_rows']} rows"
          f" ({'written packed' if params.packing else 'tokenize.packing is off: written unpacked'})")


if __name__ == "__main__":
    run_stage(main)
