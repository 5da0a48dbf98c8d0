"""Conversations and the terminal loop: each model keeps its own history (the model sees every previous turn), an
answer is printed as it streams, stripped of leading and trailing whitespace as the pipeline's checks compare
answers, and a turn enters the history only once every model has answered it (Ctrl-C drops it)."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import TextIO

from ftpipe.chat.backends import Sampling
from ftpipe.core.errors import PipelineError

PROMPT = "you> "
COMMANDS = "/reset clears the history, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"


class StrippedWriter:
    """Writes streamed pieces to `out` as they come, minus leading and trailing whitespace: trailing whitespace is
    held back until more text follows it, so what is printed is exactly the whole answer's .strip()."""

    def __init__(self, out: TextIO):
        self.out, self.text, self._pending = out, "", ""

    def write(self, piece: str) -> None:
        if not self.text:
            piece = piece.lstrip()
        body = piece.rstrip()
        if body:
            self.out.write(self._pending + body)
            self.out.flush()
            self.text += self._pending + body
            self._pending = piece[len(body):]
        elif self.text:
            self._pending += piece


@dataclass
class Chat:
    label: str | None     # printed above each answer when several models answer (side by side)
    backend: object       # a backends.TransformersChat or LlamaCppChat
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": user_text}]

    def answer(self, user_text: str, sampling: Sampling, out: TextIO) -> str:
        """Stream the answer to `out` (and a newline); return it stripped. The history is not changed."""
        writer = StrippedWriter(out)
        stream = self.backend.stream(self.messages(user_text), sampling)
        try:
            for piece in stream:
                writer.write(piece)
        finally:
            stream.close()   # on Ctrl-C: stops the generation before the next turn starts one
        out.write("\n")
        out.flush()
        return writer.text

    def commit(self, user_text: str, answer: str) -> None:
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]


def turn(chats: list[Chat], user_text: str, sampling: Sampling, out: TextIO) -> None:
    """Every chat answers `user_text`, one after the other; the turn is then added to each one's history."""
    answers = []
    for chat in chats:
        if chat.label:
            out.write(f"--- {chat.label} ---\n")
        answers.append(chat.answer(user_text, sampling, out))
    for chat, answer in zip(chats, answers):
        chat.commit(user_text, answer)


def interactive(chats: list[Chat], sampling: Sampling, out: TextIO | None = None) -> int:
    """The multi-turn loop, answering on `out` (stdout); returns the exit code: 0, or 130 after Ctrl-C at the prompt."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401 - line editing and ↑ history for input(), where the platform has it
    except ImportError:
        pass
    while True:
        try:
            line = input(PROMPT)
        except EOFError:   # Ctrl-D or the end of piped input
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 130
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            for chat in chats:
                chat.history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if re.fullmatch(r"/[a-z]+", text):   # a mistyped command, not a question about a path such as /etc/hosts
            print(f"unknown command {text}: {COMMANDS}", file=sys.stderr)
            continue
        try:
            turn(chats, text, sampling, out)
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            print("(answer stopped: this turn is left out of the history)", file=sys.stderr)
        except PipelineError as error:   # e.g. the conversation outgrew the context: the session goes on
            print(f"error: {error}", file=sys.stderr)
