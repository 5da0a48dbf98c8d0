"""An Ollama Modelfile for a GGUF: `ollama create NAME -f Modelfile` in the folder that holds both.

    text = modelfile("model-q4_k_m.gguf", ["<|im_end|>"], chat_template, license_text)

What it writes, and why each line is there:

- `FROM ./model-<type>.gguf`: relative to the Modelfile's folder (Ollama resolves a relative FROM against it),
  so the folder can be moved or published as a whole.
- `TEMPLATE` and `SYSTEM`, only for a ChatML chat template (`<|im_start|>role\\n...<|im_end|>\\n`, as SmolLM2's):
  Ollama derives a Go template from the GGUF's tokenizer.chat_template only for templates it recognises, by
  similarity to its own list, and never runs the Jinja itself, so a default system message the Jinja template
  injects (SmolLM2's "You are a helpful AI assistant named SmolLM, ...") would be lost. The explicit TEMPLATE
  renders every message, system messages included; SYSTEM is the message Ollama puts first when a conversation
  has no system message of its own, which is exactly when the Jinja template injects its default. The template
  is recognised by behaviour, not by its text: the Jinja is rendered (as transformers renders it) on probe
  conversations and must give exactly the ChatML text, with or without a system message.
  Any other template gets no TEMPLATE, and a comment saying Ollama reads the GGUF's own template.
- `PARAMETER stop "<token>"`: one per end-of-turn token of the merged model, so generation ends where it ends
  in transformers and in llama.cpp. Sampling is left to Ollama's defaults (no temperature here).
- `LICENSE \"\"\"...\"\"\"`: the concluded license and the obligations that travel with the model
  (`ollama show --license`).

Why written here: no maintained Python library writes Modelfiles (Ollama's own parser and writer are Go, in
ollama/ollama parser/parser.go; LLaMA-Factory and Unsloth build theirs with string formatting inside their
trainers). The quoting rules are Ollama's parser's: a value is one line, or `"..."`, or `\"\"\"...\"\"\"` across
lines, with no escapes at all; a value ends at the first end of line where it is closed, so a triple-quoted value
must not contain three double quotes, and characters that are not printable are dropped. parse_modelfile() is a
port of that parser: the tests and `python -m ftpipe.release.verify` read Modelfiles with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

MODELFILE = "Modelfile"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GENERATION_PROMPT = f"{IM_START}assistant\n"
# Every message as <|im_start|>role\ncontent<|im_end|>\n, then the assistant's turn: ChatML, as a Go template.
# .Messages holds the system messages too (Ollama's template.Execute keeps them in order).
CHATML_TEMPLATE = (f"{{{{- range .Messages }}}}{IM_START}{{{{ .Role }}}}\n{{{{ .Content }}}}{IM_END}\n{{{{ end }}}}"
                   f"{GENERATION_PROMPT}")
TRIPLE = '"""'
# Probe conversations for recognising ChatML: with and without a system message, one and two user turns.
_PROBES = (
    [{"role": "user", "content": "Probe question one?"}],
    [{"role": "user", "content": "Probe question one?"}, {"role": "assistant", "content": "Probe answer one."},
     {"role": "user", "content": "Probe question two?"}],
    [{"role": "system", "content": "Probe system message."}, {"role": "user", "content": "Probe question one?"}],
    [{"role": "system", "content": "Probe system message."}, {"role": "user", "content": "Probe question one?"},
     {"role": "assistant", "content": "Probe answer one."}, {"role": "user", "content": "Probe question two?"}],
)
# A template that prints the BOS or EOS token is not plain ChatML: these make such output differ.
_SPECIAL_SENTINELS = {"bos_token": "<ftpipe-bos-sentinel>", "eos_token": "<ftpipe-eos-sentinel>"}


class ModelfileError(ValueError):
    """A value a Modelfile cannot hold exactly (Ollama's parser has no escapes)."""


@dataclass(frozen=True)
class ChatML:
    """A ChatML chat template; `default_system` is the system message it adds when a conversation has none."""
    default_system: str | None


def chatml_text(messages: Sequence[dict]) -> str:
    """The ChatML prompt of `messages`, ending with the assistant's generation prompt."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages) + GENERATION_PROMPT


def render_jinja(chat_template: str, messages: Sequence[dict]) -> str:
    """`chat_template` applied as transformers applies it (sandboxed Jinja, trim_blocks, lstrip_blocks), with the
    generation prompt."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(chat_template).render(messages=list(messages), add_generation_prompt=True,
                                                         **_SPECIAL_SENTINELS)


def chatml_format(chat_template: str | None) -> ChatML | None:
    """ChatML(default system message) when `chat_template` renders every probe conversation exactly as ChatML
    (with its default system message first where the conversation has none); None for any other template."""
    from jinja2.exceptions import TemplateError

    if not chat_template:
        return None
    try:
        first = render_jinja(chat_template, _PROBES[0])
        plain = chatml_text(_PROBES[0])
        if not first.endswith(plain):
            return None
        injected = re.fullmatch(rf"{re.escape(IM_START)}system\n(.*){re.escape(IM_END)}\n",
                                first[:-len(plain)], re.DOTALL)
        if first != plain and (injected is None or not injected.group(1)):
            return None   # something else before the conversation (an empty default system: Ollama adds none)
        default_system = injected.group(1) if injected else None
        for probe in _PROBES:
            implied = ([{"role": "system", "content": default_system}]
                       if default_system is not None and probe[0]["role"] != "system" else [])
            if render_jinja(chat_template, probe) != chatml_text(implied + probe):
                return None
    except (TemplateError, TypeError, KeyError, IndexError, AttributeError):
        return None   # a template that fails on a plain conversation is not one this module can translate
    return ChatML(default_system)


# --- writing ------------------------------------------------------------------------------------------------------

def quote(value: str, what: str) -> str:
    """`value` as Ollama's parser reads it back exactly: "..." on one line, \"\"\"...\"\"\" across lines or with
    quotes inside. ModelfileError when no quoting can hold it."""
    unprintable = sorted({char for char in value if not (char.isprintable() or char in "\n\t")})
    if unprintable:
        raise ModelfileError(f"{what}: Ollama's Modelfile parser drops the characters {unprintable!r}")
    if TRIPLE in value:
        raise ModelfileError(f"{what}: a Modelfile value cannot hold {TRIPLE} (Ollama's parser has no escapes)")
    if not value:
        raise ModelfileError(f"{what}: empty")
    return f"{TRIPLE}{value}{TRIPLE}" if "\n" in value or '"' in value else f'"{value}"'


def sanitize_text(text: str) -> str:
    """Free text (declared notices, notes) made writable: runs of three or more double quotes become single
    quotes, carriage returns become line ends, other unprintable characters are dropped."""
    text = re.sub(r'"{3,}', lambda run: "'" * len(run.group(0)), text.replace("\r\n", "\n").replace("\r", "\n"))
    return "".join(char for char in text if char.isprintable() or char in "\n\t")


def modelfile(gguf_file: str, stop_tokens: Sequence[str], chat_template: str | None,
              license_text: str | None = None) -> str:
    """The Modelfile of the GGUF `gguf_file` (a file name: the Modelfile sits beside it)."""
    plain_name = gguf_file and gguf_file.isprintable() and gguf_file == gguf_file.strip()
    if not plain_name or "/" in gguf_file or "\\" in gguf_file:
        raise ModelfileError(f"{gguf_file!r}: FROM names a file beside the Modelfile, by its plain file name")
    lines = [f"# Ollama Modelfile for {gguf_file}, written by ftpipe (ftpipe/gguf/modelfile.py).",
             "# In this folder: ollama create NAME -f Modelfile, then ollama run NAME.",
             f"FROM ./{gguf_file}", ""]
    chatml = chatml_format(chat_template)
    if chatml is not None:
        lines += ["# The model's chat template is ChatML: the same prompt as a Go template, system messages included.",
                  f"TEMPLATE {quote(CHATML_TEMPLATE, 'TEMPLATE')}"]
        if chatml.default_system is not None:
            lines += ["# The system message the chat template adds when a conversation has none; Ollama puts it",
                      "# first in exactly that case.", f"SYSTEM {quote(chatml.default_system, 'SYSTEM')}"]
    elif chat_template:
        lines += ["# No TEMPLATE: the model's chat template is not ChatML, so Ollama reads the GGUF's own",
                  "# tokenizer.chat_template and derives its prompt template from it."]
    else:
        lines += ["# No TEMPLATE: the GGUF has no tokenizer.chat_template; Ollama sends prompts as they are."]
    lines += ["", "# Generation ends at the model's end-of-turn token(s)."]
    lines += [f"PARAMETER stop {quote(token, 'PARAMETER stop')}" for token in stop_tokens]
    if license_text:
        lines += ["", f"LICENSE {quote(sanitize_text(license_text).strip(), 'LICENSE')}"]
    return "\n".join(lines) + "\n"


# --- reading: Ollama's parser (parser/parser.go ParseFile), ported ------------------------------------------------

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)
COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message",
            "requires")


def _unquote(value: str) -> tuple[str, bool]:
    if value.startswith(TRIPLE):
        return (value[3:-3], True) if len(value) >= 6 and value.endswith(TRIPLE) else ("", False)
    if value.startswith('"'):
        return (value[1:-1], True) if len(value) >= 2 and value.endswith('"') else ("", False)
    return value, True


def _next_state(char: str, state: int) -> tuple[int, str]:
    space, newline = char in " \t", char in "\r\n"
    if state == _NIL:
        return (_COMMENT, "") if char == "#" else (_NIL, "") if space or newline else (_NAME, char)
    if state == _NAME:
        if char.isascii() and char.isalpha():
            return _NAME, char
        if space:
            return _VALUE, ""
        raise ModelfileError("invalid command")
    if state == _VALUE:
        return (_NIL, char) if space or newline else (_VALUE, char)
    if state in (_PARAMETER, _MESSAGE):
        if char.isascii() and (char.isalpha() or (state == _PARAMETER and (char.isdigit() or char == "_"))):
            return state, char
        if space:
            return _VALUE, ""
        raise ModelfileError("unexpected end of a parameter or message")
    return (_NIL, "") if newline else (_COMMENT, "")   # a comment runs to the end of its line


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama reads `text`: FROM is "model", a PARAMETER is its name ("stop"), values are
    unquoted. ModelfileError (with the line) where Ollama's parser fails."""
    commands: list[tuple[str, str]] = []
    state, buffer, name, role, line = _NIL, "", "", "", 1
    for char in text:
        line += char in "\r\n"
        try:
            state_after, kept = _next_state(char, state)
        except ModelfileError as error:
            raise ModelfileError(f"line {line}: {error}") from None
        if state_after != state:
            if state == _NAME:
                command = buffer.lower()
                if command not in COMMANDS:
                    raise ModelfileError(f"line {line}: {buffer!r} is not a Modelfile command")
                name = {"from": "model"}.get(command, command)
                state_after = {"parameter": _PARAMETER, "message": _MESSAGE}.get(command, state_after)
            elif state == _PARAMETER:
                name = buffer
            elif state == _MESSAGE:
                if buffer not in ("system", "user", "assistant"):
                    raise ModelfileError(f"line {line}: a MESSAGE role is system, user or assistant, not {buffer!r}")
                role = buffer
            elif state == _VALUE:
                value, closed = _unquote(buffer.strip())
                if not closed or char in " \t":
                    buffer += char   # inside quotes, or a space within an unquoted value
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buffer, state = "", state_after
        if kept and kept.isprintable():
            buffer += kept
    if state == _VALUE:
        value, closed = _unquote(buffer.strip())
        if not closed:
            raise ModelfileError(f"line {line}: unexpected end of file inside a quoted value")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in (_NIL, _COMMENT):
        raise ModelfileError(f"line {line}: unexpected end of file")
    if not any(command == "model" for command, _ in commands):
        raise ModelfileError("no FROM line")
    return commands


def from_target(text: str) -> str | None:
    """The FROM of a Modelfile (its first), or None where it does not parse."""
    try:
        return next(value for command, value in parse_modelfile(text) if command == "model")
    except ModelfileError:
        return None
