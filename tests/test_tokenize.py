"""Stage `tokenize`: chat-rendered token ids, labels on exactly the assistant's turns (end-of-turn
marker included), truncation and dropping, and the parquet splits with their stats."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from ftpipe.errors import PipelineError
from ftpipe.io import read_json, sha256_text
from ftpipe.modeling import IGNORE_INDEX, render_chat
from ftpipe.params import TokenizeParams
from ftpipe.paths import SPLITS
from stages.tokenize import TOKENIZER_FILES, load_tokenized, tokenize_example, tokenize_splits

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"

PARAMS = TokenizeParams(max_seq_length=1024, truncation="truncate", assistant_only_loss=True)
END = "<|im_end|>\n"
ANSWER = "Yes: 42 °C.\nThat is 107.6 °F, not 108."
LONG_ANSWER = " ".join(f"word{i}" for i in range(100))


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def labelled_runs(result: dict) -> list[list[int]]:
    """The labelled tokens, as runs of consecutive positions."""
    runs, previous = [], None
    for position, label in enumerate(result["labels"]):
        if label == IGNORE_INDEX:
            continue
        assert label == result["input_ids"][position]   # a label is the token itself (shifted by the model)
        if previous != position - 1:
            runs.append([])
        runs[-1].append(label)
        previous = position
    return runs


def test_single_turn_labels_exactly_the_answer(smollm2_tokenizer):
    messages = chat(("user", "How warm is it?"), ("assistant", ANSWER))
    result = tokenize_example(smollm2_tokenizer, messages, PARAMS)
    assert smollm2_tokenizer.decode(result["input_ids"]) == render_chat(smollm2_tokenizer, messages)
    assert result["truncated"] is False
    (run,) = labelled_runs(result)
    assert smollm2_tokenizer.decode(run) == ANSWER + END
    prompt = smollm2_tokenizer.decode(result["input_ids"][:len(result["input_ids"]) - len(run)])
    assert prompt == render_chat(smollm2_tokenizer, messages[:1], add_generation_prompt=True)
    assert "You are a helpful AI assistant" in prompt   # the template's default system prompt, not labelled


def test_multi_turn_labels_both_answers_and_nothing_else(smollm2_tokenizer):
    messages = chat(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello there."),
                    ("user", "How warm is it?"), ("assistant", ANSWER))
    result = tokenize_example(smollm2_tokenizer, messages, PARAMS)
    runs = labelled_runs(result)
    assert [smollm2_tokenizer.decode(run) for run in runs] == ["Hello there." + END, ANSWER + END]
    unlabelled = [token for token, label in zip(result["input_ids"], result["labels"]) if label == IGNORE_INDEX]
    assert smollm2_tokenizer.decode(unlabelled) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nHow warm is it?<|im_end|>\n<|im_start|>assistant\n")


def test_without_assistant_only_loss_every_token_is_a_label(smollm2_tokenizer):
    params = TokenizeParams(max_seq_length=256, truncation="truncate", assistant_only_loss=False)
    result = tokenize_example(smollm2_tokenizer, chat(("user", "Hi?"), ("assistant", ANSWER)), params)
    assert result["labels"] == result["input_ids"] and len(result["input_ids"]) > 20


def test_truncate_cuts_to_max_seq_length(smollm2_tokenizer):
    messages = chat(("system", "S"), ("user", "Q?"), ("assistant", LONG_ANSWER))
    full = tokenize_example(smollm2_tokenizer, messages, PARAMS)
    assert 300 < len(full["input_ids"]) < 1024 and full["truncated"] is False
    params = TokenizeParams(max_seq_length=32, truncation="truncate", assistant_only_loss=True)
    result = tokenize_example(smollm2_tokenizer, messages, params)
    assert result["truncated"] is True
    assert result["input_ids"] == full["input_ids"][:32] and result["labels"] == full["labels"][:32]
    (run,) = labelled_runs(result)
    assert 0 < len(run) < 32 and LONG_ANSWER.startswith(smollm2_tokenizer.decode(run))


def test_drop_drops_a_too_long_example(smollm2_tokenizer):
    messages = chat(("system", "S"), ("user", "Q?"), ("assistant", LONG_ANSWER))
    full_length = len(tokenize_example(smollm2_tokenizer, messages, PARAMS)["input_ids"])
    params = TokenizeParams(max_seq_length=32, truncation="drop", assistant_only_loss=True)
    assert tokenize_example(smollm2_tokenizer, messages, params) == {"dropped": "too_long", "length": full_length}


def test_an_answer_cut_off_entirely_is_dropped(smollm2_tokenizer):
    messages = chat(("user", LONG_ANSWER), ("assistant", ANSWER))
    params = TokenizeParams(max_seq_length=32, truncation="truncate", assistant_only_loss=True)
    assert tokenize_example(smollm2_tokenizer, messages, params) == {"dropped": "no_loss_tokens", "length": 32}


def test_a_template_that_is_not_prefix_stable_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.chat_template = ("{{ messages | length }} turns\n"   # the count changes as turns are added
                               "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(PipelineError, match="cannot be located.*assistant_only_loss: false"):
        tokenize_example(tokenizer, chat(("user", "Hi?"), ("assistant", ANSWER)), PARAMS)


def clean_row(row_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": row_id, "source": "unit", "messages": chat(*turns)}


SPLIT_ROWS = {
    "train": [clean_row(f"tr{i}", ("user", f"Question {i}?"), ("assistant", f"Answer {i}: {ANSWER}"))
              for i in range(3)]
    + [clean_row("tr-long-answer", ("system", "S"), ("user", "Q?"), ("assistant", LONG_ANSWER)),
       clean_row("tr-long-prompt", ("user", LONG_ANSWER), ("assistant", ANSWER))],
    "validation": [clean_row("va0", ("user", "Hi?"), ("assistant", ANSWER)),
                   clean_row("va1", ("user", "Hi?"), ("assistant", "Hello."), ("user", "More?"),
                             ("assistant", ANSWER))],
    "test": [clean_row("te0", ("user", "Hey?"), ("assistant", ANSWER))],
}


def write_clean(folder: Path, splits: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


@pytest.mark.parametrize("truncation, kept_train, truncated, dropped", [
    ("truncate", ["tr0", "tr1", "tr2", "tr-long-answer"], 1, {"no_loss_tokens": 1}),
    ("drop", ["tr0", "tr1", "tr2"], 0, {"too_long": 2}),
])
def test_tokenize_splits_writes_parquet_and_matching_stats(smollm2_tokenizer, tmp_path, truncation, kept_train,
                                                           truncated, dropped):
    params = TokenizeParams(max_seq_length=96, truncation=truncation, assistant_only_loss=True)
    out_dir = tmp_path / "tokenized"
    out_dir.mkdir()
    stats = tokenize_splits(write_clean(tmp_path / "clean", SPLIT_ROWS), smollm2_tokenizer, params, out_dir)

    assert sorted(path.name for path in out_dir.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]
    assert set(stats) == set(SPLITS)
    kept = {"train": kept_train, "validation": ["va0", "va1"], "test": ["te0"]}
    for split in SPLITS:
        rows = load_tokenized(split, out_dir)
        assert [row["id"] for row in rows] == kept[split]
        by_id = {row["id"]: row for row in SPLIT_ROWS[split]}
        for row in rows:
            expected = tokenize_example(smollm2_tokenizer, by_id[row["id"]]["messages"], params)
            assert (row["input_ids"], row["labels"]) == (expected["input_ids"], expected["labels"])
        lengths = [len(row["input_ids"]) for row in rows]
        assert stats[split]["examples"] == len(rows)
        assert stats[split]["tokens"] == sum(lengths)
        assert stats[split]["max_length"] == max(lengths) <= 96
        assert stats[split]["mean_length"] == round(sum(lengths) / len(lengths), 1)
        assert stats[split]["loss_tokens"] == sum(sum(label != IGNORE_INDEX for label in row["labels"][1:])
                                                  for row in rows) > 0
    assert (stats["train"]["truncated"], stats["train"]["dropped"]) == (truncated, dropped)
    assert stats["validation"]["dropped"] == stats["test"]["dropped"] == {}


def test_every_training_example_dropped_is_an_error(smollm2_tokenizer, tmp_path):
    splits = {"train": SPLIT_ROWS["train"][3:], "validation": SPLIT_ROWS["validation"], "test": SPLIT_ROWS["test"]}
    params = TokenizeParams(max_seq_length=96, truncation="drop", assistant_only_loss=True)
    with pytest.raises(PipelineError, match=r"every training example was dropped \(\{'too_long': 2\}\)"):
        tokenize_splits(write_clean(tmp_path / "clean", splits), smollm2_tokenizer, params, tmp_path)


def test_load_tokenized_names_the_stage_to_run(tmp_path):
    with pytest.raises(PipelineError, match=r"validation\.parquet: not found\. Run `dvc repro tokenize`"):
        load_tokenized("validation", tmp_path)


def test_stage_writes_splits_stats_metrics_and_provenance(in_tmp_project, tiny_base):
    from stages.tokenize import main

    params = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    params["tokenize"] = {"max_seq_length": 96, "truncation": "truncate", "assistant_only_loss": True}
    (in_tmp_project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    shutil.copytree(tiny_base, in_tmp_project / "models" / "base")
    write_clean(in_tmp_project / "data" / "clean", SPLIT_ROWS)
    main()

    out_dir = in_tmp_project / "data" / "tokenized"
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "provenance.json", "stats.json", "test.parquet", "train.parquet", "validation.parquet"]
    stats = read_json(out_dir / "stats.json")
    assert [row["id"] for row in load_tokenized("train", out_dir)] == ["tr0", "tr1", "tr2", "tr-long-answer"]
    assert (stats["train"]["truncated"], stats["train"]["dropped"]) == (1, {"no_loss_tokens": 1})
    provenance = read_json(out_dir / "provenance.json")
    assert provenance["params"] == {f"tokenize.{key}": value for key, value in params["tokenize"].items()}
    assert provenance["tokenizer_files_sha256"] == {
        name: hashlib.sha256((tiny_base / name).read_bytes()).hexdigest() for name in TOKENIZER_FILES}
    assert provenance["chat_template_sha256"] == sha256_text((tiny_base / "chat_template.jinja").read_text())
    metrics = read_json(in_tmp_project / "metrics" / "tokenize.json")
    assert metrics == {f"{split}.{key}": value for split, s in stats.items() for key, value in s.items()
                       if key != "dropped"}
