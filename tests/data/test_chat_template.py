"""ftpipe.data.chat_template and the built-in templates (ftpipe/chat_templates/): the exact assistant-only labels
each family's real template gives (Llama 3.1's date header, Gemma's user/model roles without a system role, Qwen3's
think blocks, gpt-oss's harmony channels, ...), multi-turn conversations, system prompts and template variables
written into the template, the errors that name what to choose, and the one template text rendering the same in
transformers, in llama-cpp-python's chat formatter and in a GGUF the converter writes from a model folder.

Each family's tokenizer is SmolLM2's (the session fixture, copied through save_pretrained) with that family's
special tokens added and its BOS/EOS set, so every marker is one token and the labels decode to exact text."""
from __future__ import annotations

import json

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import sha256_text
from ftpipe.core.params import TokenizeParams
from ftpipe.data.chat_template import (
    BUILTIN_DIR,
    TEMPLATE_FILE,
    apply_chat_template_to,
    bake,
    builtin_templates,
    install_chat_template,
    jinja_literal,
    load_chat_tokenizer,
    resolve_chat_template,
)
from ftpipe.data.chat_tokens import tokenize_batch, tokenize_example
from ftpipe.model.modeling import IGNORE_INDEX, render_chat

BUILTINS = ["chatml", "gemma", "gpt-oss", "llama3", "mistral", "phi3", "qwen2.5", "qwen3"]
# name: (special tokens added to SmolLM2's vocabulary, BOS, EOS) as the family's own tokenizer has them
FAMILIES = {
    "chatml": ([], None, None),   # SmolLM2's own: <|im_start|> and <|im_end|>
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": ([], None, "<|im_end|>"),
    "qwen3": (["<think>", "</think>"], None, "<|im_end|>"),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"),
    "phi3": (["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>"),
    "gpt-oss": (["<|startoftext|>", "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"],
                "<|startoftext|>", "<|return|>"),
}
# The labelled text of an answer A: as the conversation's last turn, and as an earlier one (None: unlabelled,
# because the template writes earlier turns differently in the history than the model generates them).
LABELS = {
    "chatml": ("{}<|im_end|>\n", "{}<|im_end|>\n"),
    "llama3": ("{}<|eot_id|>", "{}<|eot_id|>"),
    "qwen2.5": ("{}<|im_end|>\n", "{}<|im_end|>\n"),
    # the last answer carries an (empty) think block; earlier answers lose theirs in the history
    "qwen3": ("<think>\n\n</think>\n\n{}<|im_end|>\n", None),
    "gemma": ("{}<end_of_turn>\n", "{}<end_of_turn>\n"),
    "mistral": (" {}</s>", " {}</s>"),
    # a conversation without a generation prompt ends with the end-of-sequence token, after its last turn only
    "phi3": ("{}<|end|>\n<|endoftext|>", "{}<|end|>\n"),
    # the final channel; the last answer ends with <|return|>, earlier ones are written with <|end|> in the history,
    # which the model never generates after a final answer: their message is labelled, not that marker
    "gpt-oss": ("<|channel|>final<|message|>{}<|return|>", "<|channel|>final<|message|>{}"),
}
PARAMS = TokenizeParams(max_seq_length=2048, truncation="truncate", assistant_only_loss=True, packing=False,
                        chat_template=None, chat_template_kwargs={}, system_prompt=None)
ANSWER = "Yes: 42 °C.\nThat is 107.6 °F."


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


SINGLE = chat(("user", "How warm is it?"), ("assistant", ANSWER))
WITH_SYSTEM = chat(("system", "Be brief."), ("user", "How warm is it?"), ("assistant", ANSWER))
MULTI = chat(("user", "Hi?"), ("assistant", "Hello there."), ("user", "How warm is it?"), ("assistant", ANSWER))
MULTI_WITH_SYSTEM = [WITH_SYSTEM[0], *MULTI]


def params(**changes) -> TokenizeParams:
    return TokenizeParams(**{**PARAMS.__dict__, **changes})


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory, smollm2_tokenizer):
    """The session's SmolLM2 tokenizer saved to a folder: each family loads its own copy from it."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_tokenizer(smollm2_dir):
    """family_tokenizer(name, template=None): a fresh tokenizer with the family's special tokens, BOS and EOS,
    rendering with `template` (default: the built-in template of that name, nothing written in)."""
    from transformers import AutoTokenizer

    def make(name: str, template: str | None = None):
        specials, bos, eos = FAMILIES[name]
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
        if specials:
            tokenizer.add_special_tokens({"additional_special_tokens": specials})
        if bos:
            tokenizer.bos_token = bos
        if eos:
            tokenizer.eos_token = eos
        text = template if template is not None else (BUILTIN_DIR / f"{name}.jinja").read_text(encoding="utf-8")
        return apply_chat_template_to(tokenizer, text)

    return make


def labelled_runs(tokenizer, result: dict) -> list[str]:
    """The labelled tokens, decoded, one string per run of consecutive positions."""
    runs, previous = [], None
    for position, label in enumerate(result["labels"]):
        if label == IGNORE_INDEX:
            continue
        assert label == result["input_ids"][position]
        if previous != position - 1:
            runs.append([])
        runs[-1].append(label)
        previous = position
    return [tokenizer.decode(run) for run in runs]


def unlabelled_text(tokenizer, result: dict) -> str:
    return tokenizer.decode([t for t, label in zip(result["input_ids"], result["labels"]) if label == IGNORE_INDEX])


def formatter_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt llama-cpp-python's chat path builds (Jinja2ChatFormatter, as for a GGUF's template)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(tokenizer.chat_template, eos_token=tokenizer.eos_token,
                                    bos_token=tokenizer.bos_token or "")
    return formatter(messages=[dict(message) for message in messages]).prompt


# --- the built-in templates -----------------------------------------------------------------------------------------

def test_the_builtins_are_listed_and_each_names_its_family_model_and_source():
    assert builtin_templates() == BUILTINS
    for name in BUILTINS:
        text = (BUILTIN_DIR / f"{name}.jinja").read_text(encoding="utf-8")
        header = text[:text.index("-#}")]
        assert header.startswith(f'{{#- ftpipe built-in chat template "{name}": ')
        assert "Model: " in header and "Source: " in header
        # no special token of any family in the comment: llama.cpp and Ollama guess a template's family from its text
        assert not any(marker in header for marker in ("<|", "[INST]", "<start_of_turn>", "<end_of_turn>"))
        # reproducible: no template prints today's date (Llama 3.2's and gpt-oss's own templates do)
        assert "strftime_now(" not in text


@pytest.mark.parametrize("name", BUILTINS)
def test_single_turn_labels_exactly_the_answer_and_its_end_of_turn(family_tokenizer, name):
    tokenizer = family_tokenizer(name)
    last, _ = LABELS[name]
    for messages in (SINGLE, WITH_SYSTEM):
        result = tokenize_example(tokenizer, messages, PARAMS)
        assert labelled_runs(tokenizer, result) == [last.format(ANSWER)]
        assert result["unlabelled_turns"] == 0
        # everything before the answer is the prompt a runtime builds to generate it
        prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
        assert unlabelled_text(tokenizer, result) == prompt
        assert tokenizer.decode(result["input_ids"]) == render_chat(tokenizer, messages)


@pytest.mark.parametrize("name", BUILTINS)
def test_multi_turn_labels_each_answer_the_history_shows_as_generated(family_tokenizer, name):
    tokenizer = family_tokenizer(name)
    last, earlier = LABELS[name]
    for messages in (MULTI, MULTI_WITH_SYSTEM):
        result = tokenize_example(tokenizer, messages, PARAMS)
        # Mistral puts the system message into the last user turn: with one, the first answer's prompt is not the
        # history's, so that answer is context
        moved = name == "mistral" and messages[0]["role"] == "system"
        first = None if moved else earlier
        expected = ([first.format("Hello there.")] if first else []) + [last.format(ANSWER)]
        assert labelled_runs(tokenizer, result) == expected
        assert result["unlabelled_turns"] == (0 if first else 1)


def test_llama3_writes_its_date_header_before_every_conversation(family_tokenizer):
    tokenizer = family_tokenizer("llama3")
    result = tokenize_example(tokenizer, SINGLE, PARAMS)
    assert unlabelled_text(tokenizer, result) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow warm is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    dated = family_tokenizer("llama3", bake(tokenizer.chat_template, {"date_string": "1 Jan 2026"}, None))
    assert "Today Date: 1 Jan 2026\n\nBe brief.<|eot_id|>" in render_chat(dated, WITH_SYSTEM)


def test_gemma_has_user_and_model_turns_and_folds_the_system_message_into_the_first_user_turn(family_tokenizer):
    tokenizer = family_tokenizer("gemma")
    result = tokenize_example(tokenizer, MULTI_WITH_SYSTEM, PARAMS)
    assert unlabelled_text(tokenizer, result) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\n"
        "<start_of_turn>user\nHow warm is it?<end_of_turn>\n<start_of_turn>model\n")
    assert "system" not in tokenizer.decode(result["input_ids"])


def test_qwen3_labels_the_think_block_of_the_last_answer_and_drops_earlier_ones(family_tokenizer):
    tokenizer = family_tokenizer("qwen3")
    thought = "<think>\nThe user asks for a temperature.\n</think>\n\n" + ANSWER
    messages = chat(("user", "Hi?"), ("assistant", "<think>\nA greeting.\n</think>\n\nHello there."),
                    ("user", "How warm is it?"), ("assistant", thought))
    result = tokenize_example(tokenizer, messages, PARAMS)
    assert labelled_runs(tokenizer, result) == [thought + "<|im_end|>\n"]
    text = tokenizer.decode(result["input_ids"])
    assert "A greeting." not in text and "<|im_start|>assistant\nHello there.<|im_end|>\n" in text
    assert result["unlabelled_turns"] == 1


def test_qwen3_enable_thinking_false_puts_the_empty_think_block_in_the_prompt(family_tokenizer, tiny_model_dir):
    chosen = resolve_chat_template(params(chat_template="qwen3", chat_template_kwargs={"enable_thinking": False}),
                                   tiny_model_dir)
    assert chosen["text"].startswith("{#- ftpipe: params.yaml tokenize.chat_template_kwargs")
    assert "{%- set enable_thinking = false -%}" in chosen["text"]
    tokenizer = family_tokenizer("qwen3", chosen["text"])
    assert render_chat(tokenizer, SINGLE[:1], add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    result = tokenize_example(tokenizer, SINGLE, PARAMS)
    assert labelled_runs(tokenizer, result) == [ANSWER + "<|im_end|>\n"]   # the think block is prompt, not target
    # baked in, the variable is the template's own: a caller's value changes nothing
    plain = family_tokenizer("qwen3")
    assert (tokenizer.apply_chat_template(SINGLE[:1], tokenize=False, add_generation_prompt=True, enable_thinking=True)
            == plain.apply_chat_template(SINGLE[:1], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False))


def test_gpt_oss_writes_harmony_channels_a_fixed_date_and_the_system_message_as_developer(family_tokenizer):
    tokenizer = family_tokenizer("gpt-oss")
    result = tokenize_example(tokenizer, MULTI_WITH_SYSTEM, PARAMS)
    assert unlabelled_text(tokenizer, result) == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
        "<|start|>user<|message|>Hi?<|end|><|start|>assistant<|end|>"   # the earlier answer's <|end|> is context
        "<|start|>user<|message|>How warm is it?<|end|><|start|>assistant")
    low = family_tokenizer("gpt-oss", bake(tokenizer.chat_template,
                                           {"reasoning_effort": "low", "current_date": "2026-01-01"}, None))
    assert "Current date: 2026-01-01\n\nReasoning: low\n\n" in render_chat(low, SINGLE)


def test_mistral_keeps_the_system_message_of_a_training_conversation(family_tokenizer):
    tokenizer = family_tokenizer("mistral")
    assert render_chat(tokenizer, MULTI_WITH_SYSTEM) == (
        "<s>[INST] Hi?[/INST] Hello there.</s>[INST] Be brief.\n\nHow warm is it?[/INST] " + ANSWER + "</s>")
    # a prompt renders as the official template renders it (the system message in the last user turn)
    assert render_chat(tokenizer, MULTI_WITH_SYSTEM[:-1], add_generation_prompt=True) == (
        "<s>[INST] Hi?[/INST] Hello there.</s>[INST] Be brief.\n\nHow warm is it?[/INST]")


# --- params written into the template -------------------------------------------------------------------------------

def test_system_prompt_is_added_where_a_conversation_has_none(family_tokenizer, tiny_model_dir):
    chosen = resolve_chat_template(params(chat_template="chatml", system_prompt="Answer in one line."), tiny_model_dir)
    tokenizer = family_tokenizer("chatml", chosen["text"])
    assert render_chat(tokenizer, SINGLE[:1]) == (
        "<|im_start|>system\nAnswer in one line.<|im_end|>\n<|im_start|>user\nHow warm is it?<|im_end|>\n")
    assert render_chat(tokenizer, WITH_SYSTEM[:2]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    result = tokenize_example(tokenizer, SINGLE, PARAMS)
    assert labelled_runs(tokenizer, result) == [ANSWER + "<|im_end|>\n"]
    assert "Answer in one line." in unlabelled_text(tokenizer, result)
    gemma = family_tokenizer("gemma", bake(family_tokenizer("gemma").chat_template, {}, "Answer in one line."))
    assert render_chat(gemma, SINGLE[:1]) == (
        "<bos><start_of_turn>user\nAnswer in one line.\n\nHow warm is it?<end_of_turn>\n")


@pytest.mark.parametrize("value", [
    "plain", 'quotes " and \' and a backslash \\ and {{ braces }} and {% tags %}', "line\nbreak\ttab\r\n",
    "é ü ß «»", "emoji 😀 and \u2028 and \x07", "", 0, -3, 2.5, 1e-9, True, False, None,
    [1, "two", [3.0, None]], {"a": 1, "b c": ["d", {"e": False}]}])
def test_jinja_literals_read_back_as_the_value(value):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = "{%- set x = " + jinja_literal(value) + " -%}{{ x == expected }}"
    assert ImmutableSandboxedEnvironment().from_string(template).render(expected=value) == "True"


def test_a_baked_template_renders_the_same_in_transformers_and_llama_cpps_formatter(family_tokenizer):
    """Jinja scoping, in both engines: a top-level set shadows what the caller passes, and a set inside a top-level
    if is seen after it."""
    system = 'Say "hi" \\ then 「ok」.\nNew line.'
    kwargs = {"llama3": {"date_string": "1 Jan 2026"}, "qwen3": {"enable_thinking": False},
              "gpt-oss": {"reasoning_effort": "low", "current_date": "2026-01-01"}}
    probe = bake("{{ messages[0]['content'] }}|{{ flag }}|{{ messages | length }}", {"flag": [1, "a"]}, system)
    for name in BUILTINS + ["probe"]:
        tokenizer = (family_tokenizer("chatml", probe) if name == "probe" else
                     family_tokenizer(name, bake(family_tokenizer(name).chat_template, kwargs.get(name, {}), system)))
        for messages in (SINGLE[:1], WITH_SYSTEM[:2], MULTI[:3], MULTI_WITH_SYSTEM[:4]):
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, flag=0)
            assert formatter_prompt(tokenizer, messages) == expected, name
            if name == "probe":
                first = messages[0]["content"] if messages[0]["role"] == "system" else system
                assert expected == f"{first}|[1, 'a']|{len(messages) + (messages[0]['role'] != 'system')}"
    date = family_tokenizer("llama3", bake(family_tokenizer("llama3").chat_template, kwargs["llama3"], None))
    assert "Today Date: 1 Jan 2026" in formatter_prompt(date, SINGLE[:1])


# --- choosing the template, and the errors ----------------------------------------------------------------------------

def test_null_is_the_models_own_template_unchanged(tiny_model_dir):
    chosen = resolve_chat_template(PARAMS, tiny_model_dir)
    own = (tiny_model_dir / "chat_template.jinja").read_text()
    assert chosen == {"text": own, "source": "model", "name": str(tiny_model_dir), "sha256": sha256_text(own),
                      "template_sha256": sha256_text(own), "kwargs": {}, "system_prompt": None}


def test_a_base_model_without_a_template_needs_one_named(tiny_model_copy):
    (tiny_model_copy / "chat_template.jinja").unlink()
    config = json.loads((tiny_model_copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tiny_model_copy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError) as error:
        resolve_chat_template(PARAMS, tiny_model_copy)
    assert str(error.value) == (
        f"the base model ({tiny_model_copy}) is a base (non-instruct) model without a chat template, and params.yaml "
        f"tokenize.chat_template is null (the model's own). Choose one: `tokenize.chat_template: chatml` (or another "
        f"built-in: chatml, gemma, gpt-oss, llama3, mistral, phi3, qwen2.5, qwen3; or the path of a .jinja file in "
        f"this repository).")
    chosen = resolve_chat_template(params(chat_template="chatml"), tiny_model_copy)
    assert (chosen["source"], chosen["name"]) == ("builtin", "chatml")
    assert chosen["text"] == (BUILTIN_DIR / "chatml.jinja").read_text()


def test_an_unknown_name_lists_the_builtins(tiny_model_dir):
    with pytest.raises(PipelineError, match=r"tokenize.chat_template: 'llama2' is not a built-in template. The "
                                            r"built-ins are: chatml, gemma, gpt-oss, llama3, mistral, phi3, qwen2.5, "
                                            r"qwen3 \(ftpipe/chat_templates/\); or give the path of a .jinja file"):
        resolve_chat_template(params(chat_template="llama2"), tiny_model_dir)


def test_a_jinja_file_of_the_repository_overrides_the_template(tiny_model_dir, in_tmp_project):
    with pytest.raises(PipelineError, match=r"tokenize.chat_template: templates/mine.jinja: no such file"):
        resolve_chat_template(params(chat_template="templates/mine.jinja"), tiny_model_dir)
    (in_tmp_project / "templates").mkdir()
    mine = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}[assistant] {% endif %}"
    (in_tmp_project / "templates" / "mine.jinja").write_text(mine)
    chosen = resolve_chat_template(params(chat_template="templates/mine.jinja", system_prompt="Be kind."),
                                   tiny_model_dir)
    assert (chosen["source"], chosen["name"], chosen["template_sha256"]) == ("file", "templates/mine.jinja",
                                                                            sha256_text(mine))
    assert chosen["text"].endswith(mine) and chosen["sha256"] == sha256_text(chosen["text"])
    from transformers import AutoTokenizer

    tokenizer = apply_chat_template_to(AutoTokenizer.from_pretrained(str(tiny_model_dir)), chosen["text"])
    assert render_chat(tokenizer, SINGLE) == f"[system] Be kind.\n[user] How warm is it?\n[assistant] {ANSWER}\n"
    (in_tmp_project / "templates" / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(PipelineError, match=r"chat template templates/broken.jinja \(file\): not a valid Jinja"):
        resolve_chat_template(params(chat_template="templates/broken.jinja"), tiny_model_dir)


@pytest.mark.parametrize("kwargs, message", [
    ({"messages": []}, r"'messages' cannot be a template variable"),
    ({"not valid": 1}, r"'not valid' cannot be a template variable"),
    ({"if": 1}, r"'if' cannot be a template variable"),
    ({"when": object()}, r"tokenize.chat_template_kwargs.when: <object .*> \(object\) is not a value"),
    ({"when": float("nan")}, r"tokenize.chat_template_kwargs.when: nan is not a number"),
])
def test_kwargs_a_template_cannot_read_are_errors(tiny_model_dir, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        resolve_chat_template(params(chat_template="qwen3", chat_template_kwargs=kwargs), tiny_model_dir)


# --- the saved template: evaluate, the merged model, the GGUF --------------------------------------------------------

def test_load_chat_tokenizer_renders_with_the_saved_template(tiny_model_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"chat_template.jinja: not found. Run `dvc repro tokenize` first"):
        load_chat_tokenizer(tiny_model_dir, tmp_path)
    text = resolve_chat_template(params(chat_template="qwen2.5", system_prompt="Be brief."), tiny_model_dir)["text"]
    (tmp_path / TEMPLATE_FILE).write_text(text, encoding="utf-8")
    tokenizer = load_chat_tokenizer(tiny_model_dir, tmp_path)
    assert tokenizer.chat_template == text
    assert render_chat(tokenizer, SINGLE[:1]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_an_installed_template_is_what_transformers_the_converter_and_llama_cpp_use(tiny_model_copy, tmp_path):
    """install_chat_template writes chat_template.jinja (transformers reads it first) and tokenizer_config.json's
    chat_template (the converter reads it first); the GGUF then builds, in llama.cpp's chat path, the very prompt
    tokens the tokenize stage labelled after: every labelled answer's, none of the unlabelled ones'."""
    import gguf
    from transformers import AutoTokenizer

    from ftpipe.gguf import parity
    from ftpipe.gguf.export import convert
    from ftpipe.gguf.runtime import open_gguf

    tokenized = tmp_path / "tokenized"
    tokenized.mkdir()
    with pytest.raises(PipelineError, match="Run `dvc repro tokenize` first"):
        install_chat_template(tiny_model_copy, tokenized)
    # Qwen3 (its think tags are plain text to SmolLM2's tokenizer) with a system prompt written in. Not with
    # enable_thinking: false here: its prompt ends with a blank line, which SmolLM2's GPT-2-style pre-tokenizer
    # splits differently alone and before the answer (Qwen's own keeps "\n\n" one token): the GGUF check would
    # rightly report those prompts
    chosen = resolve_chat_template(params(chat_template="qwen3", system_prompt="Answer briefly."), tiny_model_copy)
    (tokenized / TEMPLATE_FILE).write_text(chosen["text"], encoding="utf-8")
    (tiny_model_copy / "additional_chat_templates").mkdir()
    (tiny_model_copy / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'stale' }}")
    (tiny_model_copy / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'stale' }}"}))

    assert install_chat_template(tiny_model_copy, tokenized) == chosen["text"]
    assert not (tiny_model_copy / "additional_chat_templates").exists()
    assert not (tiny_model_copy / "chat_template.json").exists()
    assert (tiny_model_copy / TEMPLATE_FILE).read_text() == chosen["text"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_copy))
    assert tokenizer.chat_template == chosen["text"]
    assert gguf.SpecialVocab(tiny_model_copy, load_merges=False).chat_template == chosen["text"]

    path = tmp_path / "model-f16.gguf"
    convert(tiny_model_copy, "f16", path)
    llm = open_gguf(path, 512)
    try:
        assert llm.metadata["tokenizer.chat_template"] == chosen["text"]
        conversations = {"single": SINGLE, "multi": MULTI, "system": MULTI_WITH_SYSTEM}
        results = tokenize_batch(tokenizer, list(conversations.values()), PARAMS)
        rows = [{"id": row_id, "input_ids": result["input_ids"].tolist(), "labels": result["labels"].tolist()}
                for row_id, result in zip(conversations, results)]
        assert [result["unlabelled_turns"] for result in results] == [0, 1, 1]   # Qwen3: earlier answers are context
        compared, mismatches = parity.chat_prompt_mismatches(llm, rows, conversations, "prompts")
        assert (compared, mismatches) == (3, [])
    finally:
        llm.close()


def test_the_ollama_modelfile_reads_a_baked_chatml_template_with_its_system_prompt(tiny_model_dir):
    from ftpipe.gguf.modelfile import ChatML, chatml_format

    baked = resolve_chat_template(params(chat_template="chatml", system_prompt="Answer in one line."), tiny_model_dir)
    assert chatml_format(baked["text"]) == ChatML("Answer in one line.")
    # the built-in as it is: SmolLM2's default system message
    assert chatml_format((BUILTIN_DIR / "chatml.jinja").read_text()) == ChatML(
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    # a template that is not ChatML (a think block in the prompt) gets no TEMPLATE: Ollama reads the GGUF's own
    thinking_off = resolve_chat_template(params(chat_template="qwen3", chat_template_kwargs={"enable_thinking": False}),
                                         tiny_model_dir)
    assert chatml_format(thinking_off["text"]) is None



def test_the_chat_command_renders_base_and_adapter_with_the_trained_template(tmp_path):
    """`python -m ftpipe.chat --model base|adapter` loads models/base: its prompts use the tokenize stage's template,
    as evaluate's do (the merged model carries the template itself)."""
    from ftpipe.chat.models import resolve

    for folder, marker in (("models/base", "config.json"), ("models/merged", "config.json"),
                           ("models/adapter", "adapter_config.json")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / marker).write_text("{}")
    assert resolve("adapter", tmp_path).chat_template is None   # no tokenize output yet: the base model's own
    (tmp_path / "data" / "tokenized").mkdir(parents=True)
    (tmp_path / "data" / "tokenized" / TEMPLATE_FILE).write_text("{{ 'trained' }}")
    for name in ("base", "adapter"):
        assert resolve(name, tmp_path).chat_template == tmp_path / "data" / "tokenized" / TEMPLATE_FILE
    assert resolve("merged", tmp_path).chat_template is None
