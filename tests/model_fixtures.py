"""Shared pieces of the model-stage tests: synthetic chat data, small params, and the builders
behind the session fixtures in conftest.py (one tiny base folder, one tokenized data set, one
trained adapter and one merged model, reused by test_train, test_evaluate, test_merge and
test_quantize).

torch/transformers are imported inside the functions: collecting the tests stays fast.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ftpipe.core.evaluation_params import (
    AuditGateParams,
    AuditParams,
    CanaryParams,
    DriftParams,
    EvaluateGateParams,
    EvaluateParams,
    GeneralTextParams,
    HarnessParams,
)
from ftpipe.core.io import write_json
from ftpipe.core.params import BaseParams, LoraParams, QuantizationParams, TokenizeParams, TrainParams, flatten
from ftpipe.core.paths import PROVENANCE_FILE

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_DTYPE = "bfloat16"
# One example per row: the train tests count rows (24 rows = 6 steps of 4). PACKED_TOKENIZE packs them.
TOKENIZE = TokenizeParams(max_seq_length=128, truncation="truncate", assistant_only_loss=True, packing=False,
                          chat_template=None, chat_template_kwargs={}, system_prompt=None)
PACKED_TOKENIZE = dataclasses.replace(TOKENIZE, packing=True)
TRAIN = TrainParams(
    backend="cpu", seed=0, max_steps=6, num_epochs=None, batch_size=4, micro_batch_size="auto", devices="auto",
    learning_rate=1e-2, lr_scheduler="cosine", warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0,
    gradient_checkpointing="off", cuda_graphs="auto", checkpoint_every=2, checkpoint_runs_kept=2,
    lora=LoraParams(r=4, alpha=8, dropout=0.0, bias="none", target_modules=TARGET_MODULES),
    quantization=QuantizationParams(quant_type="nf4", double_quant=True, compute_dtype="float32"))
# 24 training rows = exactly 6 steps of 4: one epoch, so every row is trained on once.
SPLIT_SIZES = {"train": 24, "validation": 8, "test": 8}
# evaluate on 4 test rows, 4 short general-text passages, no harness; gates and drift off (their tests set them)
EVALUATE = EvaluateParams(max_examples=4, batch_size=2, max_new_tokens=8, num_samples=2,
                          general_text=GeneralTextParams("python_reference", "PSF-2.0", passages=4, max_tokens=32),
                          harness=HarnessParams(tasks=[], include_path=None, limit=None, num_fewshot=None),
                          gate=EvaluateGateParams("rougeL", None, None, None, None),
                          drift=DriftParams(baseline=None, max_regression={}, on_regression="fail"))
AUDIT = AuditParams(train_examples=4, max_new_tokens=8, batch_size=4,
                    canaries=CanaryParams(enabled=False, seed=0, repeats=[1, 4], digits=6, candidates=50),
                    gate=AuditGateParams(None, None, None, None))


def row_id(messages: list[dict]) -> str:
    """A content hash, like the clean stage's ids: their order is not the order rows are written in."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def chat_row(n: int) -> dict:
    """A conversation with digits, non-ASCII text and a newline in the answer; every third has a
    system prompt, every fifth a second turn."""
    messages = [{"role": "user", "content": f"Convert {n} °C to Fahrenheit."},
                {"role": "assistant", "content": f"{n} °C is {n * 9 / 5 + 32:g} °F.\n"
                                                 f"Fahrenheit = Celsius × 9/5 + 32 (café rule)."}]
    if n % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Answer in two lines."})
    if n % 5 == 0:
        messages += [{"role": "user", "content": "And in kelvin?"},
                     {"role": "assistant", "content": f"{n + 273.15:g} K."}]
    return {"id": row_id(messages), "source": "unit", "source_row": n, "format": "chat", "messages": messages}


def clean_splits() -> dict[str, list[dict]]:
    splits, n = {}, 0
    for split, size in SPLIT_SIZES.items():
        splits[split] = [chat_row(n + i) for i in range(size)]
        n += size
    return splits


def write_clean(folder: Path, splits: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                               encoding="utf-8")
    return folder


def build_base(model_dir: Path, out_dir: Path) -> Path:
    """models/base/ as the base stage publishes it: the model folder plus provenance.json."""
    from ftpipe.core.provenance import stage_record
    from stages.base import materialize_base

    params = BaseParams(model=str(model_dir), revision=None, allow_network=False, dtype=BASE_DTYPE, gguf_max_kl=0.1)
    out_dir.mkdir(parents=True)
    info = materialize_base(params, out_dir)
    write_json(out_dir / PROVENANCE_FILE, stage_record("base", flatten(params, "base"), **info))
    return out_dir


def build_tokenized(base_dir: Path, root: Path, params: TokenizeParams = TOKENIZE) -> tuple[Path, Path]:
    """Clean splits of synthetic rows and their tokenized form: (clean_dir, tokenized_dir), with the chat template
    the tokenize stage would choose and save (data/tokenized/chat_template.jinja)."""
    from ftpipe.data.chat_template import TEMPLATE_FILE, apply_chat_template_to, resolve_chat_template
    from ftpipe.model.modeling import load_tokenizer
    from stages.tokenize import tokenize_splits

    clean_dir = write_clean(root / "clean", clean_splits())
    tokenized_dir = root / "tokenized"
    tokenized_dir.mkdir()
    chosen = resolve_chat_template(params, base_dir)
    tokenizer = apply_chat_template_to(load_tokenizer(base_dir), chosen["text"])
    stats, _ = tokenize_splits(clean_dir, tokenizer, params, tokenized_dir)
    write_json(tokenized_dir / "stats.json", stats)
    (tokenized_dir / TEMPLATE_FILE).write_text(chosen["text"], encoding="utf-8")
    return clean_dir, tokenized_dir


def model_probe():
    """A TrainerCallback that records, when training begins, how the model being trained is built, then the
    sorted argument names of each of its forward calls ('forward_kwargs'): what it is given, and for each step's
    log entry the step and how many forward passes had begun by then ('logged_after_passes')."""
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    class ModelProbe(TrainerCallback):
        def __init__(self):
            self.seen: dict = {}

        def record(self, module, args, kwargs):
            self.seen["forward_kwargs"].append(sorted(kwargs))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            four_bit = {name: module for name, module in model.named_modules()
                        if isinstance(module, bnb.nn.Linear4bit)}
            self.seen = {
                "linear4bit": sorted(four_bit),
                "storage_dtypes": {str(m.weight.dtype) for m in four_bit.values()},
                "quant_types": {m.weight.quant_type for m in four_bit.values()},
                "compute_dtypes": {str(m.compute_dtype) for m in four_bit.values()},
                "trainable": sorted(name for name, p in model.named_parameters() if p.requires_grad),
                "use_cache": model.config.use_cache,
                "forward_kwargs": [],
                "logged_after_passes": [],
            }
            model.register_forward_pre_hook(self.record, with_kwargs=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.seen["logged_after_passes"].append((state.global_step, len(self.seen["forward_kwargs"])))

    return ModelProbe()


def train_tiny(params: TrainParams, base_dir: Path, tokenized_dir: Path, checkpoints_root: Path, out_dir: Path,
               callbacks: list | None = None) -> dict:
    from stages.train import train_adapter

    out_dir.mkdir(parents=True, exist_ok=True)
    return train_adapter(params, TOKENIZE.max_seq_length, base_dir, tokenized_dir, checkpoints_root, out_dir,
                         callbacks)


def scale_up_blocks(model) -> None:
    """Attention and MLP outputs x100, queries and keys x4, in place: each block of a random model then counts."""
    import torch

    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weight.mul_(100)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(4)


def lively_copy(source: Path, target: Path) -> Path:
    """A copy of a tiny random model whose answers depend on the conversation. The fixtures' own random weights
    (std 0.02, embeddings tied to the output) make every greedy answer a run of newlines, the prompt's last token
    predicting itself, so equal answers would prove nothing: attention and MLP outputs scaled up make each block
    count, and the answers differ from prompt to prompt and with the history."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    scale_up_blocks(model)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target
