"""How many sequences a batch of the evaluate stage holds: evaluate.batch_size, or `auto`.

On a GPU, `auto` is as many sequences as the free GPU memory holds once the model is loaded, from an estimate of
what one sequence needs, read off the model's config: its KV cache, its activations and its logits. Two sizes,
one per pass, because they need different amounts: the loss pass computes logits for every position (an 8B
Llama's 128,256-token vocabulary in bf16: 250 KiB a position) and no KV cache, generation the logits of the last
position only (logits_to_keep=1) but a KV cache of prompt + max_new_tokens positions (128 KiB a position at 8B).
mean_loss bounds its own memory too (at most LOSS_TOKEN_BUDGET padded tokens a forward, the float32 logits of the
cross-entropy in chunks of LOSS_CHUNK_ELEMENTS): the loss batch size is an upper bound on its rows a forward.
On the CPU, `auto` is 16 (CPU_AUTO_BATCH). Whatever the size, a batch that still runs out of GPU memory is
retried at half the size (ftpipe.model.modeling.halved_batch).

torch is imported inside the functions, as everywhere in ftpipe.model.
"""
from __future__ import annotations

from typing import Any, Sequence

from ftpipe.model.modeling import LOSS_CHUNK_ELEMENTS, halved_batch, mean_loss

# On the CPU memory rarely binds, time does, and a bigger batch buys little: every prompt of a batch waits for its
# longest answer, and left padding to the longest prompt is computed too. 16 is the default's evaluate.batch_size
# (params.yaml), so `auto` on the CPU reproduces the default run's numbers exactly.
CPU_AUTO_BATCH = 16
# Kept out of the estimate: cuBLAS workspaces, kernels' scratch buffers and the CUDA context's growth as kernels
# load (together a few hundred MiB on an H100/H200), which no per-sequence figure counts.
RESERVED_BYTES = 2**30
# Each sequence's estimate is taken 1.5 times: PyTorch's caching allocator rounds blocks up and fragments (~20%
# lost in long generation loops), and generate() holds a copy or two of the last logits per step beyond the ones
# counted here. A batch that still does not fit is halved, so erring low costs speed only.
SAFETY_FACTOR = 1.5
# Bytes per vocabulary entry of the last position's logits in generate(): the model's in its dtype (2 in bf16),
# generate's float32 copy (4) and the processed scores argmax reads (4). Counted as 2 + 4 + 4 whatever the dtype
# (float32 models: 12, within the safety factor).
LOGIT_BYTES = 10
# The loss pass's cross-entropy, once per forward whatever its rows: a chunk of LOSS_CHUNK_ELEMENTS logits upcast
# to float32 (4 bytes each) and its float32 log-softmax (4 more): 2 GiB.
CROSS_ENTROPY_BYTES = LOSS_CHUNK_ELEMENTS * 8


def text_config(config):
    """The language model's config (a multimodal model's text_config), where the decoder's sizes are."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def kv_cache_bytes_per_token(config, dtype_bytes: int) -> int:
    """Keys and values of one position in every layer: 2 x layers x kv heads x head dim x dtype bytes (Llama 3.1
    8B in bf16: 2 x 32 x 8 x 128 x 2 = 131,072 bytes). Sliding-window layers (Gemma 2 and 3, gpt-oss) are counted
    as full ones: an overestimate, on the safe side."""
    text = text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def activation_bytes_per_token(config, dtype_bytes: int) -> int:
    """The transient activations of one position inside one decoder layer at its peak, in the MLP: gate, up and
    their product (3 x intermediate size) beside the residual stream, its normed copy, the attention output and
    the MLP's output (4 x hidden size). Layers run one after another, so one layer's worth is live at a time.
    Llama 3.1 8B in bf16: (3 x 14,336 + 4 x 4,096) x 2 = 118,784 bytes."""
    text = text_config(config)
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    return (3 * intermediate + 4 * text.hidden_size) * dtype_bytes


def attention_score_bytes(config, queries: int, keys: int) -> int:
    """Eager attention (Gemma 2's default, for its logit soft-capping) materializes every head's float32 scores,
    queries x keys each; SDPA's kernels do not."""
    text = text_config(config)
    eager = getattr(text, "_attn_implementation", None) == "eager"
    return text.num_attention_heads * queries * keys * 4 if eager else 0


def generation_bytes(config, prompt_tokens: int, new_tokens: int, dtype_bytes: int) -> int:
    """One sequence of a generate() batch: its KV cache over prompt + new tokens, the prefill's activations over
    the prompt, and the logits of its last position (vocab x LOGIT_BYTES)."""
    positions = prompt_tokens + new_tokens
    return (kv_cache_bytes_per_token(config, dtype_bytes) * positions
            + activation_bytes_per_token(config, dtype_bytes) * prompt_tokens
            + attention_score_bytes(config, prompt_tokens, positions)
            + text_config(config).vocab_size * LOGIT_BYTES)


def loss_bytes(config, tokens: int, dtype_bytes: int) -> int:
    """One row of a loss batch: the logits of every position in the model's dtype, and its activations (mean_loss
    keeps no KV cache; its float32 cross-entropy is CROSS_ENTROPY_BYTES a forward, counted once)."""
    return ((text_config(config).vocab_size * dtype_bytes + activation_bytes_per_token(config, dtype_bytes)) * tokens
            + attention_score_bytes(config, tokens, tokens))


def fitting_batch(free_bytes: int, per_sequence: int, count: int, per_batch: int = 0) -> int:
    """Sequences that fit in `free_bytes` (less RESERVED_BYTES and `per_batch`, what a batch needs whatever its
    size) at SAFETY_FACTOR x `per_sequence` each, clamped to [1, count]: more than the data would be no batch."""
    fits = int((free_bytes - RESERVED_BYTES - per_batch) // (SAFETY_FACTOR * per_sequence))
    return max(1, min(count, fits))


def free_gpu_bytes() -> int:
    """Memory a new tensor can take on the current GPU: what the driver has free plus what PyTorch's allocator
    holds cached but unused (a model deleted before this one left it there)."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def batch_sizes(requested: int | str, model, prompt_tokens: int, new_tokens: int, loss_tokens: int, count: int,
                free_bytes: int | None = None) -> dict[str, int]:
    """The batch sizes of the loss pass and of generation: evaluate.batch_size as set, or for `auto` what fits in
    the GPU's free memory after the model is loaded (`free_bytes`, measured when not given), or CPU_AUTO_BATCH on
    the CPU. `prompt_tokens` and `loss_tokens` are the longest prompt and the longest row (batches pad to them)."""
    import torch

    if requested != "auto":
        return {"loss": int(requested), "generation": int(requested)}
    if not torch.cuda.is_available():
        return {"loss": min(CPU_AUTO_BATCH, count), "generation": min(CPU_AUTO_BATCH, count)}
    free = free_gpu_bytes() if free_bytes is None else free_bytes
    dtype_bytes = model.dtype.itemsize
    return {"loss": fitting_batch(free, loss_bytes(model.config, loss_tokens, dtype_bytes), count,
                                  CROSS_ENTROPY_BYTES),
            "generation": fitting_batch(free, generation_bytes(model.config, prompt_tokens, new_tokens, dtype_bytes),
                                        count)}


def fitting_mean_loss(model, rows: Sequence[dict], pad_id: int, batch_size: int, desc: str) -> tuple[Any, int]:
    """mean_loss at `batch_size`, rerun at half the size after a CUDA out-of-memory error (halved_batch warns):
    its result and the batch size that fit. The whole pass reruns (one forward per batch: seconds, where a
    generation batch takes max_new_tokens forwards)."""
    import torch

    while True:
        try:
            return mean_loss(model, rows, pad_id, batch_size, desc), batch_size
        except torch.cuda.OutOfMemoryError:
            pass   # halved outside the handler: the traceback holds the failed batch's tensors
        batch_size = halved_batch(batch_size, desc)
