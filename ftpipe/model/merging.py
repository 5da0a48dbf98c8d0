"""Fold a LoRA adapter into its 16-bit base shard by shard, W' = W + scale * (B @ A) computed in float32 and
rounded once to the base dtype, without ever holding the model.

Why not PEFT's `merge_and_unload`: it needs the whole base loaded, in float32 for an exact merge (4 bytes a
weight: 32 GB at 8B, more than a laptop or a 24 GB GPU holds). Here the base's safetensors shards are read
one at a time (`safetensors.safe_open`); a weight with LoRA factors is upcast to float32 (on the GPU when
there is one), gets its update and is rounded to the base dtype; every other tensor is copied byte for byte
(or cast in blocks of rows when the dtype changes); each output shard is streamed to disk tensor by tensor
(ftpipe.model.shards) with the base's shard layout, file names and index, plus config.json and
generation_config.json. A tied embedding stays as the base stores it (one tensor, no lm_head.weight).

Same numbers as PEFT: the operations are PEFT's own, in its order (get_delta_weight: (B @ A), transposed for
fan_in_fan_out, times scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, per module through
rank_pattern/alpha_pattern; then added to the float32 weight). On the CPU the result is bit for bit
`merge_and_unload()` in float32 then cast (tests/model/test_merging.py). A GPU's float32 matmul sums in
another order than the CPU's: on an H200 the merge equals merge_and_unload on the same GPU bit for bit (an 8B
model: 291 tensors of 291), and differs from a CPU merge by one rounding step of the 16-bit dtype at most
(the bench's tiny model in float16: 97 elements one step apart; bench/merge_memory.py --methods new,new-cpu).

Peak memory: the imports (torch, transformers: 0.56 GB), the adapter (loaded whole: r=16 on every linear layer
of an 8B model is 42M parameters, 168 MB in float32) and the weight at hand in float32 with its 16-bit input and
output (the largest of an 8B model, 14336 x 4096: 235 MB in float32). Tensors without LoRA go from file to file
through a 64 MiB buffer, and a shard is mapped (safe_open) only while one of its tensors is read, so neither a
shard nor the model is ever held and the shard size does not matter. Measured by bench/merge_memory.py
(bench/results/merge_memory_cpu.json, 2 CPU cores) on a random Llama 3.2 1B (1.24B parameters, 2.47 GB in
float16, r=16 on every linear layer): peak RSS 0.79 GB (0.23 GB above the imports), the same in 200 MB shards
and in one 2.47 GB shard, against 7.98 GB (3.2x the model) for merge_and_unload in float32; the two outputs
are bitwise identical, 146 tensors of 146. On an H200 (bench/results/merge_memory_gpu*.json), Llama 3.1 8B
(8.03B parameters, 16.06 GB in bfloat16, 5 GB shards): 0.39 GB of GPU memory and 1.55 GB RSS (0.85 GB of it
the imports and CUDA), 21 s; merge_and_unload took 33.2 GB of GPU memory and 17.9 GB RSS, and under a 24 GiB
cap it fails at once (it asks for 29.9 GiB).

Refused, with an error naming the key and the fix: adapter keys that match no base weight, DoRA and the other
PEFT variants whose update is not scale * B @ A, LoRA on embeddings, a full module (modules_to_save) that is a
tied embedding or head. Full modules otherwise (modules_to_save, and trained biases with lora.bias all or
lora_only) replace the base's tensor, as merge_and_unload does.
"""
from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, write_json
from ftpipe.model.modeling import torch_dtype
from ftpipe.model.shards import INDEX_FILE, ShardWriter, TensorInfo, model_shards, read_shard, write_index

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."   # PeftModel.base_model (LoraModel) .model (the transformers model)
COPIED_FILES = ("config.json", "generation_config.json")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
CAST_BLOCK_BYTES = 64 << 20   # float32 bytes cast at once when a tensor changes dtype (an 8B embedding is 2 GB)
EMBEDDING_MODULES = ("embed_tokens", "lm_head")   # PEFT's EMBEDDING_LAYER_NAMES: the pair a model may tie
# adapter_config.json options under which a LoRA module does not compute W + scale * B @ A on the base as
# stored: merging them as plain LoRA would give a model that is not the trained one.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA rescales each column by a trained magnitude",
    "lora_bias": "lora_bias trains a bias on lora_B",
    "use_bdlora": "BD-LoRA shares blocks across modules",
    "alora_invocation_tokens": "aLoRA acts only after its invocation tokens",
    "arrow_config": "Arrow routes between several adapters",
    "velora_config": "VeLoRA changes the update",
    "monteclora_config": "MonteCLoRA samples the update",
    "kasa_config": "KaSA changes the update",
    "use_qalora": "QA-LoRA pools the input",
    "target_parameters": "LoRA on parameters (MoE experts) is not a linear layer's weight",
    "layer_replication": "layer_replication duplicates base layers",
    "trainable_token_indices": "trainable tokens edit embedding rows",
}
# init_lora_weights methods that rewrite the base weights at initialization: the adapter belongs to that
# modified base, not to the one on disk.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraFactors:
    module: str   # the module's path in the model, as PEFT names it
    a_key: str
    b_key: str
    rank: int
    scale: float


@dataclass
class MergePlan:
    lora: dict[str, LoraFactors] = field(default_factory=dict)   # base tensor -> its LoRA factors
    copied: dict[str, str] = field(default_factory=dict)         # base tensor -> the adapter tensor replacing it


def merge_lora_shards(base_dir: Path, adapter_dir: Path, dtype: str, out_dir: Path,
                      device: str | None = None) -> dict:
    """Write base + adapter into `out_dir` in `dtype` (base.dtype), shard by shard; return what was done.
    `device`: where the float32 update is computed; default the GPU when there is one, else the CPU."""
    import torch
    from safetensors.torch import load_file

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    shards, sharded = model_shards(base_dir)
    config = read_json(base_dir / "config.json")
    if config.get("quantization_config"):
        raise PipelineError(f"{base_dir / 'config.json'}: the base is quantized ({config['quantization_config']}): "
                            "merge into a 16-bit base (base.dtype), never into quantized weights.")
    adapter_weights = adapter_dir / ADAPTER_WEIGHTS
    if not adapter_weights.exists():
        raise PipelineError(f"{adapter_weights}: not found. The merge reads a PEFT adapter saved as safetensors "
                            "(the train stage writes one): run `dvc repro train`.")
    adapter_config = read_json(adapter_dir / ADAPTER_CONFIG)
    base_tensors = {info.name: info for shard in shards for info in shard.tensors}
    adapter_tensors = {info.name: info for info in read_shard(adapter_weights).tensors}
    plan = plan_merge(adapter_config, adapter_tensors, base_tensors, config, adapter_dir)

    adapter = load_file(str(adapter_weights))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    target, target_name = torch_dtype(dtype), SAFETENSORS_DTYPE[dtype]
    fan_in_fan_out = bool(adapter_config.get("fan_in_fan_out"))
    written: list[tuple[str, list[tuple[str, int]]]] = []
    with tqdm(total=sum(info.nbytes for info in base_tensors.values()), unit="B", unit_scale=True,
              desc=f"merge ({device})") as bar:
        for shard in shards:
            layout = [(info.name, target_name if info.dtype in FLOAT_DTYPES else info.dtype, info.shape)
                      for info in shard.tensors]
            with (open(shard.path, "rb") as raw,
                  ShardWriter(out_dir / shard.path.name, layout, {"format": "pt", **shard.metadata}) as writer):
                for info in shard.tensors:
                    if info.name in plan.lora:
                        factors = plan.lora[info.name]
                        writer.write(info.name, [merged_weight(read_tensor(shard.path, info.name),
                                                               adapter[factors.a_key], adapter[factors.b_key],
                                                               factors.scale, fan_in_fan_out, target, device)])
                    elif info.name in plan.copied:
                        writer.write(info.name, [adapter[plan.copied[info.name]].to(target)])
                    elif info.dtype == target_name or info.dtype not in FLOAT_DTYPES:
                        writer.copy(info.name, raw, shard.data_start + info.begin)
                    else:
                        writer.write(info.name, cast_blocks(shard.path, info, target))
                    bar.update(info.nbytes)
            written.append((shard.path.name, writer.sizes))
    if sharded:
        write_index(out_dir, written)
    copy_config(base_dir, out_dir, dtype)
    return {"device": device, "lora_weights": len(plan.lora), "copied_from_adapter": len(plan.copied),
            "shards": len(shards), "index": INDEX_FILE if sharded else None}


def merged_weight(weight, lora_a, lora_b, scale: float, fan_in_fan_out: bool, dtype, device: str):
    """W + (B @ A) * scale in float32, rounded once to `dtype`, on `device`; back on the CPU. PEFT's
    get_delta_weight and merge in their order; in place, so one float32 copy of the weight exists."""
    import torch

    delta = lora_b.to(device, torch.float32) @ lora_a.to(device, torch.float32)
    delta.mul_(scale)
    if fan_in_fan_out:   # GPT-2 style Conv1D stores the weight as (in, out)
        delta = delta.T
    delta += weight.to(device)   # the 16-bit weight upcasts exactly; a + b == b + a in IEEE arithmetic
    return delta.to(dtype).cpu()


def read_tensor(path: Path, name: str):
    """One tensor of a shard. The shard is opened (safe_open maps it into memory) for this tensor alone: the
    pages read stay mapped, and counted in the process's memory, only while it is open, so a 5 GB shard
    never sits in memory whole."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as lazy:
        return lazy.get_tensor(name)


def cast_blocks(path: Path, info: TensorInfo, dtype) -> Iterator:
    """A tensor that changes dtype, cast CAST_BLOCK_BYTES (in float32) of rows at a time."""
    from safetensors import safe_open

    if len(info.shape) < 2:
        yield read_tensor(path, info.name).to(dtype)
        return
    step = max(1, CAST_BLOCK_BYTES // (4 * math.prod(info.shape[1:])))
    with safe_open(str(path), "pt") as lazy:
        rows = lazy.get_slice(info.name)
        for start in range(0, info.shape[0], step):
            yield rows[start:start + step].to(dtype)


def copy_config(base_dir: Path, out_dir: Path, dtype: str) -> None:
    """config.json and generation_config.json as the base has them; config.json's dtype set to `dtype`."""
    for name in COPIED_FILES:
        if (base_dir / name).exists():
            shutil.copyfile(base_dir / name, out_dir / name)
    config = read_json(out_dir / "config.json")
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
    if any(config.get(key) != dtype for key in keys):
        write_json(out_dir / "config.json", {**config, **{key: dtype for key in keys}})


# --- the plan: which adapter tensor goes into which base tensor -----------------------------------------

def plan_merge(adapter_config: dict, adapter_tensors: dict[str, TensorInfo], base_tensors: dict[str, TensorInfo],
               base_config: dict, adapter_dir: Path) -> MergePlan:
    """Map every adapter tensor to the base tensor it changes, or raise one error listing every problem:
    each LoRA pair and each full tensor must be used exactly once."""
    where = f"{adapter_dir}/{ADAPTER_WEIGHTS}"
    problems = config_problems(adapter_config, adapter_dir)
    pairs: dict[str, dict[str, str]] = {}
    copies: dict[str, str] = {}   # adapter key -> the base name it replaces (as PEFT names the module)
    for key in adapter_tensors:
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"{where}: {key!r} is not a PEFT LoRA key ({PEFT_PREFIX}<module>.lora_A.weight)")
            continue
        name = key[len(PEFT_PREFIX):]
        parts = name.split(".")
        if "lora_magnitude_vector" in parts:
            problems.append(f"{where}: {key!r} is a DoRA magnitude: train without use_dora")
        elif any(part.startswith("lora_embedding") for part in parts):
            problems.append(f"{where}: {key!r} is LoRA on an embedding, which this merge does not support: "
                            "leave embed_tokens out of train.lora.target_modules")
        elif name.endswith((".lora_A.weight", ".lora_B.weight")):
            pairs.setdefault(name[:-len(".lora_A.weight")], {})[parts[-2][-1]] = key
        elif any(part.startswith(("lora_", "modules_to_save", "trainable_tokens")) for part in parts):
            problems.append(f"{where}: {key!r} is a kind of PEFT tensor this merge does not know")
        else:   # a full tensor (modules_to_save, a trained bias): PEFT keeps the wrapped layer as base_layer
            copies[key] = name.replace(".base_layer.", ".")

    plan, used_by = MergePlan(), {}
    tied = ties_embeddings(base_config) and not any(name.endswith("lm_head.weight") for name in base_tensors)
    base_parts = [(name, name.split(".")) for name in base_tensors]
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            problems.append(f"{where}: {module}.lora_{missing}.weight is missing: a LoRA pair needs both factors")
            continue
        target = resolve(f"{module}.weight", pair["A"], base_parts, problems, tied)
        if target is None:
            continue
        rank, scale = lora_scale(adapter_config, module)
        a, b, base = adapter_tensors[pair["A"]], adapter_tensors[pair["B"]], base_tensors[target]
        product = (b.shape[0], a.shape[1])
        if adapter_config.get("fan_in_fan_out"):
            product = product[::-1]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
            problems.append(f"{where}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not of rank "
                            f"{rank} as {adapter_dir}/{ADAPTER_CONFIG} says (r, rank_pattern)")
        elif product != base.shape:
            problems.append(f"{where}: {module}: B @ A has shape {list(product)}, the base's {target} "
                            f"{list(base.shape)}: the adapter was trained on another model")
        elif base.dtype not in FLOAT_DTYPES:
            problems.append(f"{target}: stored as {base.dtype}; LoRA merges only into 16/32-bit float weights")
        else:
            plan.lora[target] = LoraFactors(module, pair["A"], pair["B"], rank, scale)
            used_by.setdefault(target, []).append(module)
    for key, name in sorted(copies.items()):
        if tied and name.split(".")[-2] in EMBEDDING_MODULES:
            problems.append(f"{where}: {key!r} replaces the {name.split('.')[-2]} of a model whose embedding and "
                            "output head are one tied tensor (tie_word_embeddings): this merge cannot untie them; "
                            "train without modules_to_save on it")
            continue
        target = resolve(name, key, base_parts, problems, tied)
        if target is None:
            continue
        if adapter_tensors[key].shape != base_tensors[target].shape:
            problems.append(f"{where}: {key!r} has shape {list(adapter_tensors[key].shape)}, the base's {target} "
                            f"{list(base_tensors[target].shape)} (a resized vocabulary is not supported)")
        elif base_tensors[target].dtype not in FLOAT_DTYPES:
            problems.append(f"{target}: stored as {base_tensors[target].dtype}, not a float tensor to replace")
        else:
            plan.copied[target] = key
            used_by.setdefault(target, []).append(key)
    problems += [f"{where}: {target} is changed by several adapter entries: {users}"
                 for target, users in used_by.items() if len(users) > 1]
    if problems:
        raise PipelineError(f"cannot merge the adapter in {adapter_dir} into the base:\n  " + "\n  ".join(problems)
                            + "\nNothing was written. Merge an adapter trained by this pipeline's train stage "
                              "on this base (dvc repro train).")
    return plan


def config_problems(config: dict, adapter_dir: Path) -> list[str]:
    where = f"{adapter_dir}/{ADAPTER_CONFIG}"
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"{where}: peft_type {config['peft_type']!r}: only LoRA adapters are merged")
    problems += [f"{where}: {key} = {config[key]!r}: {why}, which is not W + scale * B @ A: train without it"
                 for key, why in UNSUPPORTED_OPTIONS.items() if config.get(key)]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        problems.append(f"{where}: init_lora_weights = {init!r} rewrites the base weights when training starts: "
                        "the adapter does not belong to the base on disk")
    return problems


def ties_embeddings(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings")))


def resolve(name: str, key: str, base_parts: list[tuple[str, list[str]]], problems: list[str],
            tied: bool) -> str | None:
    """The base tensor for adapter tensor `key` (as the model names it, `name`), or None with a problem."""
    found = match_base_name(name, base_parts)
    if len(found) == 1:
        return found[0]
    if found:
        problems.append(f"{key!r} matches several base weights: {found}")
    else:
        hint = (" (the base ties lm_head to the embedding and stores no lm_head.weight: train without LoRA on "
                "lm_head)" if tied and "lm_head" in name.split(".") else "")
        problems.append(f"{key!r} matches no base weight{hint}")
    return None


def match_base_name(name: str, base_parts: list[tuple[str, list[str]]]) -> list[str]:
    """The base tensors `name` (a module path as the model names it + ".weight") is stored as: [name] when
    the base stores that name, else those sharing the longest dotted suffix with it, which must reach back
    to the layer index's container (`layers.3.`), so a layer never matches another layer; ties go to the
    most shared prefix words, so `model.language_model.layers.3...` finds `language_model.model.layers.3...`
    rather than the vision tower's `layers.3`. This covers a base stored under another prefix than the
    model's modules (multimodal checkpoints, a text-only model of a multimodal one). [] when nothing matches."""
    parts = name.split(".")
    if any(other == name for other, _ in base_parts):
        return [name]
    numeric = next((index for index, part in enumerate(parts) if part.isdigit()), None)
    required = len(parts) - numeric + 1 if numeric else 2   # "layers.3.mlp.up_proj.weight"; else "lm_head.weight"
    best: list[str] = []
    best_score: tuple[int, int] | None = None
    for other, other_parts in base_parts:
        shared = 0
        while shared < min(len(parts), len(other_parts)) and parts[-1 - shared] == other_parts[-1 - shared]:
            shared += 1
        if shared < required:
            continue
        score = (shared, len(set(parts[:-shared]) & set(other_parts[:-shared])))
        if best_score is None or score > best_score:
            best, best_score = [other], score
        elif score == best_score:
            best.append(other)
    return best


def lora_scale(config: dict, module: str) -> tuple[int, float]:
    """(rank, scale) of one module: r and lora_alpha, or the first rank_pattern/alpha_pattern key that
    matches the module's path as PEFT matches it (peft.utils.other.get_pattern_key: `(.*\\.)?(<key>)$`);
    scale lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (PEFT's LoraLayer.update_layer)."""
    rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return rank, (alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)


def pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default

