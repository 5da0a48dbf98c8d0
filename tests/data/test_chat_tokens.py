"""ftpipe.data.chat_tokens: chat-rendered token ids, labels on exactly the assistant's turns (end-of-turn
marker included), truncation and dropping, templates that cannot be split into turns, and batches
tokenized exactly as each conversation alone."""
import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.params import TokenizeParams
from ftpipe.data.chat_tokens import tokenize_batch, tokenize_example
from ftpipe.model.modeling import IGNORE_INDEX, render_chat

PARAMS = TokenizeParams(max_seq_length=1024, truncation="truncate", assistant_only_loss=True, packing=False,
                        chat_template=None, chat_template_kwargs={}, system_prompt=None)
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
    params = TokenizeParams(max_seq_length=256, truncation="truncate", assistant_only_loss=False, packing=False,
                            chat_template=None, chat_template_kwargs={}, system_prompt=None)
    result = tokenize_example(smollm2_tokenizer, chat(("user", "Hi?"), ("assistant", ANSWER)), params)
    assert result["labels"] == result["input_ids"] and len(result["input_ids"]) > 20


def test_truncate_cuts_to_max_seq_length(smollm2_tokenizer):
    messages = chat(("system", "S"), ("user", "Q?"), ("assistant", LONG_ANSWER))
    full = tokenize_example(smollm2_tokenizer, messages, PARAMS)
    assert 300 < len(full["input_ids"]) < 1024 and full["truncated"] is False
    params = TokenizeParams(max_seq_length=32, truncation="truncate", assistant_only_loss=True, packing=False,
                            chat_template=None, chat_template_kwargs={}, system_prompt=None)
    result = tokenize_example(smollm2_tokenizer, messages, params)
    assert result["truncated"] is True
    assert result["input_ids"] == full["input_ids"][:32] and result["labels"] == full["labels"][:32]
    (run,) = labelled_runs(result)
    assert 0 < len(run) < 32 and LONG_ANSWER.startswith(smollm2_tokenizer.decode(run))


def test_drop_drops_a_too_long_example(smollm2_tokenizer):
    messages = chat(("system", "S"), ("user", "Q?"), ("assistant", LONG_ANSWER))
    full_length = len(tokenize_example(smollm2_tokenizer, messages, PARAMS)["input_ids"])
    params = TokenizeParams(max_seq_length=32, truncation="drop", assistant_only_loss=True, packing=False,
                            chat_template=None, chat_template_kwargs={}, system_prompt=None)
    assert tokenize_example(smollm2_tokenizer, messages, params) == {"dropped": "too_long", "length": full_length}


def test_an_answer_cut_off_entirely_is_dropped(smollm2_tokenizer):
    messages = chat(("user", LONG_ANSWER), ("assistant", ANSWER))
    params = TokenizeParams(max_seq_length=32, truncation="truncate", assistant_only_loss=True, packing=False,
                            chat_template=None, chat_template_kwargs={}, system_prompt=None)
    assert tokenize_example(smollm2_tokenizer, messages, params) == {"dropped": "no_loss_tokens", "length": 32}


def test_a_template_that_is_not_prefix_stable_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.chat_template = ("{{ messages | length }} turns\n"   # the count changes as turns are added
                               "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(PipelineError, match="cannot be located.*assistant_only_loss: false"):
        tokenize_example(tokenizer, chat(("user", "Hi?"), ("assistant", ANSWER)), PARAMS)


def test_a_batch_is_tokenized_exactly_as_each_conversation_alone(smollm2_tokenizer):
    """tokenize_batch renders and encodes a batch in one call each: no result may depend on its neighbours."""
    conversations = [chat(("user", "Hi?"), ("assistant", ANSWER)),
                     chat(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."), ("user", "More?"),
                          ("assistant", ANSWER)),
                     chat(("user", LONG_ANSWER), ("assistant", ANSWER)),   # dropped: no answer left in 80 tokens
                     chat(("user", "Q?"), ("assistant", LONG_ANSWER)),     # truncated
                     chat(("user", "Again?"), ("assistant", "Yes."), ("user", "Sure?"), ("assistant", "Yes!"))]
    params = TokenizeParams(max_seq_length=80, truncation="truncate", assistant_only_loss=True, packing=False,
                            chat_template=None, chat_template_kwargs={}, system_prompt=None)
    batched = tokenize_batch(smollm2_tokenizer, conversations, params)
    alone = [tokenize_batch(smollm2_tokenizer, [messages], params)[0] for messages in conversations]
    assert [result.get("dropped") for result in batched] == [None, None, "no_loss_tokens", None, None]
    for got, expected in zip(batched, alone):
        assert got.keys() == expected.keys()
        assert all(got[key] == expected[key] if key in ("truncated", "dropped", "length", "unlabelled_turns")
                   else got[key].tolist() == expected[key].tolist() for key in got)
    assert [result.get("truncated") for result in batched] == [False, False, None, True, False]
    multi_turn = labelled_runs({key: batched[4][key].tolist() for key in ("input_ids", "labels")})
    assert [smollm2_tokenizer.decode(run) for run in multi_turn] == ["Yes." + END, "Yes!" + END]

