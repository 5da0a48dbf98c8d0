"""The architectures users fine-tune most, each as a tiny random model of its family (its config class, its kind
of tokenizer, its real chat template and end-of-turn tokens: tests/families/families.py), through every stage (on
the CPU here and in CI; bench/gpu_families.py runs the same suite on a GPU per training backend,
FTPIPE_FAMILIES_BACKEND, measured in bench/results/gpu_families.json): the architecture check the train stage runs
first, tokenize (assistant-only labels exactly the answer and the family's end-of-turn marker), QLoRA training,
evaluation (generation stops at every end-of-sequence id of the generation config), merge (parity with the
adapter), and quantize (f16 and q8_0 GGUFs checked in llama.cpp: tokenizer, chat template, stop token, loss gap).

An architecture some upstream part cannot handle would be asserted to fail at the architecture check, with its
message (tests/model/test_architectures.py shows that message); all eight pass every part here."""
from __future__ import annotations

import pytest

from ftpipe.model.modeling import IGNORE_INDEX
from tests.families.conftest import EVALUATE, FAMILY_TRAIN, QUANTIZE, SPLIT_ROWS, conversation
from tests.families.families import FAMILIES, gguf_string_arrays

pytestmark = pytest.mark.parametrize("family", list(FAMILIES))


def test_the_architecture_check_passes_every_part(run, family):
    report = run.get("preflight")
    expected = FAMILIES[family]
    assert (report.architecture, report.model_type) == (expected.architecture, expected.model_type)
    assert report.gguf_arch == expected.gguf_arch
    assert [part.part for part in report.parts] == ["llama.cpp's GGUF converter", "llama.cpp's runtime",
                                                    "llama.cpp's tokenizer", "Unsloth"]
    # the tokenizer part: the family's vocabulary, converted alone, splits the probe texts and a chat in the family's
    # template in llama.cpp as in transformers
    assert all(part.supported for part in report.parts), report.lines()


def labelled_runs(labels) -> list[tuple[int, int]]:
    """(start, end) of each run of labelled positions."""
    runs, start = [], None
    for index, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, index))
            start = None
    return runs


def test_tokenize_labels_exactly_each_answer_and_its_end_of_turn_marker(run, family):
    from ftpipe.data.tokenized import load_tokenized
    from ftpipe.model.modeling import load_tokenizer

    expected = FAMILIES[family]
    _, tokenized_dir = run.get("tokenize")
    assert all(stats["truncated"] == 0 and not stats["dropped"] for stats in run.tokenize_stats.values())
    tokenizer = load_tokenizer(run.get("base"))
    rows = {row["id"]: row for split in SPLIT_ROWS for row in load_tokenized(split, tokenized_dir)}
    checked_turns = 0
    for n in [n for rows_ in SPLIT_ROWS.values() for n in rows_]:
        row_id, messages = conversation(n)
        row = rows[row_id]   # nothing dropped: every conversation has its labels
        ids, labels = list(row["input_ids"]), list(row["labels"])
        assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == \
               [i for i, label in enumerate(labels) if label != IGNORE_INDEX and label == ids[i]]
        answers = [message["content"] for message in messages if message["role"] == "assistant"]
        runs = labelled_runs(labels)
        if expected.every_turn_labelled:
            assert len(runs) == len(answers), (n, runs)
        assert 1 <= len(runs) <= len(answers)
        # the labelled runs are the last answers, in order (a template that writes earlier answers differently in
        # the history leaves those unlabelled: they are context)
        for (start, end), index in zip(runs, range(len(answers) - len(runs), len(answers))):
            # the text the labels add to the text before them (SentencePiece decoding depends on what precedes)
            text = (tokenizer.decode(ids[:end], skip_special_tokens=False)
                    [len(tokenizer.decode(ids[:start], skip_special_tokens=False)):])
            assert text == expected.assistant_labels(answers[index], index == len(answers) - 1), (n, index)
            checked_turns += 1
    assert checked_turns >= sum(len(rows_) for rows_ in SPLIT_ROWS.values())


def test_qlora_training_runs_on_the_chosen_backend(run, family):
    result = run.get("train")
    metrics = result["metrics"]
    assert metrics["backend"] == FAMILY_TRAIN.backend and metrics["steps"] == 2
    assert all(row["loss"] > 0 for row in result["curve"])
    assert metrics["trainable_parameters"] > 0 and metrics["lora_target_modules"]


def test_evaluation_compares_base_and_tuned(run, family):
    metrics, samples = run.get("evaluate")
    assert metrics["examples"] == EVALUATE.max_examples and len(samples) == EVALUATE.max_examples
    for name in ("base", "tuned"):
        assert metrics[name]["loss"] > 0 and 0 <= metrics[name]["rougeL"] <= 1


def test_generation_stops_at_every_end_of_sequence_id_of_the_generation_config(run, family):
    """The evaluate stage's generation, forced to answer word, end-of-sequence id, word...: it must end at each id
    the generation config lists (Gemma's <end_of_turn>, Llama 3's <|eom_id|> and <|eot_id|>, ...), not only at
    the tokenizer's end-of-sequence token."""
    from ftpipe.model.modeling import generate, load_model, load_tokenizer, render_chats

    run.get("tokenize")
    base = run.get("base")
    tokenizer, model = load_tokenizer(base), load_model(base, "float32")
    configured = model.generation_config.eos_token_id
    eos_ids = configured if isinstance(configured, list) else [configured]
    assert tokenizer.convert_ids_to_tokens(eos_ids) == list(FAMILIES[family].generation_eos)
    word, other = (tokenizer.encode(text, add_special_tokens=False)[0] for text in ("Hello", " world"))
    prompt = render_chats(tokenizer, [[{"role": "user", "content": "Say hello."}]], add_generation_prompt=True)
    for eos in eos_ids:
        forced = iter([word, eos])
        calls = []

        def force(module, args, output, forced=forced, calls=calls):
            calls.append(1)
            token = next(forced, other)   # one call per generated token (the prompt's call makes the first)
            output.logits[:, -1, :] = -1e9
            output.logits[:, -1, token] = 0.0
            return output

        handle = model.register_forward_hook(force)
        try:
            answers, _ = generate(model, tokenizer, prompt, max_new_tokens=6, batch_size=1, desc="forced")
        finally:
            handle.remove()
        assert answers == [tokenizer.decode([word]).strip()], (tokenizer.convert_ids_to_tokens(eos), answers)
        assert len(calls) == 2   # stopped right after the end-of-sequence id


def test_the_merged_model_matches_the_adapter(run, family):
    merged, metrics = run.get("merge")
    assert metrics["gap_vs_adapter"] <= 0.01
    assert (merged / "config.json").exists()


def test_quantize_writes_f16_and_q8_0_and_each_passes_the_llama_cpp_checks(run, family):
    out_dir, metrics = run.get("quantize")
    expected = FAMILIES[family]
    assert sorted(path.name for path in out_dir.iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert metrics["end_of_turn_tokens"] == list(expected.generation_eos)
    for gguf_type, entry in metrics["files"].items():
        path = out_dir / entry["file"]
        assert gguf_string_arrays(path, ("general.architecture",))["general.architecture"] == expected.gguf_arch
        assert entry["tokenizer_mismatches"] == 0 and entry["chat_prompt_mismatches"] == 0
        assert entry["chat_prompts_compared"] >= len(SPLIT_ROWS["validation"])
        assert entry["stop_token_problems"] == []
        assert abs(entry["loss_gap"]) <= QUANTIZE.max_loss_gap[gguf_type]
    assert {"F16", "F32"} >= set(metrics["files"]["f16"]["types"]) and "Q8_0" in metrics["files"]["q8_0"]["types"]
    greedy = metrics["greedy"]   # compared, and stopped wherever the merged model stopped (min_greedy_agreement 0)
    assert greedy["prompts"] == QUANTIZE.greedy_prompts
    assert greedy["stopped_where_merged_stopped"] == greedy["merged_stopped"]
