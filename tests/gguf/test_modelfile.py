"""ftpipe.gguf.modelfile: the Ollama Modelfile beside a GGUF. Pure and fast, but for one test on the real SmolLM2
tokenizer (tests/conftest.py's smollm2_tokenizer).

The TEMPLATE is checked by rendering it as Ollama does (render_go below: Go's text/template for the few actions the
template uses, and Ollama's rule that the Modelfile's SYSTEM comes first when a conversation has no system message)
and comparing with the Jinja chat template as transformers renders it; the Modelfile is read back with the port of
Ollama's parser (parse_modelfile).
"""
from __future__ import annotations

import re

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from ftpipe.gguf.modelfile import (
    CHATML_TEMPLATE,
    ChatML,
    ModelfileError,
    chatml_format,
    from_target,
    modelfile,
    parse_modelfile,
)
from tests.release_fixtures import SMOLLM2_CHAT_TEMPLATE, SMOLLM2_DEFAULT_SYSTEM

# ChatML with no default system message (as Qwen2's simplest templates)
PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
# Zephyr's template: not ChatML
ZEPHYR = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
          "eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
          "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
          "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}")
TWO_TURNS = [{"role": "user", "content": "What does os.path.join do?"},
             {"role": "assistant", "content": "It joins path components."},
             {"role": "user", "content": "And on Windows?"}]
WITH_SYSTEM = [{"role": "system", "content": "Answer in one sentence."}, *TWO_TURNS]


# --- Ollama's side, in miniature ----------------------------------------------------------------------------------

def render_go(template: str, messages: list[dict], system: str | None) -> str:
    """The prompt Ollama builds for `messages` from a Modelfile's TEMPLATE and SYSTEM: SYSTEM is prepended when the
    first message is not a system message (server/routes.go ChatHandler), then the template runs with .Messages
    (template.Execute). Supports what CHATML_TEMPLATE uses: text, {{ .Field }}, {{ range .Messages }}...{{ end }},
    and the {{- / -}} whitespace trims."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    parts = re.split(r"(\{\{.*?\}\})", template, flags=re.DOTALL)
    for index, part in enumerate(parts):   # {{- trims the whitespace before, -}} after
        if part.startswith("{{- ") and index > 0:
            parts[index - 1] = parts[index - 1].rstrip()
        if part.endswith(" -}}") and index + 1 < len(parts):
            parts[index + 1] = parts[index + 1].lstrip()

    def run(pieces: list[str], dot: dict) -> tuple[str, int]:
        out, i = "", 0
        while i < len(pieces):
            piece = pieces[i]
            action = re.fullmatch(r"\{\{-? (.*?) -?\}\}", piece, re.DOTALL)
            if not action:
                out, i = out + piece, i + 1
                continue
            words = action.group(1).split()
            if words == ["end"]:
                return out, i
            if words[0] == "range":
                body = pieces[i + 1:]
                length = 0
                for item in dot[words[1][1:]]:
                    text, length = run(body, item)
                    out += text
                if not dot[words[1][1:]]:
                    _, length = run(body, {"Role": "", "Content": ""})
                i += length + 2
                continue
            assert len(words) == 1 and words[0].startswith("."), f"not supported here: {piece}"
            out, i = out + str(dot[words[0][1:]]), i + 1
        return out, i

    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return run(parts, data)[0]


def jinja(chat_template: str, messages: list[dict]) -> str:
    """The prompt transformers builds (the tokenize stage's, through apply_chat_template)."""
    return render_jinja_template([messages], chat_template=chat_template, add_generation_prompt=True)[0][0]


def commands(text: str, name: str) -> list[str]:
    return [value for command, value in parse_modelfile(text) if command == name]


# --- a ChatML model: SmolLM2 ----------------------------------------------------------------------------------------

def test_a_chatml_modelfile_names_the_gguf_its_template_system_and_stop_tokens():
    text = modelfile("model-q4_k_m.gguf", ["<|im_end|>", "<|endoftext|>"], SMOLLM2_CHAT_TEMPLATE)
    assert text.startswith("# Ollama Modelfile for model-q4_k_m.gguf")
    assert "\nFROM ./model-q4_k_m.gguf\n" in text and from_target(text) == "./model-q4_k_m.gguf"
    assert ('\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n') in text
    assert ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
            '<|im_start|>assistant\n"""\n') in text
    assert f'\nSYSTEM "{SMOLLM2_DEFAULT_SYSTEM}"\n' in text
    assert "temperature" not in text and "LICENSE" not in text
    parsed = parse_modelfile(text)   # as Ollama reads it
    assert [name for name, _ in parsed] == ["model", "template", "system", "stop", "stop"]
    assert commands(text, "template") == [CHATML_TEMPLATE] and commands(text, "system") == [SMOLLM2_DEFAULT_SYSTEM]
    assert commands(text, "stop") == ["<|im_end|>", "<|endoftext|>"]


@pytest.mark.parametrize("messages", [TWO_TURNS, WITH_SYSTEM], ids=["without-system", "with-system"])
def test_the_template_renders_the_jinja_prompt_text(messages):
    text = modelfile("model-f16.gguf", ["<|im_end|>"], SMOLLM2_CHAT_TEMPLATE)
    (template,), system = commands(text, "template"), commands(text, "system")
    ollama = render_go(template, messages, system[0] if system else None)
    assert ollama == jinja(SMOLLM2_CHAT_TEMPLATE, messages)
    system_text = "Answer in one sentence." if messages is WITH_SYSTEM else SMOLLM2_DEFAULT_SYSTEM
    assert ollama == (f"<|im_start|>system\n{system_text}<|im_end|>\n"
                      "<|im_start|>user\nWhat does os.path.join do?<|im_end|>\n"
                      "<|im_start|>assistant\nIt joins path components.<|im_end|>\n"
                      "<|im_start|>user\nAnd on Windows?<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_the_real_smollm2_template_is_recognised_and_rendered_alike(smollm2_tokenizer):
    """The tokenizer the tiny test model and the embedded base model carry (tests/conftest.py)."""
    template = smollm2_tokenizer.chat_template
    assert chatml_format(template) == ChatML(SMOLLM2_DEFAULT_SYSTEM)
    text = modelfile("model-f16.gguf", [smollm2_tokenizer.convert_ids_to_tokens(2)], template)
    assert commands(text, "stop") == ["<|im_end|>"]
    for messages in (TWO_TURNS, WITH_SYSTEM):
        expected = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go(commands(text, "template")[0], messages, commands(text, "system")[0]) == expected


def test_chatml_without_a_default_system_message_gets_no_system():
    assert chatml_format(PLAIN_CHATML) == ChatML(None)
    text = modelfile("model-q8_0.gguf", ["<|im_end|>"], PLAIN_CHATML)
    assert commands(text, "template") == [CHATML_TEMPLATE] and commands(text, "system") == []
    for messages in (TWO_TURNS, WITH_SYSTEM):
        assert render_go(CHATML_TEMPLATE, messages, None) == jinja(PLAIN_CHATML, messages)


# --- other templates ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    ZEPHYR,
    "{{ bos_token }}" + PLAIN_CHATML,   # ChatML after a BOS token: Ollama's ChatML would drop the BOS
    PLAIN_CHATML.replace("'\n'}}{% endfor %}", "'\n\n'}}{% endfor %}"),   # a blank line between turns
    "{{ raise_exception('Conversation roles must alternate') }}",
    "{% for message in messages %}{{ message.content | nosuchfilter }}{% endfor %}",
], ids=["zephyr", "bos-then-chatml", "blank-line-between-turns", "raises", "unknown-filter"])
def test_an_unrecognised_template_gets_no_template_and_says_ollama_reads_the_ggufs(template):
    assert chatml_format(template) is None
    text = modelfile("model-f16.gguf", ["</s>"], template)
    assert commands(text, "template") == [] and commands(text, "system") == [] and "\nTEMPLATE" not in text
    assert ("# No TEMPLATE: the model's chat template is not ChatML, so Ollama reads the GGUF's own\n"
            "# tokenizer.chat_template and derives its prompt template from it.") in text
    assert commands(text, "stop") == ["</s>"] and from_target(text) == "./model-f16.gguf"


def test_a_gguf_without_a_chat_template_says_so():
    text = modelfile("model-f16.gguf", ["</s>"], None)
    assert "\nTEMPLATE" not in text and "the GGUF has no tokenizer.chat_template" in text
    parse_modelfile(text)


# --- the license block --------------------------------------------------------------------------------------------

def test_the_license_block_holds_the_concluded_license_and_its_obligations():
    license_text = ("Apache-2.0 AND CC-BY-NC-4.0\n\nCommercial use: not allowed, because of lab_notes (CC-BY-NC-4.0).\n"
                    "\nAttribution notices to keep:\n- forum_answers (CC-BY-SA-4.0): credit the \"creators\"")
    text = modelfile("model-q4_k_m.gguf", ["<|im_end|>"], SMOLLM2_CHAT_TEMPLATE, license_text)
    assert f'\nLICENSE """{license_text}"""\n' in text   # triple quotes: it spans lines
    assert commands(text, "license") == [license_text]
    assert [name for name, _ in parse_modelfile(text)][-1] == "license"


def test_license_text_that_would_close_the_block_early_is_made_safe():
    hostile = 'MIT\nnotice: """\nFROM ./evil.gguf\nPARAMETER stop "x"\r\nend\x00'
    text = modelfile("model-f16.gguf", ["<|im_end|>"], None, hostile)
    (license_text,) = commands(text, "license")
    assert license_text == "MIT\nnotice: '''\nFROM ./evil.gguf\nPARAMETER stop \"x\"\nend"
    assert from_target(text) == "./model-f16.gguf" and commands(text, "stop") == ["<|im_end|>"]


# --- values a Modelfile cannot hold -------------------------------------------------------------------------------

@pytest.mark.parametrize("gguf_file", ["", "../model.gguf", "models/gguf/model.gguf", " model.gguf", "a\nFROM b"])
def test_from_names_a_plain_file_beside_the_modelfile(gguf_file):
    with pytest.raises(ModelfileError, match="FROM names a file beside the Modelfile"):
        modelfile(gguf_file, ["<|im_end|>"], None)


@pytest.mark.parametrize("token, complaint", [('say """', 'cannot hold """'), ("", "empty"), ("a\x01", "drops")])
def test_a_stop_token_that_cannot_be_written_exactly_is_an_error(token, complaint):
    with pytest.raises(ModelfileError, match=complaint):
        modelfile("model-f16.gguf", [token], None)


def test_stop_tokens_with_quotes_or_spaces_read_back_exactly():
    tokens = ['"', ' <|end|> ', 'a "quoted" token', "</s>"]
    text = modelfile("model-f16.gguf", tokens, None)
    assert commands(text, "stop") == tokens


# --- the parser port: Ollama's own examples and errors ------------------------------------------------------------

def test_the_parser_reads_ollamas_documented_forms():
    text = ('# comment\nFROM llama3.2\n# sets the temperature\nPARAMETER temperature 1\nPARAMETER num_ctx 4096\n'
            'SYSTEM You are Mario from super mario bros, acting as an assistant.\n'
            'MESSAGE user Is Toronto in Canada?\nMESSAGE assistant yes\n'
            'TEMPLATE """{{ if .System }}<|system|>\n{{ .System }}{{ end }}"""\nlicense """MIT\n\nText"""\n')
    assert parse_modelfile(text) == [
        ("model", "llama3.2"), ("temperature", "1"), ("num_ctx", "4096"),
        ("system", "You are Mario from super mario bros, acting as an assistant."),
        ("message", "user: Is Toronto in Canada?"), ("message", "assistant: yes"),
        ("template", "{{ if .System }}<|system|>\n{{ .System }}{{ end }}"), ("license", "MIT\n\nText")]


@pytest.mark.parametrize("text, complaint", [
    ("PARAMETER stop x\n", "no FROM line"),
    ('FROM ./a.gguf\nLICENSE """never closed\n', "end of file inside a quoted value"),
    ("FROM ./a.gguf\nCOPY x\n", "'COPY' is not a Modelfile command"),
    ("FROM ./a.gguf\nMESSAGE tool hi\n", "a MESSAGE role is system, user or assistant"),
])
def test_the_parser_fails_where_ollama_fails(text, complaint):
    with pytest.raises(ModelfileError, match=complaint):
        parse_modelfile(text)
    assert from_target(text) is None
