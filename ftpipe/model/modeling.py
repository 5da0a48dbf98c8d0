"""Model loading, loss and generation shared by train, evaluate, merge and quantize.

torch/transformers/peft are imported inside the functions: the train stage must be able
to import Unsloth before any of them, and CPU-only stages must never import Unsloth.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from ftpipe.core.errors import PipelineError

IGNORE_INDEX = -100   # label value PyTorch's cross-entropy skips: prompt and padding tokens


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_compute_dtype(requested: str, on_cuda: bool) -> str:
    """QLoRA compute dtype: 'auto' is bfloat16 on CUDA and float32 on the CPU (exact, portable)."""
    if requested != "auto":
        return requested
    return "bfloat16" if on_cuda else "float32"


def inference_dtype() -> str:
    """Evaluation runs in float32 on the CPU (16-bit weights upcast exactly), bfloat16 on a GPU."""
    return "bfloat16" if cuda_available() else "float32"


def require_model_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        raise PipelineError(f"{path}: no {what} here (config.json missing). Run `dvc repro` to build it.")
    return path


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, dtype: str = "float32", adapter_dir: Path | None = None,
               quantization: Any = None):
    """A causal LM for inference: plain in `dtype`, 4-bit when `quantization` (QuantizationParams)
    is given (the setting the adapter was trained in), with the LoRA adapter attached if named."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "device_map": "cuda" if cuda_available() else "cpu"}
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(require_model_dir(model_dir, "model")), **kwargs)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model


def bnb_config(quantization: Any, compute_dtype: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
    )


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return render_chats(tokenizer, [messages], add_generation_prompt)[0]


def render_chats(tokenizer, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool = False) -> list[str]:
    """render_chat of each conversation, in one call: the template's setup is paid once per batch."""
    if not conversations:
        return []
    return tokenizer.apply_chat_template([list(messages) for messages in conversations], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def pad_batch(rows: Sequence[dict], pad_id: int) -> dict:
    """Right-pad token rows ({input_ids, labels}) into tensors; padding is masked out of the loss."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[index, :n] = torch.tensor(row["input_ids"])
        labels[index, :n] = torch.tensor(row["labels"])
        attention[index, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pad_packed_batch(rows: Sequence[dict], pad_id: int) -> dict:
    """Right-pad packed rows ({input_ids, labels, position_ids}) into tensors, with position_ids and no
    attention_mask.

    Without an attention mask (and without a KV cache: train with use_cache off), transformers builds a
    block-diagonal causal mask from the position ids: a new block starts wherever a position id is not
    the previous one + 1 (masking_utils.find_packed_sequence_indices), so no token attends to another
    example of its row. The padding's position ids restart at 0, a block of its own; being after every
    real token, causal attention keeps it out of them, and its labels are IGNORE_INDEX."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for index, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[index, :n] = torch.tensor(row["input_ids"])
        labels[index, :n] = torch.tensor(row["labels"])
        position_ids[index, :n] = torch.tensor(row["position_ids"])
        position_ids[index, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def padding_free_batch(rows: Sequence[dict], pad_to_multiple: int = 1, pad_id: int = 0) -> dict:
    """Packed rows concatenated into one row of shape (1, all tokens): no padding at all, position_ids
    restarting at 0 for each example, and `packed_seq_lengths` (int32, the length of each example): the
    padding-free layout Unsloth's varlen attention kernels take. Unsloth infers example boundaries from
    position_ids alone only for a batch of one row, so a padded batch of several packed rows would let
    its attention cross examples. Checked on an H100 with Unsloth 2026.10.9 (SmolLM2-135M, random
    weights): this batch gives each example exactly the logits it gets alone (max difference 0.0), the
    padded batch of two packed rows moves the second example's logits by up to 2.3.

    `pad_to_multiple` rounds the row's length up with one filler example of `pad_id` tokens (positions from 0,
    no targets): batches of many lengths then come in a few shapes, and kernels compiled for a shape are reused."""
    import torch

    filler = -sum(len(row["input_ids"]) for row in rows) % pad_to_multiple
    if filler:
        rows = [*rows, {"input_ids": [pad_id] * filler, "labels": [IGNORE_INDEX] * filler,
                        "position_ids": list(range(filler))}]
    position_ids = torch.tensor([position for row in rows for position in row["position_ids"]], dtype=torch.long)
    starts = torch.nonzero(position_ids == 0).flatten()
    lengths = torch.diff(starts, append=torch.tensor([len(position_ids)]))
    return {"input_ids": torch.tensor([[token for row in rows for token in row["input_ids"]]], dtype=torch.long),
            "labels": torch.tensor([[label for row in rows for label in row["labels"]]], dtype=torch.long),
            "position_ids": position_ids.unsqueeze(0), "packed_seq_lengths": lengths.to(torch.int32)}


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# What one loss forward may hold. A forward computes logits for every position it is given (rows x width x
# vocabulary, in the model's dtype): LOSS_TOKEN_BUDGET padded tokens keep them at 2 GiB in bf16 for Llama 3's
# 128k vocabulary, 1.5 GiB in float32 for SmolLM2's 49k (16 rows of 2048 tokens would be 8 GiB in bf16, and the
# float32 copy for the cross-entropy 16 GiB more). 8192 = 16 rows of 512 tokens, so the default data (rows of at
# most 256 tokens, batches of 16) is batched exactly as before. The cross-entropy then upcasts at most
# LOSS_CHUNK_ELEMENTS logits to float32 at a time: 1 GiB, 2,093 positions at 128k, 5,461 at 49k (more than
# a CPU test's whole batch: its loss is one cross-entropy call, the same numbers as before).
LOSS_TOKEN_BUDGET = 8192
LOSS_CHUNK_ELEMENTS = 1 << 28


def loss_batches(ordered: Sequence[dict], batch_size: int, token_budget: int) -> list[list[dict]]:
    """Rows sorted by length, grouped into forwards of at most `batch_size` rows and `token_budget` padded
    tokens (rows x the longest row's length); a row longer than the budget goes alone."""
    batches: list[list[dict]] = []
    batch: list[dict] = []
    for row in ordered:
        width = len(row["input_ids"])   # sorted: the row being added is the batch's longest
        if batch and (len(batch) == batch_size or (len(batch) + 1) * width > token_budget):
            batches.append(batch)
            batch = []
        batch.append(row)
    return batches + [batch] if batch else batches


def summed_cross_entropy(logits, labels) -> float:
    """The next-token cross-entropy summed over the label tokens, upcasting at most LOSS_CHUNK_ELEMENTS logits
    to float32 at a time: a batch within that in one call, a larger one row by row, in spans of positions from
    its first label to its last (prompt positions before them are skipped)."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    rows, positions, vocab = logits.shape[0], logits.shape[1] - 1, logits.shape[-1]
    if rows * positions * vocab <= LOSS_CHUNK_ELEMENTS:
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum").item()
    span = max(1, LOSS_CHUNK_ELEMENTS // vocab)
    total = 0.0
    for row in range(rows):
        labelled = (targets[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        if not labelled:
            continue
        for start in range(labelled[0], labelled[-1] + 1, span):
            stop = min(start + span, labelled[-1] + 1)
            total += F.cross_entropy(logits[row, start:stop].float(), targets[row, start:stop],
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
    return total


def mean_loss(model, rows: Sequence[dict], pad_id: int, batch_size: int, desc: str) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the label tokens of `rows`, and its perplexity. Memory is bounded
    whatever the model: at most `batch_size` rows and LOSS_TOKEN_BUDGET padded tokens a forward, and the float32
    logits for the cross-entropy in chunks (summed_cross_entropy); no KV cache is kept."""
    import torch

    if not rows:
        raise PipelineError(f"{desc}: no examples to compute a loss on")
    ordered = sorted(rows, key=lambda row: len(row["input_ids"]))   # similar lengths: little padding
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch_rows in tqdm(loss_batches(ordered, batch_size, LOSS_TOKEN_BUDGET), desc=desc, unit="batch"):
            batch = {k: v.to(model.device) for k, v in pad_batch(batch_rows, pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            total += summed_cross_entropy(logits, batch["labels"])
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            del logits
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """The ids the model's generation config ends an answer at (eos_token_id: an int or a list: Gemma lists <eos> and
    <end_of_turn>, Llama 3 <|end_of_text|>, <|eom_id|> and <|eot_id|>); the tokenizer's end of sequence when it
    names none. The quantize stage's stop-token check and the chat command stop at these."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    return [int(token) for token in (configured if isinstance(configured, list) else [configured])
            if token is not None]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer in evaluation: end_of_turn_ids, then the tokenizer's end of sequence, without
    repeats. The tokenizer's alone would let a Gemma answer run past its <end_of_turn>."""
    ids = end_of_turn_ids(model, tokenizer)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def halved_batch(batch_size: int, desc: str) -> int:
    """The batch size to retry with after a CUDA out-of-memory error at `batch_size` (a warning says so), once the
    failed batch's memory is back in the free pool; an error when one sequence alone does not fit."""
    import torch

    if batch_size <= 1:
        raise PipelineError(f"{desc}: one sequence alone does not fit in the GPU's free memory. Free the GPU (other "
                            f"processes may hold memory: nvidia-smi), or lower evaluate.max_new_tokens or "
                            f"tokenize.max_seq_length.")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"warning: {desc}: out of GPU memory at a batch of {batch_size}; retrying with {batch_size // 2}",
          file=sys.stderr)
    return batch_size // 2


def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop_ids: list[int]) -> list[str]:
    """Greedy answers to one batch of chat-rendered prompts, left-padded (decoder-only models continue from the
    right end), each ending at the first of `stop_ids`."""
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    encoded = {k: v.to(model.device) for k, v in encoded.items()}
    generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                               pad_token_id=tokenizer.pad_token_id)
    new_tokens = generated[:, encoded["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
             desc: str) -> tuple[list[str], int]:
    """Greedy completions of chat-rendered prompts, in order, each stopping at any of the model's end-of-sequence
    ids (stop_token_ids); and the batch size they ran at. A batch that runs out of GPU memory is retried at half
    the size, and the prompts after it follow at that size (halved_batch): the returned size is the one that fit."""
    import torch

    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(model, tokenizer)
    prompts = list(prompts)
    outputs: list[str] = []
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="prompt") as progress:
        while len(outputs) < len(prompts):
            batch = prompts[len(outputs):len(outputs) + batch_size]
            try:
                answers = generate_batch(model, tokenizer, batch, max_new_tokens, stop_ids)
            except torch.cuda.OutOfMemoryError:
                answers = None   # halved outside the handler: the traceback holds the failed batch's tensors
            if answers is None:
                batch_size = halved_batch(batch_size, desc)
                continue
            outputs.extend(answers)
            progress.update(len(batch))
    return outputs, batch_size
