"""QLoRA training speed and memory on one GPU: the project's train stage against the setups users
would otherwise pick, with the same model, data, sequence length, batch and LoRA config.

Methods (each in its own process: Unsloth patches transformers when imported, so the plain
transformers baseline must never share a process with it):
  stage         the project's train stage (stages.train.train_adapter, backend unsloth)
  unsloth_loop  a minimal hand-written loop over the same Unsloth model: the ceiling for the stage
  unsloth_trl   Unsloth + TRL SFTTrainer as in Unsloth's notebooks, as it ships (packing defaults)
  unsloth_trl_unpacked  the same with packing and padding-free turned off
  hf_peft_bnb   transformers + peft + bitsandbytes NF4 without Unsloth, tuned as PEFT's QLoRA guide does
  hf_peft_bnb_minimal  the same with the library defaults (fp4, float32 compute; fixed data only)
  max_length    the longest sequence one training step of the stage's model setup fits (batch 1)
Data:
  fixed     random token ids, every row exactly --seq-len tokens
  variable  the default data set (data/clean/train.jsonl, carried in .gpu-payload/clean), chat
            template applied; the stage, the loop and the baseline take it packed into rows of
            --seq-len tokens, TRL takes one example per row and packs it itself (or not)
Models: random-initialized Llama-architecture models built on the spot from a config (no weights
can be downloaded on the GPU machine; speed and memory are those of the real models): 1b
(Llama 3.2 1B dimensions) and 8b (Llama 3.1 8B dimensions).

For every run: tokens/s (positions computed, padding included), useful (non-padding) tokens/s,
peak GPU memory (torch.cuda.max_memory_allocated from the first training step on, the 4-bit
weights included) and MFU = 4 * N * tokens/s / the GPU's dense bf16 peak (ftpipe.model.gpu). The first
--warmup steps are left out of the rates.

    # here (CPU): the carried folders (see bench/gpu_train_smoke.py for .gpu-site/.gpu-payload)
    bash ../shared/gpu/make-gpu-site.sh && python bench/gpu_train_smoke.py --prepare \\
        && python bench/gpu_train_bench.py --prepare
    # on the GPU machine, carrying .gpu-site and .gpu-payload:
    PYTHONPATH=$PWD/.gpu-site:$PWD python3 bench/gpu_train_bench.py --models 1b,8b --out $OUT
Writes <out>/gpu_train_bench.json (commit it as bench/results/gpu_train_bench.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = REPO / ".gpu-payload"
SKELETON = PAYLOAD / "base-skeleton"     # the embedded model's tokenizer (and config), no weights
CARRIED_CLEAN = PAYLOAD / "clean"        # the default data set's clean train split
LLAMA = {   # dimensions of the released models; vocabulary 128256 (our tokenizer's ids are < 49152)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
METHODS = ("stage", "unsloth_loop", "unsloth_trl", "unsloth_trl_unpacked", "hf_peft_bnb", "hf_peft_bnb_minimal")
WORKERS = METHODS + ("max_length",)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- preparation (CPU side and GPU side) -----------------------------------------------------------

def prepare() -> None:
    """CPU side: carry the default data set's clean train split."""
    shutil.rmtree(CARRIED_CLEAN, ignore_errors=True)
    CARRIED_CLEAN.mkdir(parents=True)
    shutil.copy2(REPO / "data/clean/train.jsonl", CARRIED_CLEAN / "train.jsonl")
    for split in ("validation", "test"):   # tokenize_splits reads all three; the benchmark trains on train
        shutil.copy2(REPO / f"data/clean/{split}.jsonl", CARRIED_CLEAN / f"{split}.jsonl")
    print(f"wrote {CARRIED_CLEAN}")


def build_model(size: str, folder: Path) -> None:
    """A random-initialized Llama of `size` in bf16 safetensors, with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SKELETON)
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **LLAMA[size])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)   # initialize in bf16 directly: 16 GB for 8B, not 32
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    # train_adapter fingerprints the base by its content digest (content.json, as the base stage writes it)
    record = json.dumps({"digest": f"random-init-llama-{size}-seed0", "dtype": "bfloat16", "parameters": parameters})
    (folder / "provenance.json").write_text(record)
    (folder / "content.json").write_text(record)
    del model
    torch.cuda.empty_cache()


def build_data(model_dir: Path, seq_len: int, rows: int, folder: Path) -> dict:
    """fixed/ (random rows of exactly seq_len), variable-packed/ and variable-unpacked/ (the default data)."""
    import random

    from ftpipe.core.params import TokenizeParams
    from ftpipe.data.parquet_rows import write_rows
    from ftpipe.model.modeling import load_tokenizer
    from stages.tokenize import tokenize_splits

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "fixed").mkdir(parents=True)
    rng = random.Random(0)
    vocab = len(load_tokenizer(model_dir))
    fixed = [[rng.randrange(3, vocab) for _ in range(seq_len)] for _ in range(rows)]
    write_rows(folder / "fixed/train.parquet", {"id": [f"r{i}" for i in range(rows)], "input_ids": fixed,
                                                "labels": fixed})
    tokenizer = load_tokenizer(model_dir)
    stats = {}
    for name, packing in (("variable-packed", True), ("variable-unpacked", False)):
        (folder / name).mkdir()
        params = TokenizeParams(max_seq_length=seq_len, truncation="truncate", assistant_only_loss=True,
                                packing=packing,
                                chat_template=None, chat_template_kwargs={}, system_prompt=None)
        stats[name] = tokenize_splits(CARRIED_CLEAN, tokenizer, params, folder / name)[0]["train"]
    return stats


# --- measuring ---------------------------------------------------------------------------------------

class StepClock:
    """Per-step tokens, useful tokens, seconds and peak memory; rates over the steps after warm-up."""

    def __init__(self):
        import torch

        self.torch = torch
        self.steps: list[dict] = []
        self.pending = (0, 0)
        self.last = None

    def start(self) -> None:
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        self.last = time.perf_counter()

    def count(self, batch: dict) -> None:
        tokens = batch["input_ids"].numel()
        if "attention_mask" in batch and batch["attention_mask"] is not None:
            useful = int(batch["attention_mask"].sum())
        elif "real_tokens" in batch:
            useful = int(batch["real_tokens"])
        else:   # padding-free rows, or fixed-length rows: every position is a real token
            useful = tokens
        self.pending = (self.pending[0] + tokens, self.pending[1] + useful)

    def step_done(self, loss: float | None = None) -> None:
        self.torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps.append({"tokens": self.pending[0], "useful_tokens": self.pending[1],
                           "seconds": now - self.last, "loss": loss,
                           "peak_memory_gib": self.torch.cuda.max_memory_allocated() / 2**30})
        self.pending, self.last = (0, 0), now

    def summary(self, warmup: int, parameters: int) -> dict:
        """The same rates as the stage reports (ftpipe.model.training.throughput), over the steps after warm-up."""
        from ftpipe.model.gpu import bf16_peak_flops, mfu
        from ftpipe.model.training import throughput

        timed = self.steps[warmup:]
        rates = throughput(self.steps, skip_first=warmup)
        rates["peak_memory_gib"] = round(rates["peak_memory_gib"], 3)
        rates["mfu"] = mfu(parameters, rates["tokens_per_s"], bf16_peak_flops(self.torch.cuda.get_device_name(0)))
        return {"steps": len(self.steps), "timed_steps": len(timed), **rates,
                "seconds_per_step": round(sum(s["seconds"] for s in timed) / len(timed), 4),
                "losses": [round(s["loss"], 4) for s in self.steps if s["loss"] is not None][:3]}


def batches(rows: list[dict], batch_size: int, steps: int, layout):
    """The full batches of `rows` in order, cycled: after one pass every batch shape has been seen."""
    full = len(rows) // batch_size
    for step in range(steps):
        start = (step % full) * batch_size
        yield layout(rows[start:start + batch_size])


def train_params(args, steps: int):
    """The params.yaml train section with the benchmark's settings (the same for every method)."""
    import dataclasses

    from ftpipe.core.params import load_params

    train = load_params(REPO / "params.yaml").train
    lora = dataclasses.replace(train.lora, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, bias="none",
                               target_modules=TARGET_MODULES)
    # the plan these results were measured with (before train.gradient_checkpointing: auto): Unsloth's offloaded
    # checkpointing on every layer, the whole batch at once
    return dataclasses.replace(train, backend="unsloth", max_steps=steps, num_epochs=None, batch_size=args.batch,
                               micro_batch_size=args.batch, learning_rate=2e-4, lr_scheduler="linear",
                               warmup_steps=2, gradient_checkpointing="unsloth", checkpoint_every=10_000,
                               checkpoint_runs_kept=0, lora=lora)


# --- the methods (worker side) -------------------------------------------------------------------------

def run_stage(args, data_dir: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from ftpipe.model.training import throughput
    from stages.train import train_adapter

    class ResetPeak(TrainerCallback):   # peak memory of training, as for the other methods
        def on_train_begin(self, *a, **k):
            torch.cuda.reset_peak_memory_stats()

    out = Path(args.work) / "stage-out"
    shutil.rmtree(out, ignore_errors=True)
    result = train_adapter(train_params(args, args.steps), args.seq_len, Path(args.model_dir), data_dir,
                           Path(args.work) / "stage-checkpoints", out, [ResetPeak()])
    curve = result["curve"]
    timed = curve[args.warmup:]
    return {"steps": len(curve), "timed_steps": len(timed), **throughput(curve, skip_first=args.warmup),
            "seconds_per_step": round(sum(r["seconds"] for r in timed) / len(timed), 4),
            "losses": [round(r["loss"], 4) for r in curve[:3]], "stage_metrics": result["metrics"]}


def hand_loop(model, rows: list[dict], layout, args, parameters: int) -> dict:
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    clock = StepClock()
    model.train()
    clock.start()
    for batch in batches(rows, args.batch, args.steps, layout):
        clock.count(batch)
        batch = {k: v.to("cuda") for k, v in batch.items() if k != "real_tokens"}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_done(float(loss))
    return clock.summary(args.warmup, parameters)


def with_real_tokens(layout):
    import torch

    def wrapped(rows):
        batch = layout(rows)
        batch["real_tokens"] = torch.tensor(sum(len(row["input_ids"]) for row in rows))
        return batch
    return wrapped


def run_unsloth_loop(args, data: dict) -> dict:
    from ftpipe.model.gpu import base_parameter_count
    from ftpipe.model.modeling import pad_batch, padding_free_batch
    from ftpipe.model.training import load_trainable_model

    model = load_trainable_model("unsloth", train_params(args, args.steps), Path(args.model_dir), args.seq_len,
                                 "bfloat16")
    n = base_parameter_count(args.model_dir)
    return {"fixed": hand_loop(model, data["fixed"], lambda rows: pad_batch(rows, 0), args, n),
            "variable": hand_loop(model, data["variable-packed"], with_real_tokens(padding_free_batch), args, n)}


def run_trl(args, data: dict, packing_default: bool) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ftpipe.model.gpu import base_parameter_count
    from ftpipe.model.modeling import load_tokenizer
    from ftpipe.model.training import load_trainable_model

    model = load_trainable_model("unsloth", train_params(args, args.steps), Path(args.model_dir), args.seq_len,
                                 "bfloat16")
    tokenizer = load_tokenizer(args.model_dir)
    n = base_parameter_count(args.model_dir)
    results = {}
    for name, rows in (("fixed", data["fixed"]), ("variable", data["variable-unpacked"])):
        dataset = datasets.Dataset.from_dict({"input_ids": [row["input_ids"] for row in rows]})
        # Unsloth's notebook settings, with the benchmark's batch, length and steps
        config = dict(output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=args.batch,
                      gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=2e-4, warmup_steps=2,
                      logging_steps=1, optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear",
                      seed=3407, report_to="none", max_length=args.seq_len, bf16=True, save_strategy="no",
                      dataset_num_proc=1)
        if not packing_default:
            config.update(packing=False, padding_free=False)
        clock = StepClock()

        class Clock(TrainerCallback):
            def on_train_begin(self, *a, **k):
                clock.start()

            def on_step_end(self, *a, **k):
                clock.step_done()

        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                             args=SFTConfig(**config), callbacks=[Clock()])
        original = trainer.training_step

        def counted(model, inputs, *a, **k):
            clock.count(inputs)
            return original(model, inputs, *a, **k)

        trainer.training_step = counted
        trainer.train()
        results[name] = clock.summary(args.warmup, n)
        results[name]["trl_config"] = {k: getattr(trainer.args, k, None) for k in ("packing", "padding_free",
                                                                                 "packing_strategy", "max_length")}
        torch.cuda.empty_cache()
    return results


def run_hf(args, data: dict, minimal: bool = False) -> dict:
    """transformers + peft + bitsandbytes. As tuned by PEFT's QLoRA guide (NF4, double quant, bf16
    compute, SDPA, non-reentrant checkpointing), or `minimal`: what one gets writing the least code,
    BitsAndBytesConfig(load_in_4bit=True) and prepare_model_for_kbit_training(model) with their
    defaults (fp4 without double quant, float32 compute; checkpointing and attention as transformers
    defaults them: non-reentrant, SDPA). LoRA config, batches and loop are those of every other method."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftpipe.model.gpu import base_parameter_count
    from ftpipe.model.modeling import pad_batch, pad_packed_batch

    if minimal:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, device_map={"": 0},
                                                     quantization_config=BitsAndBytesConfig(load_in_4bit=True))
        model = prepare_model_for_kbit_training(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                             bias="none", target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    n = base_parameter_count(args.model_dir)
    result = {"fixed": hand_loop(model, data["fixed"], lambda rows: pad_batch(rows, 0), args, n)}
    if not minimal:
        result["variable"] = hand_loop(model, data["variable-packed"],
                                       with_real_tokens(lambda rows: pad_packed_batch(rows, 0)), args, n)
    config = model.base_model.model.config.quantization_config
    result["quantization"] = {k: str(getattr(config, k)) for k in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                                                                   "bnb_4bit_compute_dtype")}
    result["attention"] = model.base_model.model.config._attn_implementation
    return result


def host_memory() -> dict:
    """This process's peak resident memory since the last reset and the machine's available memory (bytes)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {"peak_rss": int(status["VmHWM"].split()[0]) * 1024,
            "available": int(meminfo["MemAvailable"].split()[0]) * 1024}


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")   # Linux: resets VmHWM to the current resident size


def run_max_length(args) -> dict:
    """The longest sequence (batch 1) one full QLoRA step trains at on this machine, with the stage's
    model setup (Unsloth, 4-bit, LoRA, gradient checkpointing "unsloth", train mode).

    Two memories bound it: the GPU's, and the host's, because Unsloth's checkpointing offloads each
    layer's input to CPU RAM (32 layers x 4096 x 2 bytes = 256 KiB per token for the 8B). Running out
    of GPU memory raises an exception the search catches; running out of host memory gets the process
    killed, so the host limit is predicted and never tried. A step at 2^18 tokens costs minutes
    (attention time is quadratic), so the search does not double blindly: it measures 3 short lengths
    (--max-length-start, x2, x4), predicts from the two longest lengths that fitted where GPU and
    host memory run out, tries the smaller prediction, and repeats (bisecting once a length has
    failed) until one length fits and the next --max-length-step fails on the GPU, or the host's
    limit stops it. Trials whose predicted time would overrun --max-length-seconds are not started;
    --max-length-resume continues from the trials an earlier call wrote."""
    import torch

    from ftpipe.model.training import load_trainable_model

    model = load_trainable_model("unsloth", train_params(args, 1), Path(args.model_dir), 1 << 19, "bfloat16")
    model.train()   # gradient checkpointing runs in train mode only: in eval mode every activation is kept
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    started, trials = time.time(), []
    capacity = torch.cuda.get_device_properties(0).total_memory

    def fits(length: int) -> bool:
        ids = torch.randint(3, 49152, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        # if host memory runs out the kernel kills this process: the parent records the length tried
        Path(args.result).write_text(json.dumps({"trials": trials, "in_progress": length}))
        began = time.time()
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            torch.cuda.synchronize()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        optimizer.zero_grad(set_to_none=True)
        loss = None
        trials.append({"length": length, "fits": ok, "seconds": round(time.time() - began, 1),
                       "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       "host_peak_rss_gib": round(host_memory()["peak_rss"] / 2**30, 2)})
        print(trials[-1], flush=True)
        return ok

    def affordable(length: int) -> bool:
        last = max((t for t in trials if "seconds" in t), key=lambda t: t["length"])
        if 2 * last["length"] < length:   # from the short fit lengths the length-squared guess is far too high
            return True
        return time.time() - started + last["seconds"] * (length / last["length"]) ** 2 < args.max_length_seconds

    if args.max_length_resume:   # trials of an earlier call (a 10-minute call holds about two long ones)
        earlier = json.loads(Path(args.max_length_resume).read_text())
        earlier = earlier.get("models", {}).get("8b", {}).get("methods", {}).get("max_length", earlier)
        trials.extend(dict(trial, call=trial.get("call", "earlier")) for trial in earlier["trials"])
    fit_lengths = [args.max_length_start * 2**i for i in range(3)]
    for length in fit_lengths:
        if length not in {t["length"] for t in trials} and not fits(length):
            raise SystemExit(f"the model does not train at {length} tokens: lower --max-length-start")
    # what torch can hold: free memory plus its own pool (the CUDA context lies outside), less 2% that
    # the caching allocator loses to fragmentation at these block sizes
    gpu_budget = 0.98 * (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved())
    host = host_memory()
    host_budget = 0.9 * (host["available"] + host["peak_rss"])   # keep 10% of RAM for everything else
    step = args.max_length_step

    def predict() -> dict:
        """Where GPU and host memory run out: a line through the two longest lengths that fitted (memory
        is affine in length there; the short ones also carry fixed costs such as compile workspaces)."""
        done = sorted((t for t in trials if t["fits"]), key=lambda t: t["length"])[-2:]
        limits = {}
        for name, key, budget in (("gpu", "peak_memory_gib", gpu_budget), ("host", "host_peak_rss_gib", host_budget)):
            (x0, y0), (x1, y1) = ((t["length"], t[key] * 2**30) for t in done)
            slope = (y1 - y0) / (x1 - x0)
            longest = int(x1 + (budget - y1) / slope) // step * step if slope > 0 else 1 << 30
            limits[name] = {"kib_per_token": round(slope / 2**10, 1), "through": [x0, x1],
                            "predicted_longest": longest}
        return limits

    good = max(t["length"] for t in trials if t["fits"])
    failed = [t["length"] for t in trials if not t["fits"]]
    bad = min(failed) if failed else None
    killed = {t["length"] for t in trials if t.get("killed")}
    predictions = []
    while bad is None or bad - good > step:
        predictions.append(predict())
        host_limit = min([predictions[-1]["host"]["predicted_longest"]] + [k - step for k in killed])
        if bad is None:   # jump to where the GPU should run out, then walk
            length = max(min(predictions[-1]["gpu"]["predicted_longest"], host_limit), good + step)
        else:
            length = (good + bad) // 2 // step * step
        if (bad is None and length > host_limit) or not affordable(length):
            break
        if fits(length):
            good = length
        else:
            bad = length
    if bad is not None and bad - good <= step:
        bound = "host" if bad in killed else "gpu"
    else:
        bound = "host" if predictions and good + step > predictions[-1]["host"]["predicted_longest"] else "time"
    return {"longest_fitting": good, "shortest_failing": bad, "resolution": step, "bound_by": bound,
            "complete": bound != "time", "gpu_budget_gib": round(gpu_budget / 2**30, 1),
            "host_budget_gib": round(host_budget / 2**30, 1), "predictions": predictions,
            "gpu_memory_gib": round(capacity / 2**30, 1), "trials": trials}


def worker(args) -> None:
    if not args.worker.startswith("hf_peft_bnb"):
        import unsloth  # noqa: F401 - before transformers, trl and peft, in this process only
    from ftpipe.data.tokenized import load_tokenized

    work = Path(args.work)
    data = {name: load_tokenized("train", work / "data" / name)
            for name in ("fixed", "variable-packed", "variable-unpacked")}
    if args.worker == "stage":
        import torch

        result = {"fixed": run_stage(args, work / "data/fixed")}
        torch.cuda.empty_cache()
        result["variable"] = run_stage(args, work / "data/variable-packed")
    elif args.worker == "unsloth_loop":
        result = run_unsloth_loop(args, data)
    elif args.worker == "max_length":
        result = run_max_length(args)
    elif args.worker in ("unsloth_trl", "unsloth_trl_unpacked"):
        result = run_trl(args, data, packing_default=args.worker == "unsloth_trl")
    else:
        result = run_hf(args, data, minimal=args.worker == "hf_peft_bnb_minimal")
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))


# --- orchestration -----------------------------------------------------------------------------------------

def run_method(args, method: str, model_dir: Path, out: Path) -> dict:
    result_file = Path(args.work) / f"{method}.json"
    result_file.unlink(missing_ok=True)
    log = out / f"{model_dir.name}-{method}.log"
    started = time.time()
    command = [sys.executable, __file__, "--worker", method, "--model-dir", str(model_dir), "--work", args.work,
               "--result", str(result_file), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--lora-r", str(args.lora_r),
               "--max-length-seconds", str(args.max_length_seconds), "--max-length-step", str(args.max_length_step),
               "--max-length-start", str(args.max_length_start)]
    if args.max_length_resume:
        command += ["--max-length-resume", str(Path(args.max_length_resume).resolve())]
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    entry = {"exit": code, "wall_seconds": round(time.time() - started, 1)}
    if code == 0 and result_file.exists():
        entry.update(json.loads(result_file.read_text()))
    elif method == "max_length" and result_file.exists():   # killed mid-trial: what it had done, and where it died
        partial = json.loads(result_file.read_text())
        note = "killed (host out of memory)" if code == -9 else ""
        entry["trials"] = partial["trials"] + [{"length": partial["in_progress"], "fits": False, "killed": True,
                                                "exit": code, "note": note}]
    else:
        entry["log_tail"] = log.read_text()[-3000:]
    print(f"{model_dir.name} {method}: exit {code}, {entry['wall_seconds']} s", flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="CPU side: write .gpu-payload/clean")
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    # git-ignored, so that a warm GPU machine keeps the built models between calls
    parser.add_argument("--work", default=str(REPO / ".bench-work"))
    # Unsloth compiles each decoder block on first use and again for each new shape until it marks the
    # length dynamic (the variable-length batches have ~10 different lengths): steps 1-10 are warm-up.
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-length-seconds", type=float, default=480)
    parser.add_argument("--max-length-step", type=int, default=8192)
    parser.add_argument("--max-length-start", type=int, default=8192)
    parser.add_argument("--max-length-resume", help="a gpu_train_bench.json whose max_length trials to continue from")
    parser.add_argument("--worker", choices=WORKERS)
    parser.add_argument("--model-dir")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.prepare:
        return prepare()
    if args.worker:
        return worker(args)

    import torch

    from ftpipe.core.provenance import environment

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    report = {"settings": {"seq_len": args.seq_len, "batch": args.batch, "steps": args.steps,
                           "timed_steps": args.steps - args.warmup, "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r,
                                                                              "dropout": 0, "bias": "none",
                                                                              "target_modules": TARGET_MODULES},
                           "quantization": "bitsandbytes NF4, double quant, bf16 compute",
                           "gradient_checkpointing": "unsloth (Unsloth methods), non-reentrant (hf_peft_bnb)"},
              "environment": environment(), "gpu": torch.cuda.get_device_name(0), "models": {}}
    for size in args.models.split(","):
        model_dir = work / f"llama-{size}"
        started = time.time()
        if not (model_dir / "provenance.json").exists():   # built by an earlier call on this machine
            build_model(size, model_dir)
        data_stats = build_data(model_dir, args.seq_len, args.batch * args.steps, work / "data")
        parameters = json.loads((model_dir / "provenance.json").read_text())["parameters"]
        entry = {"config": LLAMA[size], "parameters": parameters,
                 "build_seconds": round(time.time() - started, 1), "variable_data": data_stats, "methods": {}}
        report["models"][size] = entry
        for method in args.methods.split(","):
            entry["methods"][method] = run_method(args, method, model_dir, args.out)
            (args.out / "gpu_train_bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu_train_bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({size: {m: {d: {k: v.get(k) for k in ("tokens_per_s", "useful_tokens_per_s", "peak_memory_gib",
                                                             "mfu")} for d, v in r.items() if isinstance(v, dict)
                                  and "tokens_per_s" in v} for m, r in e["methods"].items()}
                      for size, e in report["models"].items()}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
