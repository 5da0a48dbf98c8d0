"""train.lora.target_modules: [all-linear] resolved per architecture, on tiny random models built from their
config classes: exactly the linear layers of the transformer blocks, never the output head, a vision tower or
the experts of a mixture; the adapter the train stage's loader builds holds LoRA on exactly those layers and
says so in adapter_config.json; and on the default (Llama) model, all-linear is the old explicit list: the same
layers, the same initialization, the same training (tests/stages/test_train.py)."""
import dataclasses
import json

import pytest

from ftpipe.model.lora import lora_targets
from ftpipe.model.training import load_trainable_model, trained_targets
from tests.model_fixtures import TARGET_MODULES, TOKENIZE, TRAIN

# Widths of 64 (and 32-wide key/value projections): whole bitsandbytes NF4 blocks.
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LAYERS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
ALL_LINEAR = dataclasses.replace(TRAIN, lora=dataclasses.replace(TRAIN.lora, target_modules=["all-linear"]))


def build(architecture: str):
    """A tiny random model of `architecture`, in float32."""
    import torch
    import transformers as t

    torch.manual_seed(0)
    if architecture == "gemma3-vision":   # Gemma 3 4B's layout: a SigLIP vision tower before the text decoder
        config = t.Gemma3Config(text_config=SMALL, mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4,
                                image_token_index=5,
                                vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=28, patch_size=14))
        return t.Gemma3ForConditionalGeneration(config)
    if architecture == "gpt-oss":
        return t.GptOssForCausalLM(t.GptOssConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2))
    config_class, model_class = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM), "phi3": (t.Phi3Config, t.Phi3ForCausalLM),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM), "gemma": (t.GemmaConfig, t.GemmaForCausalLM),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM)}[architecture]
    return model_class(config_class(**SMALL))


# architecture -> (its decoder layers, the linear layers of each block by submodule), written out by hand
EXPECTED = {
    "llama": ("model.layers", LLAMA_LAYERS),
    "qwen2": ("model.layers", LLAMA_LAYERS),
    "gemma": ("model.layers", LLAMA_LAYERS),
    "gemma2": ("model.layers", LLAMA_LAYERS),
    "phi3": ("model.layers", {"self_attn": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]}),
    # attention only: the experts are 3-D parameters, the router is not an nn.Linear (ftpipe/model/lora.py)
    "gpt-oss": ("model.layers", {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    "gemma3-vision": ("model.language_model.layers", LLAMA_LAYERS),
}


def expected_names(architecture: str) -> list[str]:
    return sorted({name for _, by_part in [EXPECTED[architecture]] for names in by_part.values() for name in names})


def expected_layers(architecture: str) -> set[str]:
    """The full names of the linear layers LoRA must wrap: every block's, in the text decoder."""
    blocks, by_part = EXPECTED[architecture]
    return {f"{blocks}.{index}.{part}.{name}" for index in range(SMALL["num_hidden_layers"])
            for part, names in by_part.items() for name in names}


@pytest.mark.parametrize("architecture", list(EXPECTED))
def test_all_linear_is_the_linear_layers_of_the_transformer_blocks(architecture):
    import torch

    model = build(architecture)
    targets = lora_targets(model, ["all-linear"])
    assert targets.modules == expected_names(architecture)
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert expected_layers(architecture) <= linear
    outside = linear - expected_layers(architecture)   # the head, and a vision tower's layers
    assert "lm_head" in outside
    # Leaf names shared with modules outside the blocks (SigLIP's q_proj, k_proj, v_proj) need the exclusion.
    clash = any(name.rsplit(".", 1)[-1] in targets.modules for name in outside)
    assert (targets.exclude is not None) is clash is (architecture == "gemma3-vision")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict:
    """Each architecture saved as a local model folder, as the base stage leaves it (weights and config)."""
    folders = {}
    for architecture in EXPECTED:
        folder = tmp_path_factory.mktemp(architecture)
        build(architecture).save_pretrained(folder)
        folders[architecture] = folder
    return folders


@pytest.mark.parametrize("architecture", list(EXPECTED))
def test_the_adapter_holds_lora_on_exactly_those_layers(saved_models, tmp_path, architecture):
    """The train stage's own loader (the CPU backend: the transformers backend differs only in the device)
    on a 4-bit base: LoRA modules on exactly the expected layers, nothing else trainable, and the adapter's
    adapter_config.json naming exactly the resolved list."""
    from peft.tuners.lora import LoraLayer

    model = load_trainable_model("cpu", ALL_LINEAR, saved_models[architecture], TOKENIZE.max_seq_length, "float32")
    prefix = "base_model.model."
    wrapped = {name.removeprefix(prefix) for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == expected_layers(architecture)
    trainable = {name.removeprefix(prefix).split(".lora_")[0]
                 for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == expected_layers(architecture)   # no expert, router, vision layer or head
    assert trained_targets(model) == expected_names(architecture)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == expected_names(architecture)

    # As evaluate and merge load it: the adapter onto the 16-bit base wraps the same layers.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_models[architecture]),
                                         tmp_path / "adapter")
    assert {name.removeprefix(prefix) for name, module in reloaded.named_modules()
            if isinstance(module, LoraLayer)} == expected_layers(architecture)


def test_all_linear_on_the_default_llama_is_the_explicit_list(tiny_base):
    """Switching train.lora.target_modules from the seven Llama names to [all-linear] changes nothing: the same
    layers get LoRA, initialized to the same values (the trained adapters are compared in test_train.py)."""
    from transformers import set_seed

    explicit = dataclasses.replace(TRAIN, lora=dataclasses.replace(TRAIN.lora, target_modules=TARGET_MODULES))
    weights = {}
    for name, params in (("explicit", explicit), ("all-linear", ALL_LINEAR)):
        set_seed(params.seed)   # as build_trainer does
        model = load_trainable_model("cpu", params, tiny_base, TOKENIZE.max_seq_length, "float32")
        weights[name] = {key: value.detach().clone() for key, value in model.named_parameters() if "lora_" in key}
        assert trained_targets(model) == sorted(TARGET_MODULES)
    assert weights["explicit"].keys() == weights["all-linear"].keys() and weights["explicit"]
    assert all(bool((weights["explicit"][key] == weights["all-linear"][key]).all()) for key in weights["explicit"])
