"""Stage `tokenize`: the clean splits tokenized into parquet with matching stats, truncation and dropping
counted, the train split packed into rows of whole examples, the token-length histogram, the stage's
outputs and provenance, and the base model's context length. How one conversation is tokenized is tested
in tests/data/test_chat_tokens.py, the packing itself in tests/data/test_packing.py."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, sha256_text
from ftpipe.core.params import TokenizeParams
from ftpipe.core.paths import SPLITS
from ftpipe.data.chat_tokens import tokenize_example
from ftpipe.data.tokenized import load_tokenized
from ftpipe.model.modeling import IGNORE_INDEX
from stages.tokenize import TOKENIZER_FILES, length_histogram, tokenize_splits

PARAMS_YAML = Path(__file__).resolve().parents[2] / "params.yaml"

ANSWER = "Yes: 42 °C.\nThat is 107.6 °F, not 108."
LONG_ANSWER = " ".join(f"word{i}" for i in range(100))


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


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
    params = TokenizeParams(max_seq_length=96, truncation=truncation, assistant_only_loss=True, packing=False,
                            chat_template=None, chat_template_kwargs={}, system_prompt=None)
    out_dir = tmp_path / "tokenized"
    out_dir.mkdir()
    stats, lengths = tokenize_splits(write_clean(tmp_path / "clean", SPLIT_ROWS), smollm2_tokenizer, params, out_dir)

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
        assert lengths[split] == [len(row["input_ids"]) for row in rows]
        assert stats[split]["examples"] == len(rows)
        assert stats[split]["tokens"] == sum(lengths[split])
        assert stats[split]["max_length"] == max(lengths[split]) <= 96
        assert stats[split]["mean_length"] == round(sum(lengths[split]) / len(rows), 1)
        assert stats[split]["loss_tokens"] == sum(sum(label != IGNORE_INDEX for label in row["labels"][1:])
                                                  for row in rows) > 0
    assert (stats["train"]["truncated"], stats["train"]["dropped"]) == (truncated, dropped)
    assert stats["validation"]["dropped"] == stats["test"]["dropped"] == {}


def test_every_training_example_dropped_is_an_error(smollm2_tokenizer, tmp_path):
    splits = {"train": SPLIT_ROWS["train"][3:], "validation": SPLIT_ROWS["validation"], "test": SPLIT_ROWS["test"]}
    params = TokenizeParams(max_seq_length=96, truncation="drop", assistant_only_loss=True, packing=False,
                            chat_template=None, chat_template_kwargs={}, system_prompt=None)
    with pytest.raises(PipelineError, match=r"every training example was dropped \(\{'too_long': 2\}\)"):
        tokenize_splits(write_clean(tmp_path / "clean", splits), smollm2_tokenizer, params, tmp_path)


def test_load_tokenized_names_the_stage_to_run(tmp_path):
    with pytest.raises(PipelineError, match=r"validation\.parquet: not found\. Run `dvc repro tokenize`"):
        load_tokenized("validation", tmp_path)



PACK_ROWS = {
    "train": [clean_row(f"p{i}", ("user", f"Question {i}?"), ("assistant", " ".join(f"w{j}" for j in range(6 * i))))
              for i in range(8)]
    + [clean_row("p-multi", ("user", "Hi?"), ("assistant", "Hello."), ("user", "More?"), ("assistant", ANSWER))],
    "validation": SPLIT_ROWS["validation"],
    "test": SPLIT_ROWS["test"],
}


def segments(row: dict) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row: where its position ids restart at 0."""
    starts = [index for index, position in enumerate(row["position_ids"]) if position == 0]
    return list(zip(starts, starts[1:] + [len(row["position_ids"])]))


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_packing_packs_train_rows_of_whole_examples(smollm2_tokenizer, tmp_path, assistant_only_loss):
    clean_dir = write_clean(tmp_path / "clean", PACK_ROWS)
    outputs = {}
    for packing in (False, True):
        params = TokenizeParams(max_seq_length=128, truncation="truncate", assistant_only_loss=assistant_only_loss,
                                packing=packing,
                                chat_template=None, chat_template_kwargs={}, system_prompt=None)
        out_dir = tmp_path / f"packing-{packing}"
        out_dir.mkdir()
        outputs[packing] = (out_dir, *tokenize_splits(clean_dir, smollm2_tokenizer, params, out_dir))
    (plain_dir, plain_stats, plain_lengths), (packed_dir, stats, lengths) = outputs[False], outputs[True]
    examples = {row["id"]: row for row in load_tokenized("train", plain_dir)}
    rows = load_tokenized("train", packed_dir)

    assert list(rows[0]) == ["ids", "input_ids", "labels", "position_ids"]
    assert sorted(example_id for row in rows for example_id in row["ids"]) == sorted(examples) and len(examples) == 9
    assert 1 < len(rows) < len(examples)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 128
        assert len(segments(row)) == len(row["ids"])
        for example_id, (start, end) in zip(row["ids"], segments(row)):
            example = examples[example_id]
            assert row["input_ids"][start:end] == example["input_ids"]
            assert row["position_ids"][start:end] == list(range(end - start))
            # The first label of every example is masked, even when every token is a label: the last
            # token of the previous example must not learn to predict it.
            assert row["labels"][start] == IGNORE_INDEX
            assert row["labels"][start + 1:end] == example["labels"][1:]
    if not assistant_only_loss:
        assert all(example["labels"] == example["input_ids"] for example in examples.values())

    for split in ("validation", "test"):   # one example per row, exactly as without packing
        assert (packed_dir / f"{split}.parquet").read_bytes() == (plain_dir / f"{split}.parquet").read_bytes()
    assert lengths == plain_lengths
    assert stats == plain_stats   # the same stats: padding shares are reported either way
    train = stats["train"]
    assert train["packed_rows"] == len(rows)
    assert train["padding_share_unpacked"] == round(1 - train["tokens"] / (len(examples) * 128), 4)
    assert train["padding_share_packed"] == round(1 - train["tokens"] / (len(rows) * 128), 4)
    assert train["padding_share_packed"] < train["padding_share_unpacked"]
    assert train["loss_tokens"] == sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
    assert "packed_rows" not in stats["validation"] and "padding_share_packed" not in stats["test"]


def test_length_histogram_counts_every_example_in_its_bin():
    rows = length_histogram({"train": [1, 3, 4, 96, 95], "validation": [50], "test": []}, max_seq_length=96)
    assert len(rows) == 32 and [row["tokens"] for row in rows] == list(range(0, 96, 3))
    assert list(rows[0]) == ["tokens", "train", "validation", "test"]
    assert [(row["tokens"], row["train"]) for row in rows if row["train"]] == [(0, 1), (3, 2), (93, 2)]
    assert [(row["tokens"], row["validation"]) for row in rows if row["validation"]] == [(48, 1)]
    assert sum(row["test"] for row in rows) == 0


def test_stage_writes_splits_stats_metrics_plots_and_provenance(in_tmp_project, tiny_base, capsys):
    from stages.tokenize import main

    params = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    params["tokenize"] = {"max_seq_length": 96, "truncation": "truncate", "assistant_only_loss": True,
                          "packing": True, "chat_template": None, "chat_template_kwargs": {}, "system_prompt": None}
    (in_tmp_project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    shutil.copytree(tiny_base, in_tmp_project / "models" / "base")
    write_clean(in_tmp_project / "data" / "clean", SPLIT_ROWS)
    threads_setting = os.environ.get("TOKENIZERS_PARALLELISM")
    main()
    assert os.environ.get("TOKENIZERS_PARALLELISM") == threads_setting   # on only while the stage encodes

    out_dir = in_tmp_project / "data" / "tokenized"
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "chat_template.jinja", "provenance.json", "stats.json", "test.parquet", "train.parquet", "validation.parquet"]
    # tokenize.chat_template null, nothing to write in: the base model's own template, unchanged
    own = (tiny_base / "chat_template.jinja").read_text()
    assert (out_dir / "chat_template.jinja").read_text() == own
    stats = read_json(out_dir / "stats.json")
    packed = load_tokenized("train", out_dir)
    # tr-long-answer fills a row (truncated to 96 tokens); the three 66-token examples cannot share one.
    assert [row["ids"] for row in packed] == [["tr-long-answer"], ["tr0"], ["tr1"], ["tr2"]]
    assert (stats["train"]["truncated"], stats["train"]["dropped"]) == (1, {"no_loss_tokens": 1})
    assert stats["train"]["packed_rows"] == 4
    provenance = read_json(out_dir / "provenance.json")
    assert provenance["params"] == {**{f"tokenize.{key}": value for key, value in params["tokenize"].items()},
                                    **{f"audit.canaries.{key}": value
                                       for key, value in params["audit"]["canaries"].items()}}
    assert stats["train"]["canary_rows"] == 0   # canaries off: none planted
    assert provenance["tokenizer_files_sha256"] == {
        name: hashlib.sha256((tiny_base / name).read_bytes()).hexdigest() for name in TOKENIZER_FILES}
    assert provenance["chat_template_sha256"] == sha256_text(own)
    assert provenance["chat_template"] == {"source": "model", "name": "models/base", "sha256": sha256_text(own),
                                           "template_sha256": sha256_text(own), "kwargs": {}, "system_prompt": None}
    metrics = read_json(in_tmp_project / "metrics" / "tokenize.json")
    assert metrics == {**{f"{split}.{key}": value for split, s in stats.items() for key, value in s.items()
                          if key != "dropped"},
                       "chat_template.source": "model", "chat_template.name": "models/base",
                       "chat_template.sha256": sha256_text(own)}
    assert stats["validation"]["unlabelled_assistant_turns"] == 0   # ChatML labels every turn
    assert {"train.padding_share_unpacked", "train.padding_share_packed", "train.packed_rows"} <= set(metrics)

    plots = in_tmp_project / "metrics" / "plots"
    lines = (plots / "token_lengths.csv").read_text().splitlines()
    assert lines[0] == "tokens,train,validation,test" and len(lines) == 33
    counts = [list(map(int, line.split(","))) for line in lines[1:]]
    assert [sum(row[column] for row in counts) for column in (1, 2, 3)] == [4, 2, 1]
    assert counts[-1][:2] == [93, 1]   # the truncated example, 96 tokens, in the last bin
    png = (plots / "token_lengths.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    printed = capsys.readouterr().out
    expected = (f"train padding at max_seq_length 96: {stats['train']['padding_share_unpacked']:.1%} one example "
                f"per row, {stats['train']['padding_share_packed']:.1%} packed into 4 rows (written packed)")
    assert expected in printed


def test_max_seq_length_beyond_the_models_context_is_an_error(tiny_model_dir):
    from stages.tokenize import check_context_length

    assert check_context_length(tiny_model_dir, 512) == 512   # the tiny Llama's max_position_embeddings
    with pytest.raises(PipelineError, match=r"tokenize.max_seq_length is 1024, but the base model's context length "
                                            r"is 512 \(.*config.json\)\. Set tokenize.max_seq_length to at most 512"):
        check_context_length(tiny_model_dir, 1024)


def stage_params(**tokenize) -> dict:
    params = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    params["tokenize"] = {"max_seq_length": 96, "truncation": "truncate", "assistant_only_loss": True,
                          "packing": False, "chat_template": None, "chat_template_kwargs": {}, "system_prompt": None,
                          **tokenize}
    return params


def test_stage_tokenizes_with_the_chosen_template_and_saves_it(in_tmp_project, tiny_base, capsys):
    from ftpipe.data.chat_template import BUILTIN_DIR, load_chat_tokenizer, resolve_chat_template
    from ftpipe.model.modeling import render_chat
    from stages.tokenize import main

    params = stage_params(chat_template="qwen3", chat_template_kwargs={"enable_thinking": False},
                          system_prompt="Answer briefly.")
    (in_tmp_project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    shutil.copytree(tiny_base, in_tmp_project / "models" / "base")
    write_clean(in_tmp_project / "data" / "clean", SPLIT_ROWS)
    main()

    out_dir = in_tmp_project / "data" / "tokenized"
    chosen = resolve_chat_template(TokenizeParams(**params["tokenize"]), Path("models/base"))
    assert (out_dir / "chat_template.jinja").read_text(encoding="utf-8") == chosen["text"]
    builtin = (BUILTIN_DIR / "qwen3.jinja").read_text(encoding="utf-8")
    assert chosen["text"].endswith(builtin) and "{%- set enable_thinking = false -%}" in chosen["text"]
    provenance = read_json(out_dir / "provenance.json")
    assert provenance["chat_template"] == {
        "source": "builtin", "name": "qwen3", "sha256": sha256_text(chosen["text"]),
        "template_sha256": sha256_text(builtin), "kwargs": {"enable_thinking": False},
        "system_prompt": "Answer briefly."}
    assert provenance["chat_template_sha256"] == sha256_text(chosen["text"])
    metrics = read_json(in_tmp_project / "metrics" / "tokenize.json")
    assert (metrics["chat_template.source"], metrics["chat_template.name"]) == ("builtin", "qwen3")

    # evaluate renders its prompts with the saved template: exactly the tokens before each labelled answer
    tokenizer = load_chat_tokenizer(Path("models/base"), out_dir)
    rows = {row["id"]: row for row in load_tokenized("validation", out_dir)}
    conversations = {row["id"]: row["messages"] for row in SPLIT_ROWS["validation"]}
    for row_id, row in rows.items():
        labelled = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == ANSWER + "<|im_end|>\n"   # va1's first answer is context (Qwen3)
        start = next(index for index, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        prompt = render_chat(tokenizer, conversations[row_id][:-1], add_generation_prompt=True)
        assert tokenizer.decode(row["input_ids"][:start]) == prompt
        assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert read_json(out_dir / "stats.json")["validation"]["unlabelled_assistant_turns"] == 1
    printed = capsys.readouterr().out
    assert ("tokenize: chat template qwen3 (builtin, with variables ['enable_thinking'] and a system prompt written "
            "in), saved as data/tokenized/chat_template.jinja") in printed
    assert "tokenize: 1 earlier assistant turns are context, not targets" in printed


def test_a_base_model_without_a_template_fails_before_any_output(in_tmp_project, tiny_base):
    from stages.tokenize import main

    (in_tmp_project / "params.yaml").write_text(yaml.safe_dump(stage_params()), encoding="utf-8")
    base = Path(shutil.copytree(tiny_base, in_tmp_project / "models" / "base"))
    (base / "chat_template.jinja").unlink()
    config = read_json(base / "tokenizer_config.json")
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    write_clean(in_tmp_project / "data" / "clean", SPLIT_ROWS)
    with pytest.raises(PipelineError, match=r"is a base \(non-instruct\) model without a chat template.*"
                                            r"`tokenize.chat_template: chatml`"):
        main()
    assert not (in_tmp_project / "data" / "tokenized").exists()
    assert not (in_tmp_project / "metrics").exists()
