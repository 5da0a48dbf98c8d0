"""The interactive chat as a terminal program, on a pseudo-terminal: the model sees the whole conversation, /reset
starts a fresh one, Ctrl-C stops a streaming answer and returns to the prompt, Ctrl-C at the prompt, Ctrl-D and
/exit leave without a traceback. Mostly a GGUF model (llama.cpp, no torch import: each start takes ~1 s); side by
side, the base and merged models in transformers, each with its own history."""
from __future__ import annotations

import codecs
import fcntl
import os
import select
import subprocess
import termios
import time
from pathlib import Path

import pytest

from ftpipe.chat.backends import DEFAULT_N_CTX
from ftpipe.chat.session import PROMPT
from tests.chat.test_prompt import chat_command, chat_project, direct_gguf_answer, direct_hf_answer

MAX_NEW = 12
QUESTIONS = ["What does os.path.join do?", "And in kelvin?"]


def take_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pseudo-terminal, so that Ctrl-C sends SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`python -m ftpipe.chat ARGS` with stdin, stdout and stderr on a pseudo-terminal, read with a timeout."""

    def __init__(self, args: list[str], cwd: Path):
        master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR   # output "\n" unchanged (not "\r\n"): answers compare as printed
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.process = subprocess.Popen(chat_command(*args), cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                                        preexec_fn=take_terminal, env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.fd, self.output, self.mark = master, "", 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read_until(self, text: str, after: int, timeout: float = 120) -> str:
        """The output from position `after` up to the end of the first `text` after it."""
        self._wait(lambda: text in self.output[after:], repr(text), timeout)
        return self.output[after:self.output.index(text, after) + len(text)]

    def read_more(self, after: int, timeout: float = 120) -> None:
        """Wait until something is printed after position `after`."""
        self._wait(lambda: len(self.output) > after, "more output", timeout)

    def _wait(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {timeout} s; the terminal shows {self.output!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:   # EIO: the program closed the terminal
                    data = b""
                assert data, f"the program ended before printing {what}: {self.output!r}"
                self.output += self._decoder.decode(data)

    def send(self, data: bytes) -> int:
        """Type `data`; returns the output position before it, for read_until."""
        start = len(self.output)
        os.write(self.fd, data)
        return start

    def say(self, line: str) -> str:
        """Type a line, wait for the next prompt; returns what was printed in between (the answer)."""
        shown = self.read_until(PROMPT, self.send(line.encode() + b"\n"))
        echoed, _, printed = shown.partition("\n")
        assert echoed.endswith(line)
        return printed.removesuffix(PROMPT)

    def exit_code(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        while select.select([self.fd], [], [], 0)[0]:   # the last words, for the traceback check
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                break
            if not data:
                break
            self.output += self._decoder.decode(data)
        os.close(self.fd)
        return code


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base, tiny_trained, tiny_merged) -> Path:
    return chat_project(tmp_path_factory, tiny_base, tiny_trained["adapter"], tiny_merged)


@pytest.fixture
def terminals():
    opened: list[Terminal] = []
    yield lambda *args, cwd: opened.append(Terminal(list(args), cwd)) or opened[-1]
    for terminal in opened:
        if terminal.process.poll() is None:
            terminal.process.kill()
            terminal.process.wait()


def test_history_reset_and_exit(project, terminals):
    from ftpipe.gguf.runtime import open_gguf

    gguf = project / "models" / "gguf" / "model-f16.gguf"
    llm = open_gguf(gguf, DEFAULT_N_CTX)   # the same calls, in the same order, as the chat makes
    first = direct_gguf_answer(llm, [{"role": "user", "content": QUESTIONS[0]}], MAX_NEW)
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": first},
               {"role": "user", "content": QUESTIONS[1]}]
    second = direct_gguf_answer(llm, history, MAX_NEW)
    fresh = direct_gguf_answer(llm, [{"role": "user", "content": QUESTIONS[1]}], MAX_NEW)
    assert first and second != fresh   # else the answers could not tell whether the history is kept

    chat = terminals("--model", "gguf", "--max-new-tokens", str(MAX_NEW), cwd=project)
    banner = chat.read_until(PROMPT, 0)
    assert f"ftpipe chat with gguf:f16: {Path('models/gguf/model-f16.gguf')} (llama.cpp" in banner
    assert chat.say(QUESTIONS[0]) == first + "\n"
    assert chat.say(QUESTIONS[1]) == second + "\n"
    assert "(history cleared)" in chat.say("/reset")
    assert chat.say(QUESTIONS[1]) == fresh + "\n"
    chat.send(b"/exit\n")
    assert chat.exit_code() == 0
    assert "Traceback" not in chat.output


def test_ctrl_c_stops_the_answer_then_ctrl_d_leaves(project, terminals):
    chat = terminals("--model", "gguf", "--max-new-tokens", "3000", cwd=project)
    chat.read_until(PROMPT, 0)
    start = chat.send(QUESTIONS[0].encode() + b"\n")
    chat.read_more(start + len(chat.read_until("\n", start)))   # the echoed line, then the answer begins
    after = chat.send(b"\x03")
    assert "(answer stopped: this turn is left out of the history)" in chat.read_until(PROMPT, after)
    chat.send(b"\x04")
    assert chat.exit_code() == 0
    assert "Traceback" not in chat.output


def test_ctrl_c_at_the_prompt_leaves_without_traceback(project, terminals):
    chat = terminals("--model", "gguf", cwd=project)
    chat.read_until(PROMPT, 0)
    chat.send(b"\x03")
    assert chat.exit_code() == 130
    assert "Traceback" not in chat.output


def test_side_by_side_keeps_a_history_per_model(project, terminals):
    models = project / "models"
    expected = {}
    for name in ("base", "merged"):
        first = direct_hf_answer(models / name, [{"role": "user", "content": QUESTIONS[0]}])
        expected[name] = [first, direct_hf_answer(models / name, [
            {"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": first},
            {"role": "user", "content": QUESTIONS[1]}])]

    chat = terminals("--side-by-side", "--max-new-tokens", str(MAX_NEW), cwd=project)
    assert "ftpipe chat with base: models/base (transformers on cpu, float32) vs tuned (merged): models/merged" \
        in chat.read_until(PROMPT, 0)
    for turn, question in enumerate(QUESTIONS):
        assert chat.say(question) == (f"--- base ---\n{expected['base'][turn]}\n"
                                      f"--- tuned (merged) ---\n{expected['merged'][turn]}\n")
    chat.send(b"\x04")
    assert chat.exit_code() == 0
