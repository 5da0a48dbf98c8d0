"""Does transformers' GGUF reader read a GGUF base model as llama.cpp does?

A GGUF base (the embedded default is one, and `base.model: x.gguf`) reaches models/base through transformers'
GGUF reader, which dequantizes every tensor and rebuilds the model from the file's metadata. That reader is not
llama.cpp, the runtime the file was made for: it can misread an architecture (a wrong head size, a missing norm,
a RoPE row order) and give a model that still runs but is not the model in the file. So the base stage compares
the next-token distributions of the model transformers built with llama.cpp's on the same token ids (llama.cpp's
own tokenization of CHECK_TEXTS) and refuses the file when they differ by more than `base.gguf_max_kl`.

Metric: the mean over texts and positions of KL(p_llama.cpp || p_transformers), in nats; the top-1 agreement
(both pick the same most likely next token) is reported beside it. Even a file read correctly does not give 0:
transformers computes with the dequantized float32 weights, llama.cpp with quantized dot products. Measured on
the embedded SmolLM2-135M Q4_1: mean KL 0.00465 nats (the largest at one position 0.048), top-1 agreement 0.92 on
these texts (72 positions); the same file with one classic reader bug (the Q/K rows of every attention layer in the
wrong RoPE order) 0.60 nats, top-1 agreement 0.61. base.gguf_max_kl 0.1 lies between, 20 times the first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftpipe.core.errors import PipelineError

# A handful of short English sentences and a line of code: common tokens, digits, punctuation and indentation,
# 10 to 20 tokens each, so the check takes seconds on a CPU even for a large model. Fixed: the same texts every
# run, so the numbers compare across runs and machines.
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at 100 degrees Celsius at sea level.",
    "She opened the window because the room was too warm.",
    "The meeting was moved to Thursday at 3 pm.",
    "def add(a, b):\n    return a + b",
)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def llama_logits(llm, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (the model must be opened with logits_all)."""
    llm.reset()
    llm.eval(list(ids))
    return np.asarray(llm.scores[:len(ids)], dtype=np.float64)


def transformers_logits(model, ids: Sequence[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([list(ids)], device=model.device)).logits[0]
    return logits.double().cpu().numpy()


def next_token_divergence(model, tokenizer, gguf_path: Path, texts: Sequence[str] = CHECK_TEXTS) -> dict[str, Any]:
    """Compare `model` (transformers, read from `gguf_path`) with llama.cpp running the same file, on `texts`
    tokenized by llama.cpp (BOS as the file says). Also counts the texts that `tokenizer` (transformers' rebuild of
    the file's tokenizer) encodes differently from llama.cpp."""
    from ftpipe.gguf.runtime import build_info, open_gguf

    llm = open_gguf(gguf_path, n_ctx=512, logits_all=True, chat=False)
    try:
        kls, agree, tokenizer_mismatches = [], [], 0
        for text in texts:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            reference, read = log_softmax(llama_logits(llm, ids)), log_softmax(transformers_logits(model, ids))
            kls.append((np.exp(reference) * (reference - read)).sum(axis=-1))
            agree.append(reference.argmax(axis=-1) == read.argmax(axis=-1))
            plain = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            tokenizer_mismatches += tokenizer(text, add_special_tokens=False)["input_ids"] != plain
    finally:
        llm.close()
    kl, top1 = np.concatenate(kls), np.concatenate(agree)
    return {"texts": len(texts), "positions": int(kl.size), "mean_kl_nats": round(float(kl.mean()), 6),
            "max_kl_nats": round(float(kl.max()), 6), "top1_agreement": round(float(top1.mean()), 4),
            "tokenizer_mismatches": int(tokenizer_mismatches), "llama_cpp": build_info()}


def check_gguf_reader(model, tokenizer, gguf_path: Path, max_kl: float) -> dict[str, Any]:
    """next_token_divergence, with the limit; raises PipelineError when the mean KL is above `max_kl`."""
    found = {**next_token_divergence(model, tokenizer, gguf_path), "max_allowed_kl_nats": max_kl}
    if found["mean_kl_nats"] > max_kl:
        raise PipelineError(
            f"{gguf_path}: transformers' GGUF reader does not read this file as llama.cpp does: the mean KL "
            f"divergence of llama.cpp's next-token distributions from transformers' is {found['mean_kl_nats']:.4f} "
            f"nats over {found['positions']} positions of {found['texts']} check texts (top-1 agreement "
            f"{found['top1_agreement']:.0%}), above params.yaml base.gguf_max_kl = {max_kl}. The model models/base "
            f"would hold is not the model in the file. Use the original Hugging Face weights instead (base.model: a "
            f"hub id with base.revision, or a local model folder); raise base.gguf_max_kl only if you accept the "
            f"difference."
        )
    if found["tokenizer_mismatches"]:
        print(f"warning: {gguf_path}: transformers' rebuild of the file's tokenizer encodes "
              f"{found['tokenizer_mismatches']} of {found['texts']} check texts differently from llama.cpp; the "
              f"pipeline trains with transformers' tokenizer (models/base).")
    return found
