"""Does a GGUF, run by llama.cpp, behave like the merged model it came from? Each check compares llama.cpp's
own tokenizer, logits, chat template and stop tokens with the merged model's (transformers) or with the
tokenize stage's tokens, and says what differs:

- loss: mean cross-entropy of the validation rows' label (assistant) tokens from llama.cpp's logits on the
  very token ids the merged model is scored on;
- tokenizer: llama.cpp encodes each validation text as the merged model's tokenizer does;
- chat prompt: the GGUF's chat template, applied by llama.cpp's chat-completion path, gives the tokenize
  stage's prompt tokens before every assistant turn of the validation conversations;
- stop token: llama.cpp's end-of-sequence token is the merged model's end-of-turn token, and ends generation;
- greedy answers: llama.cpp's greedy chat answers equal the merged model's greedy answers, and stop where
  they stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ftpipe.core.sequences import common_prefix
from ftpipe.model.modeling import IGNORE_INDEX


def llama_loss(llm, rows: Sequence[dict], desc: str) -> float:
    """Token-weighted mean cross-entropy over the label tokens of `rows`, from llama.cpp's logits."""
    total, count = 0.0, 0
    for row in tqdm(rows, desc=desc, unit="row"):
        ids, labels = list(row["input_ids"]), np.asarray(row["labels"])
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)   # position t predicts token t+1
        targets = labels[1:]
        scored = targets != IGNORE_INDEX
        if not scored.any():
            continue
        logits, targets = logits[scored], targets[scored]
        peak = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        total += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        count += int(scored.sum())
    return total / count if count else float("nan")


def tokenizer_mismatches(llm, tokenizer, texts: Sequence[str]) -> list[str]:
    """The texts llama.cpp tokenizes differently from the merged model's tokenizer (special tokens parsed)."""
    return [text for text in texts if llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            != tokenizer(text, add_special_tokens=False)["input_ids"]]


def turn_starts(labels: Sequence[int]) -> list[int]:
    """Positions where each assistant turn's labelled tokens begin (the prompt before it ends there)."""
    return [index for index, label in enumerate(labels)
            if label != IGNORE_INDEX and (index == 0 or labels[index - 1] == IGNORE_INDEX)]


def chat_prompt_tokens(llm, messages: Sequence[dict]) -> list[int]:
    """The prompt tokens llama.cpp's chat-completion path builds for `messages` (GGUF template, generation
    prompt added): evaluated by a one-token completion and read back from its context. A prompt llama.cpp cannot
    evaluate (one its tokenizer makes longer than the context: it splits special tokens it does not know) is an
    error saying so, not llama-cpp-python's own exception."""
    from ftpipe.core.errors import PipelineError

    try:
        response = llm.create_chat_completion(messages=list(messages), max_tokens=1, temperature=0.0)
    except (ValueError, RuntimeError) as error:
        prompt = llm.tokenize(render_gguf_template(llm, messages).encode("utf-8"), add_bos=False, special=True)
        raise PipelineError(
            f"llama.cpp cannot evaluate the chat prompt the GGUF's template builds ({len(prompt)} tokens in a context "
            f"of {len(llm.input_ids)}; the conversation's tokenized text is shorter): its tokenizer splits the prompt "
            f"differently ({_detok(llm, prompt)[-160:]!r}; llama-cpp-python: {error})") from error
    return [int(token) for token in llm.input_ids[:response["usage"]["prompt_tokens"]]]


def render_gguf_template(llm, messages: Sequence[dict]) -> str:
    """The GGUF's chat template applied to `messages` by llama-cpp-python's formatter (as Llama builds its chat
    handler from the GGUF's metadata), generation prompt added."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                    eos_token=_detok(llm, [llm.token_eos()]), bos_token=_detok(llm, [llm.token_bos()]))
    return formatter(messages=list(messages)).prompt


@dataclass
class PromptMismatch:
    row_id: str
    turn: int
    expected: str
    got: str


def chat_prompt_mismatches(llm, rows: Sequence[dict], conversations: dict[str, list[dict]],
                           desc: str) -> tuple[int, list[PromptMismatch]]:
    """(prompts compared, mismatches): the prompt before every labelled assistant turn of every validation row
    whose conversation is known.

    A template may leave earlier assistant turns unlabelled (it writes them differently in the history: Qwen3,
    Mistral with a system message; ftpipe.data.chat_tokens), so each labelled turn is matched, in order, with the
    first remaining assistant turn whose llama.cpp prompt is the tokens before it. One that no turn matches is a
    mismatch, shown against the remaining turn whose prompt agrees with it longest."""
    compared, mismatches = 0, []
    for row in tqdm(rows, desc=desc, unit="row"):
        messages = conversations.get(row["id"])
        if messages is None:
            continue
        assistant_turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        prompts: dict[int, list[int]] = {}

        def prompt(turn: int) -> list[int]:
            if turn not in prompts:
                prompts[turn] = chat_prompt_tokens(llm, messages[:assistant_turns[turn]])
            return prompts[turn]

        next_turn = 0
        for start in turn_starts(list(row["labels"])):
            expected = [int(token) for token in row["input_ids"][:start]]
            remaining = range(next_turn, len(assistant_turns))
            compared += 1
            match = next((turn for turn in remaining if prompt(turn) == expected), None)
            if match is None:   # no remaining turn has this prompt in llama.cpp: show the closest one's
                match = max(remaining, key=lambda turn: common_prefix(prompt(turn), expected), default=None)
                if match is None:   # more labelled turns than assistant turns: not this conversation's tokens
                    mismatches.append(PromptMismatch(row["id"], len(assistant_turns), _detok(llm, expected), ""))
                    break
                mismatches.append(PromptMismatch(row["id"], match, _detok(llm, expected), _detok(llm, prompt(match))))
            next_turn = match + 1
    return compared, mismatches


def _detok(llm, tokens: Sequence[int]) -> str:
    return llm.detokenize(list(tokens), special=True).decode("utf-8", "replace")


def taught_end_of_turn(rows: Sequence[dict], end_of_turn_ids: Sequence[int]) -> list[int]:
    """The end-of-turn tokens the training data teaches the model to end an answer with: those among the label
    tokens (Phi-3's <|end|>, not the <|assistant|> its generation config also stops at)."""
    labelled = {int(label) for row in rows for label in row["labels"] if label != IGNORE_INDEX}
    return [token for token in end_of_turn_ids if token in labelled]


def not_ending_generation(llm, token_ids: Sequence[int]) -> list[int]:
    """The tokens of `token_ids` llama.cpp does not end generation at (not end-of-generation in its vocabulary)."""
    from ftpipe.gguf.runtime import llama_cpp

    vocab = llama_cpp().llama_model_get_vocab(llm.model)
    return [token for token in token_ids if not llama_cpp().llama_vocab_is_eog(vocab, token)]


def stop_token_problems(llm, end_of_turn_ids: Sequence[int], tokenizer,
                        taught_ids: Sequence[int] | None = None) -> list[str]:
    """What is wrong with the GGUF's stop tokens: its end-of-sequence token must be one of the merged model's
    end-of-turn tokens (what Ollama, LM Studio and llama.cpp's server stop on), and llama.cpp must end
    generation at each of them that the model was taught to end an answer with (`taught_ids`, taught_end_of_turn;
    None: all of them). A GGUF cannot make llama.cpp stop at any other token (its end-of-generation set is the
    end-of-sequence, end-of-turn and end-of-message tokens and a fixed list of token texts): Phi-3's generation
    config also stops at <|assistant|>, which llama.cpp runs past; not_ending_generation lists such tokens."""
    problems = []
    eos = llm.token_eos()
    names = {token: tokenizer.convert_ids_to_tokens(token) for token in end_of_turn_ids}
    if eos not in end_of_turn_ids:
        problems.append(f"its end-of-sequence token is {eos} {_detok(llm, [eos])!r}, not the merged model's "
                        f"end-of-turn token {' or '.join(f'{t} {n!r}' for t, n in names.items())}")
    required = list(end_of_turn_ids if taught_ids is None else taught_ids)
    for token in not_ending_generation(llm, required):
        problems.append(f"llama.cpp does not end generation at the end-of-turn token {token} {names[token]!r}")
    return problems


@dataclass
class Answer:
    text: str
    stopped: bool   # ended at an end-of-turn token, not at the token limit


def llama_answer(llm, messages: Sequence[dict], max_new_tokens: int) -> Answer:
    """llama.cpp's greedy chat answer through create_chat_completion (the GGUF's template and stop tokens)."""
    response = llm.create_chat_completion(messages=list(messages), max_tokens=max_new_tokens, temperature=0.0)
    choice = response["choices"][0]
    return Answer(choice["message"]["content"].strip(), choice["finish_reason"] == "stop")


def reference_answer(model, tokenizer, prompt_ids: Sequence[int], end_of_turn_ids: Sequence[int],
                     max_new_tokens: int) -> Answer:
    """The merged model's greedy answer in transformers from the same prompt tokens."""
    import torch

    with torch.inference_mode():
        generated = model.generate(torch.tensor([list(prompt_ids)], device=model.device), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=list(end_of_turn_ids),
                                   pad_token_id=end_of_turn_ids[0],
                                   attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long,
                                                             device=model.device))
    new_tokens = generated[0, len(prompt_ids):].tolist()
    stopped = bool(new_tokens) and new_tokens[-1] in end_of_turn_ids
    # llama-cpp-python decodes an answer's bytes dropping what is not UTF-8 (errors="ignore"); transformers writes
    # U+FFFD for it: dropped here too, so that the same tokens give the same text (a byte-fallback token cut off)
    return Answer(tokenizer.decode(new_tokens, skip_special_tokens=True).replace("\ufffd", "").strip(), stopped)


def greedy_comparison(llm, references: Sequence[Answer], prompts: Sequence[list[dict]],
                      max_new_tokens: int) -> dict[str, Any]:
    """llama.cpp's answers next to the references: how many are the same text, and how many stop as they do."""
    answers = [llama_answer(llm, messages, max_new_tokens)
               for messages in tqdm(prompts, desc="llama.cpp greedy answers", unit="prompt")]
    pairs = [{"prompt": messages[-1]["content"], "merged": ref.text, "gguf": got.text,
              "merged_stopped": ref.stopped, "gguf_stopped": got.stopped}
             for messages, ref, got in zip(prompts, references, answers)]
    return {"prompts": len(pairs), "same_text": sum(p["merged"] == p["gguf"] for p in pairs),
            "merged_stopped": sum(p["merged_stopped"] for p in pairs),
            "stopped_where_merged_stopped": sum(p["gguf_stopped"] for p in pairs if p["merged_stopped"]),
            "pairs": pairs}
