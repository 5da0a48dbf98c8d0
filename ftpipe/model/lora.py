"""Which linear layers of the base model get LoRA adapters (train.lora.target_modules).

`[all-linear]` (the default) is resolved here, for every architecture, into one explicit list: the sorted leaf
names of the torch.nn.Linear layers inside the language model's transformer blocks (bitsandbytes' Linear4bit
subclasses nn.Linear, so a 4-bit base resolves the same). Not PEFT's own "all-linear": that takes every
nn.Linear but the output head, a vision tower's and a multimodal projector's included; and Unsloth's
get_peft_model optimizes known names and may not accept the string. Both backends get the same list, which
metrics/train.json and the adapter's adapter_config.json record.

Llama, Qwen2, Gemma, Gemma 2: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. Phi-3 fuses two of
each: qkv_proj, o_proj, gate_up_proj, down_proj. Mixture-of-experts models: LoRA covers their nn.Linear layers
only. gpt-oss's are the attention projections (q, k, v, o_proj); its experts are 3-D nn.Parameters
(mlp.experts.gate_up_proj, down_proj) and its router (GptOssTopKRouter) a weight of its own, not nn.Linear, so
both stay frozen (PEFT's `target_parameters` could reach the experts; Unsloth adds them only when an MLP name
such as gate_proj is targeted, which this list does not have for gpt-oss: both backends train the same layers).

torch is imported inside the functions: see ftpipe/model/training.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ftpipe.core.errors import PipelineError

ALL_LINEAR = "all-linear"   # train.lora.target_modules: [all-linear]
OUTPUT_HEAD = "lm_head"     # the usual name of the output head, never a target of all-linear


@dataclass(frozen=True)
class LoraTargets:
    """What LoraConfig is given. PEFT matches a target to a module whose name is it or ends with "." + it, so a
    leaf name alone would also match a vision tower's q_proj: `exclude` (LoraConfig.exclude_modules, a regex
    matched against whole module names) then keeps the adapters inside the decoder layers."""
    modules: list[str]
    exclude: str | None = None


def linear_layers(model) -> dict:
    """Every torch.nn.Linear of the model (4-bit ones included) by its dotted name."""
    import torch

    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name}


def decoder_layers_name(model) -> str | None:
    """The dotted name of the module list holding the language model's transformer blocks: "model.layers" (Llama,
    Phi-3, Qwen2, Gemma, gpt-oss), "model.language_model.layers" (Gemma 3 with its vision tower). Found through
    model.get_decoder() (the text decoder of a multimodal model); its `layers`, else its largest module list.
    None when there is none."""
    import torch

    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None:
        return None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        lists = [child for child in decoder.children() if isinstance(child, torch.nn.ModuleList)]
        if not lists:
            return None
        layers = max(lists, key=lambda child: sum(parameter.numel() for parameter in child.parameters()))
    return next((name for name, module in model.named_modules() if module is layers), None)


def resolve_all_linear(model) -> LoraTargets:
    """[all-linear] as explicit leaf names: the linear layers inside the decoder layers, never the output head
    (lm_head, or whatever model.get_output_embeddings() is), a vision tower or a multimodal projector."""
    linear = linear_layers(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    blocks = decoder_layers_name(model)
    inside = [name for name, module in linear.items()
              if module is not head and leaf(name) != OUTPUT_HEAD
              and (blocks is None or name.startswith(blocks + "."))]   # no blocks found: every linear but the head
    if not inside:
        raise PipelineError(f"params.yaml train.lora.target_modules: [{ALL_LINEAR}] found no linear layer in the base "
                            f"model's transformer blocks. Name its layers instead, e.g. "
                            f"[{', '.join(sorted({leaf(name) for name in linear}))}].")
    modules = sorted({leaf(name) for name in inside})
    clashes = sorted(name for name in linear if name not in inside and leaf(name) in modules)
    if not clashes:
        return LoraTargets(modules)
    if blocks is not None:   # every module outside the blocks (the vision tower, the projector, the head)
        return LoraTargets(modules, rf"(?!{re.escape(blocks)}\.).*")
    return LoraTargets(modules, "|".join(re.escape(name) for name in clashes))


def lora_targets(model, target_modules: list[str]) -> LoraTargets:
    """What PEFT (and Unsloth) are given: [all-linear] resolved (resolve_all_linear), or the names of
    train.lora.target_modules as they are, checked against the model's linear layers: a name PEFT would not find is
    an error listing the model's real names (Phi-3 fuses qkv_proj where Llama has q_proj)."""
    if target_modules == [ALL_LINEAR]:
        return resolve_all_linear(model)
    names = list(linear_layers(model))
    missing = [target for target in target_modules
               if not any(name == target or name.endswith("." + target) for name in names)]
    if missing:
        real = sorted({leaf(name) for name in names} - {OUTPUT_HEAD})
        raise PipelineError(f"params.yaml train.lora.target_modules: {missing} not found in the base model. Its "
                            f"linear layers are: {', '.join(real)}. Name some of these, or [{ALL_LINEAR}].")
    return LoraTargets(list(target_modules))


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def sort_saved_targets(adapter_dir) -> None:
    """adapter_config.json with its target_modules sorted. PEFT keeps them as a set and writes them in the set's
    order, which Python's per-process string hashing changes from run to run: the same adapter would get another
    file, another content digest, and rerun every stage after train."""
    import json
    from pathlib import Path

    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
