"""Token ids and loss labels of chat conversations, rendered with the model's chat template.

Labels are the token ids on the assistant's turns (their end-of-turn marker included, so the model learns
to stop) and IGNORE_INDEX elsewhere, or every token without assistant-only loss. The assistant's turns are
found by rendering each conversation's prefixes: a turn is labelled where the whole conversation shows it as
the model generates it, after the prompt the template builds for it. Conversations over max_seq_length are
truncated or dropped.

Some templates write earlier turns differently in the history than as the answer being generated: Qwen3 drops
an earlier answer's think block (and writes the last one with one), gpt-oss ends an earlier answer with <|end|>
where the model generates <|return|>, Mistral v0.3 moves the system message to the last user turn, and a
template such as Phi-3.5's closes a conversation with the end-of-sequence token after its last message only.
So, for each assistant turn: the prompt (the conversation before it, with the generation prompt) must be a
prefix of the whole, and the turn's text as generated (the conversation through it, minus that prompt) must
follow it there; an earlier turn followed there by all of it but a final end-of-sequence token (Phi-3.5's
end of conversation, gpt-oss's <|return|>) is labelled without that token. An earlier turn the history shows
otherwise is context, not a target (counted as unlabelled_turns); a last turn that cannot be located is an
error: the template cannot be trained on with assistant-only loss.
"""
from __future__ import annotations

from operator import itemgetter
from typing import Any, Sequence

from ftpipe.core.errors import PipelineError
from ftpipe.core.params import TokenizeParams
from ftpipe.model.modeling import IGNORE_INDEX, render_chats


def assistant_spans(tokenizer, conversations: Sequence[list[dict]],
                    texts: Sequence[str]) -> list[list[tuple[int, int]]]:
    """Character spans of the labelled assistant turns in each rendered conversation (`texts`), in order.

    Each span runs from the end of the prompt rendered with the generation prompt up to the end of the
    conversation rendered through that turn, so it includes the end-of-turn marker: the model learns to stop.
    Earlier turns the whole conversation shows otherwise have no span (the module's docstring says when). The
    conversation through its last message is its text itself, so a final assistant turn costs one render (the
    prompt before it), not two; all prefixes of the batch are rendered in one call."""
    turns = [(number, index) for number, messages in enumerate(conversations)
             for index, message in enumerate(messages) if message["role"] == "assistant"]
    befores = render_chats(tokenizer, [conversations[number][:index] for number, index in turns],
                           add_generation_prompt=True)
    inner = [(number, index) for number, index in turns if index < len(conversations[number]) - 1]
    throughs = dict(zip(inner, render_chats(tokenizer, [conversations[number][:index + 1]
                                                        for number, index in inner])))
    end_of_sequence = tokenizer.eos_token or None
    spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
    for (number, index), before in zip(turns, befores):
        text = texts[number]
        through = throughs.get((number, index), text)
        end = None
        if text.startswith(before) and through.startswith(before) and len(through) > len(before):
            if text.startswith(through):
                end = len(through)
            elif (end_of_sequence and through.endswith(end_of_sequence)
                  and len(through) - len(end_of_sequence) > len(before)
                  and text.startswith(through[:-len(end_of_sequence)])):
                end = len(through) - len(end_of_sequence)
        if end is not None:
            spans[number].append((len(before), end))
        elif index == len(conversations[number]) - 1:
            raise PipelineError(
                "the chat template renders a conversation differently from its prefixes, so the assistant's "
                "tokens cannot be located: the prompt it builds for the last answer is not where the whole "
                "conversation has it. Use a template whose rendering of the first k turns is a prefix of the whole "
                "(tokenize.chat_template), or set tokenize.assistant_only_loss: false."
            )
    return spans


def assistant_labels(input_ids, token_starts, spans: list[tuple[int, int]]):
    """Labels that keep the tokens starting inside an assistant span and are IGNORE_INDEX elsewhere."""
    import numpy as np

    inside = np.zeros(len(input_ids), dtype=bool)
    for start, end in spans:
        inside |= (token_starts >= start) & (token_starts < end)
    return np.where(inside, input_ids, IGNORE_INDEX)


def tokenize_batch(tokenizer, conversations: Sequence[list[dict]], params: TokenizeParams) -> list[dict[str, Any]]:
    """Token ids and labels (int64 numpy arrays) of each conversation, in order, with `truncated` and
    `unlabelled_turns` (earlier assistant turns the template writes differently in the history: context, not
    target); or {'dropped': reason, 'length': tokens} for one that must be dropped.

    The texts go to the tokenizer in one call: a batch is encoded in parallel, and the result is the
    same as encoding each text alone (no padding, no truncation by the tokenizer)."""
    import numpy as np

    texts = render_chats(tokenizer, conversations)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=params.assistant_only_loss,
                        return_attention_mask=False, return_token_type_ids=False)
    spans = assistant_spans(tokenizer, conversations, texts) if params.assistant_only_loss else None
    results = []
    for index, messages in enumerate(conversations):
        input_ids = np.asarray(encoded["input_ids"][index], dtype=np.int64)
        if spans is not None:
            offsets = encoded["offset_mapping"][index]   # (start, end) characters of each token
            token_starts = np.fromiter(map(itemgetter(0), offsets), dtype=np.int64, count=len(offsets))
            labels = assistant_labels(input_ids, token_starts, spans[index])
        else:
            labels = input_ids.copy()
        truncated = len(input_ids) > params.max_seq_length
        if truncated:
            if params.truncation == "drop":
                results.append({"dropped": "too_long", "length": len(input_ids)})
                continue
            input_ids, labels = input_ids[:params.max_seq_length], labels[:params.max_seq_length]
        if not (labels[1:] != IGNORE_INDEX).any():   # position 0 is never predicted
            results.append({"dropped": "no_loss_tokens", "length": len(input_ids)})
            continue
        unlabelled = (sum(message["role"] == "assistant" for message in messages) - len(spans[index])
                      if spans is not None else 0)
        results.append({"input_ids": input_ids, "labels": labels, "truncated": truncated,
                        "unlabelled_turns": unlabelled})
    return results


def tokenize_example(tokenizer, messages: list[dict], params: TokenizeParams) -> dict[str, Any]:
    """Token ids and labels (lists) of one conversation; {'dropped': reason, 'length': n} when it must be
    dropped. The same as tokenize_batch, one conversation at a time."""
    (result,) = tokenize_batch(tokenizer, [messages], params)
    if "dropped" in result:
        return result
    return {"input_ids": result["input_ids"].tolist(), "labels": result["labels"].tolist(),
            "truncated": result["truncated"], "unlabelled_turns": result["unlabelled_turns"]}
