"""The one chat template the pipeline trains, evaluates and ships with, chosen by params.yaml `tokenize`.

    tokenize.chat_template          null: the base model's own; a built-in name (ftpipe/chat_templates/<name>.jinja);
                                    or the path of a .jinja file in this repository
    tokenize.chat_template_kwargs   template variables, e.g. {enable_thinking: false} for Qwen3
    tokenize.system_prompt          a system turn for every conversation that has none

The kwargs and the system prompt are written into the template text itself, as a Jinja prelude:

    {%- set enable_thinking = false -%}
    {%- if not messages or messages[0]['role'] != 'system' -%}
    {%- set messages = [{'role': 'system', 'content': "Be brief."}] + messages -%}
    {%- endif -%}

A top-level `set` shadows the variable a caller passes, and a `set` inside a top-level `if` is seen after it
(Jinja2's scoping: in transformers' apply_chat_template and in llama-cpp-python's Jinja2ChatFormatter alike), so
the one text renders the same everywhere without extra arguments: transformers (tokenize, evaluate, chat), llama.cpp
(the GGUF checks, serving) and any runtime that runs the template. The tokenize stage saves it as
data/tokenized/chat_template.jinja; evaluate renders with it (load_chat_tokenizer) and the merged model carries it
(install_chat_template), so every GGUF has it too.
"""
from __future__ import annotations

import json
import keyword
import math
import re
import shutil
from pathlib import Path
from typing import Any

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import atomic_write_text, read_json, sha256_text, write_json
from ftpipe.core.params import TokenizeParams
from ftpipe.core.paths import TOKENIZED_DIR

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "chat_templates"   # package data: ftpipe/chat_templates/*.jinja
TEMPLATE_FILE = "chat_template.jinja"   # the tokenize stage's copy, and the file transformers and the converter read
TOKENIZER_CONFIG = "tokenizer_config.json"
# Files and folders of a model folder that hold other templates: an install removes them, so that no runtime picks
# one (transformers reads additional_chat_templates/ as named templates; chat_template.json is the legacy file).
STALE_TEMPLATE_FILES = ("chat_template.json", "additional_chat_templates")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Names a prelude must not set: what every caller passes, or what Jinja itself means.
RESERVED_NAMES = {"messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token",
                  "raise_exception", "strftime_now", "loop", "namespace", "range", "true", "false", "none",
                  "True", "False", "None"}


def builtin_templates() -> list[str]:
    """The built-in template names, sorted: ftpipe/chat_templates/<name>.jinja."""
    return sorted(path.stem for path in BUILTIN_DIR.glob("*.jinja"))


def model_chat_template(base_dir: Path) -> str | None:
    """The base model's own chat template, as transformers loads it (its default one if it has several)."""
    from ftpipe.model.modeling import load_tokenizer

    template = load_tokenizer(base_dir).chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def jinja_literal(value: Any, key: str = "value") -> str:
    """`value` as a Jinja literal that evaluates back to it: none, true/false, numbers, strings (JSON-escaped, which
    Jinja's string literals read), lists and string-keyed mappings of these. Anything else is an error naming `key`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PipelineError(f"params.yaml {key}: {value} is not a number a template can read")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(jinja_literal(item, key) for item in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(name, str) for name in value):
            raise PipelineError(f"params.yaml {key}: mapping keys must be strings")
        return "{" + ", ".join(f"{json.dumps(name, ensure_ascii=False)}: {jinja_literal(item, key)}"
                               for name, item in value.items()) + "}"
    raise PipelineError(f"params.yaml {key}: {value!r} ({type(value).__name__}) is not a value a template can read: "
                        f"use null, true/false, a number, a string, a list or a mapping")


def prelude(kwargs: dict[str, Any], system_prompt: str | None) -> str:
    """The Jinja lines that bake `kwargs` and `system_prompt` into a template ('' when there is neither)."""
    lines = []
    for name, value in kwargs.items():
        if not isinstance(name, str) or not IDENTIFIER.match(name) or keyword.iskeyword(name) \
                or name in RESERVED_NAMES:
            raise PipelineError(f"params.yaml tokenize.chat_template_kwargs: {name!r} cannot be a template variable: "
                                f"use a name of letters, digits and _ that the template reads (not one of "
                                f"{sorted(RESERVED_NAMES)})")
        lines.append(f"{{%- set {name} = {jinja_literal(value, f'tokenize.chat_template_kwargs.{name}')} -%}}")
    if system_prompt is not None:
        lines += ["{%- if not messages or messages[0]['role'] != 'system' -%}",
                  f"{{%- set messages = [{{'role': 'system', 'content': "
                  f"{jinja_literal(system_prompt, 'tokenize.system_prompt')}}}] + messages -%}}",
                  "{%- endif -%}"]
    if not lines:
        return ""
    return ("{#- ftpipe: params.yaml tokenize.chat_template_kwargs and tokenize.system_prompt, written into the "
            "template so that every runtime renders it the same without extra arguments -#}\n"
            + "\n".join(lines) + "\n")


def bake(template: str, kwargs: dict[str, Any], system_prompt: str | None) -> str:
    """`template` with `kwargs` and `system_prompt` written in front of it; unchanged when there is neither."""
    return prelude(kwargs, system_prompt) + template


def check_syntax(text: str, what: str) -> None:
    """A template Jinja cannot parse is an error naming where it came from (before any conversation is rendered)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.add_extension(_generation_tag())
    try:
        environment.parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise PipelineError(f"{what}: not a valid Jinja template (line {err.lineno}: {err.message})") from err


def _generation_tag():
    """transformers' `{% generation %}` tag, parsed as a plain block (llama-cpp-python does the same)."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


def resolve_chat_template(params: TokenizeParams, base_dir: Path) -> dict[str, Any]:
    """The effective template: {text, source ('model', 'builtin' or 'file'), name (the built-in name, the file's path
    or the base model folder), sha256 (of text), template_sha256 (of the template before baking), kwargs,
    system_prompt}. `text` is the chosen template with tokenize.chat_template_kwargs and tokenize.system_prompt
    baked in."""
    choice = params.chat_template
    builtins = builtin_templates()
    listing = ", ".join(builtins)
    if choice is None:
        source, name, template = "model", str(base_dir), model_chat_template(base_dir)
        if template is None:
            raise PipelineError(
                f"the base model ({base_dir}) is a base (non-instruct) model without a chat template, and "
                f"params.yaml tokenize.chat_template is null (the model's own). Choose one: "
                f"`tokenize.chat_template: chatml` (or another built-in: {listing}; or the path of a .jinja file in "
                f"this repository).")
    elif choice in builtins:
        source, name, template = "builtin", choice, (BUILTIN_DIR / f"{choice}.jinja").read_text(encoding="utf-8")
    elif choice.endswith(".jinja"):
        path = Path(choice)
        if not path.is_file():
            raise PipelineError(f"params.yaml tokenize.chat_template: {choice}: no such file (a .jinja file of this "
                                f"repository, relative to its root), and not a built-in name ({listing})")
        source, name, template = "file", choice, path.read_text(encoding="utf-8")
    else:
        raise PipelineError(f"params.yaml tokenize.chat_template: {choice!r} is not a built-in template. The built-ins "
                            f"are: {listing} (ftpipe/chat_templates/); or give the path of a .jinja file, or null for "
                            f"the base model's own template.")
    check_syntax(template, f"chat template {name} ({source})")
    text = bake(template, dict(params.chat_template_kwargs), params.system_prompt)
    check_syntax(text, "params.yaml tokenize.chat_template_kwargs / tokenize.system_prompt written into the template")
    return {"text": text, "source": source, "name": name, "sha256": sha256_text(text),
            "template_sha256": sha256_text(template), "kwargs": dict(params.chat_template_kwargs),
            "system_prompt": params.system_prompt}


def apply_chat_template_to(tokenizer, text: str):
    """`tokenizer` rendering with `text` (the effective template) from now on; returns it."""
    tokenizer.chat_template = text
    return tokenizer


def saved_chat_template(tokenized_dir: Path = TOKENIZED_DIR) -> str:
    """The effective template the tokenize stage saved (data/tokenized/chat_template.jinja)."""
    path = Path(tokenized_dir) / TEMPLATE_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: not found. Run `dvc repro tokenize` first (it saves the chat template it "
                            f"tokenized with).")
    return path.read_text(encoding="utf-8")


def load_chat_tokenizer(base_dir: Path, tokenized_dir: Path = TOKENIZED_DIR):
    """The base model's tokenizer with the chat template the tokenize stage saved: prompts rendered as the
    training data was."""
    from ftpipe.model.modeling import load_tokenizer

    return apply_chat_template_to(load_tokenizer(base_dir), saved_chat_template(tokenized_dir))


def install_chat_template(model_dir: Path, tokenized_dir: Path = TOKENIZED_DIR) -> str:
    """Write the tokenize stage's template into a saved model folder, where every reader finds it; return it.

    transformers 5 reads chat_template.jinja (over tokenizer_config.json's "chat_template"); llama.cpp's converter
    (the gguf package's SpecialVocab) reads tokenizer_config.json's "chat_template" (over chat_template.jinja): both
    get the same text. Other templates of the folder (chat_template.json, additional_chat_templates/) are removed."""
    text = saved_chat_template(tokenized_dir)
    model_dir = Path(model_dir)
    config_path = model_dir / TOKENIZER_CONFIG
    if not config_path.is_file():
        raise PipelineError(f"{model_dir}: no {TOKENIZER_CONFIG}: save the tokenizer into the folder first")
    for stale in STALE_TEMPLATE_FILES:
        path = model_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    atomic_write_text(model_dir / TEMPLATE_FILE, text)
    config = read_json(config_path)
    config["chat_template"] = text
    write_json(config_path, config)
    return text
