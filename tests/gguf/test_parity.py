"""ftpipe.gguf.parity.chat_prompt_mismatches pairs each labelled assistant turn with its prompt, also when a chat
template leaves earlier turns unlabelled (Qwen3, Mistral with a system message: ftpipe.data.chat_tokens), and a
prompt no turn matches is a mismatch shown against the closest one. llama.cpp is stood in for by prompts per turn."""
from ftpipe.gguf import parity
from ftpipe.model.modeling import IGNORE_INDEX

X = IGNORE_INDEX   # a position without a label
MESSAGES = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]


class FakeLlama:
    """llama.cpp's chat path as a table: the prompt tokens it builds for the conversation before each answer."""

    def __init__(self, prompts: dict[int, list[int]]):
        self.prompts, self.asked = prompts, []

    def prompt(self, messages) -> list[int]:
        self.asked.append(len(messages))
        return self.prompts[len(messages)]

    def detokenize(self, tokens, special=True) -> bytes:
        return " ".join(map(str, tokens)).encode()


def check(monkeypatch, llm, row):
    monkeypatch.setattr(parity, "chat_prompt_tokens", lambda model, messages: model.prompt(messages))
    return parity.chat_prompt_mismatches(llm, [row], {"r": MESSAGES}, "test")


def test_every_labelled_turn_is_compared_with_its_own_prompt(monkeypatch):
    # 10 11 | 12 (first answer) | 13 | 14 (second answer)
    row = {"id": "r", "input_ids": [10, 11, 12, 13, 14], "labels": [X, X, 12, X, 14]}
    llm = FakeLlama({1: [10, 11], 3: [10, 11, 12, 13]})
    assert check(monkeypatch, llm, row) == (2, [])
    assert llm.asked == [1, 3]   # one prompt a turn, as before


def test_an_unlabelled_earlier_turn_is_skipped(monkeypatch):
    # the template writes the first answer differently in the history: only the last one is labelled
    row = {"id": "r", "input_ids": [10, 11, 12, 13, 14], "labels": [X, X, X, X, 14]}
    llm = FakeLlama({1: [10, 11, 99], 3: [10, 11, 12, 13]})
    assert check(monkeypatch, llm, row) == (1, [])


def test_a_prompt_no_turn_builds_is_a_mismatch_against_the_closest(monkeypatch):
    row = {"id": "r", "input_ids": [10, 11, 12, 13, 14], "labels": [X, X, 12, X, 14]}
    llm = FakeLlama({1: [10, 11], 3: [10, 11, 12, 77]})
    compared, mismatches = check(monkeypatch, llm, row)
    assert compared == 2
    assert mismatches == [parity.PromptMismatch("r", 1, "10 11 12 13", "10 11 12 77")]
