"""The two runtimes a chat runs in, behind one method: `stream(messages, sampling)` yields an answer's text as it
is generated, and stops generating when the caller stops reading (Ctrl-C).

- Hugging Face folders run in transformers, on the GPU if there is one (bfloat16), else on the CPU (float32):
  the prompt is the tokenizer's own chat template, generation stops at the model's end-of-turn tokens, and the
  text is streamed by a TextIteratorStreamer while generate() runs in a thread.
- GGUF files run in llama.cpp, opened by ftpipe.gguf.runtime.open_gguf (the GGUF's own chat template and stop
  tokens), through create_chat_completion: what the quantize stage checks and the server serves.

Temperature 0 is greedy decoding in both, so a prompt gets the answer the pipeline's checks saw.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

from ftpipe.chat.models import ModelSpec
from ftpipe.core.errors import PipelineError

DEFAULT_N_CTX = 4096   # llama.cpp's context (prompt + answer) for GGUF files: the whole conversation must fit


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0   # 0: greedy (deterministic)
    seed: int | None = None    # with temperature > 0: the same seed and conversation give the same answer


def load(spec: ModelSpec, n_ctx: int = DEFAULT_N_CTX):
    return LlamaCppChat(spec, n_ctx) if spec.runtime == "llama.cpp" else TransformersChat(spec)


class TransformersChat:
    def __init__(self, spec: ModelSpec):
        from ftpipe.model.modeling import end_of_turn_ids, inference_dtype, load_model, load_tokenizer

        dtype = inference_dtype()
        self.tokenizer = load_tokenizer(spec.path)
        if spec.chat_template is not None:   # base or adapter: the template the pipeline trained with
            self.tokenizer.chat_template = spec.chat_template.read_text(encoding="utf-8")
        self.model = load_model(spec.path, dtype, adapter_dir=spec.adapter)
        self.end_of_turn = end_of_turn_ids(self.model, self.tokenizer)
        self.description = f"transformers on {self.model.device.type}, {dtype}"

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]   # the template wrote the BOS if any

    def stream(self, messages: Sequence[dict], sampling: Sampling) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        ids = self.prompt_ids(messages)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(ids) + sampling.max_new_tokens > limit:
            raise PipelineError(f"the conversation ({len(ids)} tokens) + --max-new-tokens {sampling.max_new_tokens} "
                                f"exceed the model's {limit} positions: /reset starts a new conversation")
        input_ids = torch.tensor([ids], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failures: list[BaseException] = []
        if sampling.temperature > 0:
            how = {"do_sample": True, "temperature": sampling.temperature}
        else:
            how = {"do_sample": False}
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                      max_new_tokens=sampling.max_new_tokens, eos_token_id=self.end_of_turn,
                      pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=_stop_when(stop), **how)

        def generate() -> None:
            try:
                if sampling.temperature > 0 and sampling.seed is not None:
                    from transformers import set_seed

                    set_seed(sampling.seed)
                self.model.generate(**kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread, which raises it
                failures.append(error)
                streamer.end()   # else the reader waits for text forever

        thread = threading.Thread(target=generate, name="generate", daemon=True)
        thread.start()
        try:
            yield from (piece for piece in streamer if piece)   # the streamer also hands out "" (no whole word yet)
        finally:
            stop.set()   # the reader is gone (done, Ctrl-C or an error): generate() returns after one more token
            _join(thread)
        if failures:
            raise failures[0]


def _stop_when(event: threading.Event):
    """Stopping criteria that end generate() once `event` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenSet()])


def _join(thread: threading.Thread) -> None:
    """Wait for the generating thread, even through another Ctrl-C: two generate() calls must never overlap."""
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt:
            continue


class LlamaCppChat:
    def __init__(self, spec: ModelSpec, n_ctx: int):
        from ftpipe.gguf.runtime import open_gguf

        self.llm = open_gguf(spec.path, n_ctx)
        self.description = f"llama.cpp, context {n_ctx} tokens"

    def stream(self, messages: Sequence[dict], sampling: Sampling) -> Iterator[str]:
        options = {"temperature": sampling.temperature, "max_tokens": sampling.max_new_tokens}
        if sampling.temperature > 0:
            # llama-cpp-python otherwise draws each answer's seed from the one the model was opened with (fixed)
            options["seed"] = sampling.seed if sampling.seed is not None else random.randrange(2**31)
        chunks = self.llm.create_chat_completion(messages=list(messages), stream=True, **options)
        try:
            for chunk in chunks:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        except ValueError as error:   # llama-cpp-python's "Requested tokens (N) exceed context window of M"
            raise PipelineError(f"llama.cpp: {error}: /reset starts a new conversation (or raise --n-ctx)") from error
        finally:
            chunks.close()
