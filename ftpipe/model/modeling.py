"""Model loading, loss and generation shared by train, evaluate, merge and quantize.

torch/transformers/peft are imported inside the functions: the train stage must be able
to import Unsloth before any of them, and CPU-only stages must never import Unsloth.
"""
from __future__ import annotations

import math
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


def padding_free_batch(rows: Sequence[dict]) -> dict:
    """Packed rows concatenated into one row of shape (1, all tokens): no padding at all, position_ids
    restarting at 0 for each example, and `packed_seq_lengths` (int32, the length of each example): the
    padding-free layout Unsloth's varlen attention kernels take. Unsloth infers example boundaries from
    position_ids alone only for a batch of one row, so a padded batch of several packed rows would let
    its attention cross examples. Checked on an H100 with Unsloth 2026.10.9 (SmolLM2-135M, random
    weights): this batch gives each example exactly the logits it gets alone (max difference 0.0), the
    padded batch of two packed rows moves the second example's logits by up to 2.3."""
    import torch

    position_ids = torch.tensor([position for row in rows for position in row["position_ids"]], dtype=torch.long)
    starts = torch.nonzero(position_ids == 0).flatten()
    lengths = torch.diff(starts, append=torch.tensor([len(position_ids)]))
    return {"input_ids": torch.tensor([[token for row in rows for token in row["input_ids"]]], dtype=torch.long),
            "labels": torch.tensor([[label for row in rows for label in row["labels"]]], dtype=torch.long),
            "position_ids": position_ids.unsqueeze(0), "packed_seq_lengths": lengths.to(torch.int32)}


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def mean_loss(model, rows: Sequence[dict], pad_id: int, batch_size: int, desc: str) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the label tokens of `rows`, and its perplexity."""
    import torch
    import torch.nn.functional as F

    if not rows:
        raise PipelineError(f"{desc}: no examples to compute a loss on")
    ordered = sorted(rows, key=lambda row: len(row["input_ids"]))   # similar lengths: little padding
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch_rows in tqdm(list(chunks(ordered, batch_size)), desc=desc, unit="batch"):
            batch = {k: v.to(model.device) for k, v in pad_batch(batch_rows, pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shifted = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((shifted != IGNORE_INDEX).sum())
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
             desc: str) -> list[str]:
    """Greedy completions of chat-rendered prompts, in order."""
    import torch

    tokenizer.padding_side = "left"   # decoder-only models continue from the right end
    outputs: list[str] = []
    with torch.inference_mode():
        for batch in tqdm(list(chunks(list(prompts), batch_size)), desc=desc, unit="batch"):
            encoded = tokenizer(list(batch), return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = {k: v.to(model.device) for k, v in encoded.items()}
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            outputs.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs
