"""GGUF export: llama.cpp's quantizer writes real K-quant blocks where rows fit them, a sharded merged model
converts to the same tensors as a single-file one, and an unknown type names the valid ones."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.gguf.contents import tensor_type_mix
from ftpipe.gguf.export import export_all
from ftpipe.gguf.runtime import open_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 1-layer Llama 256 wide (a K-quant block is 256 weights) with SmolLM2's tokenizer, in float16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("wide-llama")
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def test_k_quants_use_k_blocks_where_rows_fit(tmp_path, wide_model_dir):
    files = export_all(wide_model_dir, ["q4_k_m", "q6_k"], tmp_path, tmp_path / "scratch-f16.gguf")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model-q4_k_m.gguf", "model-q6_k.gguf",
                                                                "scratch-f16.gguf"]
    q4, q6 = tensor_type_mix(files["q4_k_m"]), tensor_type_mix(files["q6_k"])
    assert {"Q4_K", "Q6_K"} <= set(q4["types"])   # Q4_K_M keeps some tensors (v, down) at Q6_K by design
    assert set(q6["types"]) == {"Q6_K", "F32"}
    assert 4 < q4["bits_per_weight"] < q6["bits_per_weight"] < 7
    llm = open_gguf(files["q4_k_m"], 64)   # and llama.cpp runs it
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == 1
    llm.close()


def test_a_sharded_merged_model_converts_to_the_same_tensors(tmp_path, tiny_merged):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_merged).save_pretrained(sharded, max_shard_size="2MB")
    for name in TOKENIZER_FILES:
        if (tiny_merged / name).exists():
            shutil.copy(tiny_merged / name, sharded / name)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").exists()
    (tmp_path / "single").mkdir()
    single = export_all(tiny_merged, ["f16"], tmp_path / "single", tmp_path / "unused.gguf")
    parts = export_all(sharded, ["f16"], tmp_path, tmp_path / "unused.gguf")

    def tensors(path):
        return {tensor.name: np.asarray(tensor.data).tobytes() for tensor in GGUFReader(str(path)).tensors}

    assert tensors(parts["f16"]) == tensors(single["f16"])


def test_an_unknown_type_names_the_valid_ones(tmp_path, tiny_merged):
    with pytest.raises(PipelineError, match=r"quantize.types: \['q4_k'\] unknown; valid types are \['f32', 'f16'"):
        export_all(tiny_merged, ["f16", "q4_k"], tmp_path, tmp_path / "scratch.gguf")
    assert list(tmp_path.iterdir()) == []
