"""The shard-by-shard merge (ftpipe.model.merging) against PEFT's merge_and_unload, the reference it replaces.

Equality is bitwise: on the CPU the merge runs PEFT's own float32 operations in PEFT's order ((B @ A), times
the scale, added to the float32 weight, rounded once to bfloat16), so every tensor must be identical to
merge_and_unload() in float32 then cast. Each case: the tiny trained adapter; the base saved in shards; an
adapter with use_rslora, rank_pattern and alpha_pattern; full modules and trained biases (modules_to_save,
bias all); a base stored under another prefix; and the errors for what the merge refuses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.model.merging import match_base_name, merge_lora_shards, merged_weight
from ftpipe.model.modeling import load_model
from ftpipe.model.shards import INDEX_FILE, SINGLE_FILE

DTYPE = "bfloat16"


def tensors(folder: Path) -> dict:
    """Every tensor of a safetensors model folder (single file or shards)."""
    from safetensors.torch import load_file

    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


def peft_reference(base_dir: Path, adapter_dir: Path) -> dict:
    """PEFT's merge: the base in float32 with the adapter, merge_and_unload(), cast to bfloat16."""
    import torch

    merged = load_model(base_dir, "float32", adapter_dir=adapter_dir).merge_and_unload().to(torch.bfloat16)
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


def assert_same(ours: dict, reference: dict, base: dict) -> None:
    """Our tensors are the base's names, each bitwise the reference's."""
    assert ours.keys() == base.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == reference[name].dtype, name
        assert tensor.equal(reference[name]), f"{name}: differs from merge_and_unload"


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    return merge_lora_shards(base_dir, adapter_dir, DTYPE, out_dir, device="cpu")


def random_adapter(base_dir: Path, out_dir: Path, seed: int = 1, **lora) -> Path:
    """A LoRA adapter made by PEFT on the base, with random A and B (init_lora_weights=False: B is not zero,
    so every update is visible), saved as the train stage saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], "init_lora_weights": False, **lora}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    with torch.no_grad():   # trained-like full tensors: modules_to_save copies and biases, moved off the base's
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad and "lora_" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory) -> Path:
    """A tiny untied Llama with attention biases (vocabulary 256): the cases tied SmolLM2 does not have."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("untied-base")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_merge_is_bitwise_peft_merge_and_unload(tiny_base, tiny_trained, tiny_merged, tmp_path):
    reference = peft_reference(tiny_base, tiny_trained["adapter"])
    done = merge(tiny_base, tiny_trained["adapter"], tmp_path / "merged")
    assert done == {"device": "cpu", "lora_weights": 14, "copied_from_adapter": 0, "shards": 1, "index": None}
    base = tensors(tiny_base)
    assert "lm_head.weight" not in base   # tied: the base stores the embedding once, and so does the merge
    assert_same(tensors(tmp_path / "merged"), reference, base)
    assert_same(tensors(tiny_merged), reference, base)   # the merge stage's output (tests/conftest.py)
    assert sorted(path.name for path in (tmp_path / "merged").iterdir()) == [
        "config.json", "generation_config.json", SINGLE_FILE]
    assert (tmp_path / "merged/config.json").read_bytes() == (tiny_base / "config.json").read_bytes()


def test_a_sharded_base_merges_into_the_same_tensors_and_layout(tiny_base, tiny_trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.bfloat16).save_pretrained(
        sharded, max_shard_size="200KB")
    base_index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(base_index["weight_map"].values())) > 1   # really sharded
    merge(sharded, tiny_trained["adapter"], tmp_path / "from-shards")
    merge(tiny_base, tiny_trained["adapter"], tmp_path / "from-one-file")

    single, from_shards = tensors(tmp_path / "from-one-file"), tensors(tmp_path / "from-shards")
    assert single.keys() == from_shards.keys()
    assert all(single[name].equal(from_shards[name]) for name in single)
    index = json.loads((tmp_path / "from-shards" / INDEX_FILE).read_text())
    assert index["weight_map"] == base_index["weight_map"]   # the base's layout: same files, same tensors
    assert index["metadata"]["total_size"] == sum(tensor.numel() * tensor.element_size()
                                                  for tensor in from_shards.values())
    assert not list((tmp_path / "from-shards").glob(".*"))   # no temporary left behind


def test_rslora_rank_and_alpha_patterns_merge_like_peft(tiny_base, tmp_path):
    adapter = random_adapter(tiny_base, tmp_path / "adapter", use_rslora=True,
                             rank_pattern={"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2}, alpha_pattern={"v_proj": 32})
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["rank_pattern"] and config["alpha_pattern"]
    merge(tiny_base, adapter, tmp_path / "merged")
    assert_same(tensors(tmp_path / "merged"), peft_reference(tiny_base, adapter), tensors(tiny_base))


def test_modules_to_save_and_trained_biases_replace_the_base_tensors(untied_base, tmp_path):
    adapter = random_adapter(untied_base, tmp_path / "adapter", target_modules=["q_proj", "o_proj"], bias="all",
                             modules_to_save=["lm_head"])
    done = merge(untied_base, adapter, tmp_path / "merged")
    # lm_head, and the q, k, v and o_proj biases of both layers (Llama's attention_bias)
    assert done["lora_weights"] == 4 and done["copied_from_adapter"] == 9
    base, ours = tensors(untied_base), tensors(tmp_path / "merged")
    assert_same(ours, peft_reference(untied_base, adapter), base)
    assert not ours["lm_head.weight"].equal(base["lm_head.weight"])
    assert not ours["model.layers.0.self_attn.k_proj.bias"].equal(base["model.layers.0.self_attn.k_proj.bias"])


def test_a_base_stored_under_another_prefix_keeps_its_names(tiny_base, tiny_trained, tmp_path):
    """A multimodal checkpoint stores its decoder as language_model.model.layers..., the model names it
    model.language_model.layers...: the adapter's names are the model's, the merge writes the base's."""
    from safetensors.torch import save_file

    prefixed = tmp_path / "prefixed-base"
    shutil.copytree(tiny_base, prefixed)
    save_file({f"language_model.{name}": tensor for name, tensor in tensors(tiny_base).items()},
              str(prefixed / SINGLE_FILE), metadata={"format": "pt"})
    merge(tiny_base, tiny_trained["adapter"], tmp_path / "plain")
    merge(prefixed, tiny_trained["adapter"], tmp_path / "prefixed")
    plain, ours = tensors(tmp_path / "plain"), tensors(tmp_path / "prefixed")
    assert ours.keys() == {f"language_model.{name}" for name in plain}
    assert all(ours[f"language_model.{name}"].equal(tensor) for name, tensor in plain.items())


def test_base_names_match_by_suffix_and_prefix_words_never_across_layers():
    base = ["language_model.model.layers.3.self_attn.q_proj.weight",
            "language_model.model.layers.13.self_attn.q_proj.weight",
            "vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight",
            "language_model.lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    parts = [(name, name.split(".")) for name in base]
    assert match_base_name("model.language_model.layers.3.self_attn.q_proj.weight", parts) == [base[0]]
    assert match_base_name("model.vision_tower.encoder.layers.3.self_attn.q_proj.weight", parts) == [base[2]]
    assert match_base_name("model.layers.0.mlp.up_proj.weight", parts) == [base[4]]   # exact
    assert match_base_name("lm_head.weight", parts) == [base[3]]
    assert match_base_name("model.layers.3.self_attn.q_proj.weight", parts) == [base[0]]   # "model" is shared
    assert match_base_name("other.layers.3.self_attn.q_proj.weight", parts) == [base[0], base[2]]   # ambiguous
    assert match_base_name("model.layers.4.self_attn.q_proj.weight", parts) == []
    assert match_base_name("model.layers.3.self_attn.k_proj.weight", parts) == []


def test_fan_in_fan_out_transposes_the_update():
    import torch

    torch.manual_seed(0)
    weight, a, b = torch.randn(6, 4).to(torch.bfloat16), torch.randn(2, 6), torch.randn(4, 2)
    expected = (weight.float() + (b @ a).T * 0.5).to(torch.bfloat16)
    assert merged_weight(weight, a, b, 0.5, True, torch.bfloat16, "cpu").equal(expected)


def edited_adapter(adapter: Path, folder: Path, add: dict | None = None, config: dict | None = None) -> Path:
    """A copy of `adapter` with extra tensors and adapter_config.json entries."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, folder)
    weights = {**load_file(str(adapter / "adapter_model.safetensors")), **(add or {})}
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    settings = {**json.loads((adapter / "adapter_config.json").read_text()), **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def test_an_adapter_key_with_no_base_weight_is_an_error_naming_it(tiny_base, tiny_trained, tmp_path):
    import torch

    stray = "base_model.model.model.layers.7.self_attn.q_proj"   # the tiny base has 2 layers
    adapter = edited_adapter(tiny_trained["adapter"], tmp_path / "adapter",
                             {f"{stray}.lora_A.weight": torch.zeros(4, 64),
                              f"{stray}.lora_B.weight": torch.zeros(64, 4)})
    (tmp_path / "out").mkdir()
    with pytest.raises(PipelineError) as error:
        merge(tiny_base, adapter, tmp_path / "out")
    assert f"'{stray}.lora_A.weight' matches no base weight" in str(error.value)
    assert "Nothing was written" in str(error.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_what_the_merge_does_not_support_is_an_error_naming_it(tiny_base, tiny_trained, tmp_path):
    import torch

    adapter = tiny_trained["adapter"]
    cases = {
        "dora": (edited_adapter(adapter, tmp_path / "dora", config={"use_dora": True}, add={
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}),
            ["use_dora = True: DoRA", "lora_magnitude_vector' is a DoRA magnitude"]),
        "embedding": (edited_adapter(adapter, tmp_path / "embedding", add={
            "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 49152)}),
            ["embed_tokens.lora_embedding_A' is LoRA on an embedding"]),
        "tied head": (edited_adapter(adapter, tmp_path / "tied", config={"modules_to_save": ["lm_head"]}, add={
            "base_model.model.lm_head.weight": torch.zeros(49152, 64)}),
            ["'base_model.model.lm_head.weight' replaces the lm_head of a model whose embedding and output head "
             "are one tied tensor"]),
        "half a pair": (edited_adapter(adapter, tmp_path / "half", add={
            "base_model.model.model.layers.0.mlp.extra.lora_A.weight": torch.zeros(4, 64)}),
            ["model.layers.0.mlp.extra.lora_B.weight is missing"]),
        "rank": (edited_adapter(adapter, tmp_path / "rank", config={"r": 8}),
                 ["model.layers.0.self_attn.q_proj: lora_A [4, 64] and lora_B [64, 4] are not of rank 8"]),
    }
    for case, (folder, messages) in cases.items():
        with pytest.raises(PipelineError) as error:
            merge(tiny_base, folder, tmp_path / f"out-{case}")
        for message in messages:
            assert message in str(error.value), case


def test_a_dtype_change_casts_every_float_tensor_in_row_blocks(tiny_base, tiny_trained, tmp_path, monkeypatch):
    """base.dtype float16 on a bfloat16 base: the tensors without LoRA are cast in blocks of rows (1000 rows of
    the embedding at a time here), and everything equals merge_and_unload then a cast to float16."""
    import torch

    from ftpipe.model import merging

    monkeypatch.setattr(merging, "CAST_BLOCK_BYTES", 4 * 64 * 1000)
    out = tmp_path / "merged"
    out.mkdir()
    merge_lora_shards(tiny_base, tiny_trained["adapter"], "float16", out, device="cpu")
    merged = load_model(tiny_base, "float32", adapter_dir=tiny_trained["adapter"]).merge_and_unload()
    reference = {name: tensor.detach().to(torch.float16) for name, tensor in merged.state_dict().items()}
    assert_same(tensors(out), reference, tensors(tiny_base))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
