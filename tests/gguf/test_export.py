"""GGUF export: llama.cpp's quantizer writes real K-quant blocks where rows fit them, a sharded merged model
converts to the same tensors as a single-file one, and an unknown type names the valid ones. The converter is
llama.cpp's own of the runtime's commit; its failure is reported as its error, not its log; conversions run side
by side."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.gguf import export
from ftpipe.gguf.contents import tensor_type_mix
from ftpipe.gguf.export import converter_command, converter_error, converter_info, export_all
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


def test_the_converter_is_llama_cpps_own_of_the_runtimes_commit():
    import hashlib
    import json

    from ftpipe.core.provenance import LLAMA_CPP_BUILD_FILE, llama_cpp_build

    command = converter_command()
    assert Path(command[0]).name.startswith("python") and command[1] == str(export.CONVERTER_SCRIPT)
    info = converter_info()
    assert info["package"] == "llama.cpp convert_hf_to_gguf.py"
    assert info["version"] == llama_cpp_build()["llama_cpp_commit"] == "0c1e57098"
    assert info["gguf"] == "0.19.0"
    recorded = json.loads(LLAMA_CPP_BUILD_FILE.read_text())["converter"]["sha256"]
    digest = hashlib.sha256()   # tools/build_llama_cpp.tree_sha256: the installed files are the recorded ones
    for path in sorted(p for p in export.CONVERTER_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(export.CONVERTER_DIR).as_posix().encode() + b"\0"
                      + hashlib.sha256(path.read_bytes()).digest())
    assert info["sha256"] == recorded == digest.hexdigest()


def test_a_conversion_failure_is_the_converters_error_not_its_log(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch"}')
    with pytest.raises(PipelineError) as raised:
        export.convert(tmp_path, "f16", tmp_path / "model.gguf")
    message = str(raised.value)
    assert message.startswith(f"llama.cpp's GGUF converter cannot convert {tmp_path} to f16 (exit 1): ")
    assert message.endswith("(exit 1): ERROR:hf-to-gguf:Model NoSuchModelForCausalLM is not supported")


def test_converter_error_keeps_the_exception_and_where_it_was_raised():
    stderr = ("INFO:hf-to-gguf:Loading model: merged\nWARNING:hf-to-gguf:chkhsh: 1234\n"
              "Traceback (most recent call last):\n  File \"convert_hf_to_gguf.py\", line 10, in <module>\n"
              "    main()\n  File \"conversion/base.py\", line 1953, in get_vocab_base_pre\n"
              "    raise NotImplementedError(\"BPE pre-tokenizer was not recognized\")\n"
              "NotImplementedError: BPE pre-tokenizer was not recognized\n")
    assert converter_error(stderr) == ("NotImplementedError: BPE pre-tokenizer was not recognized\n"
                                       "(raised at \"conversion/base.py\", line 1953, in get_vocab_base_pre)")
    assert converter_error("INFO:a\nERROR:hf-to-gguf:Model Foo is not supported\n") == \
        "ERROR:hf-to-gguf:Model Foo is not supported"


def test_conversions_run_side_by_side_and_the_first_failure_is_raised(tmp_path, monkeypatch):
    import threading
    import time

    running, overlapped, lock = set(), [], threading.Lock()

    def fake_convert(merged_dir, gguf_type, out_file):
        with lock:
            running.add(gguf_type)
            overlapped.append(len(running))
        time.sleep(0.2)
        with lock:
            running.discard(gguf_type)
        if gguf_type == "bf16":
            raise PipelineError("bf16 failed")
        out_file.write_bytes(b"GGUF")

    monkeypatch.setattr(export, "convert", fake_convert)
    monkeypatch.setattr(export, "align_space_prefix", lambda merged_dir, files: None)
    monkeypatch.setattr(export.os, "cpu_count", lambda: 2)
    files = export_all(tmp_path, ["f16", "q8_0"], tmp_path, tmp_path / "scratch.gguf")
    assert max(overlapped) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert set(files) == {"f16", "q8_0"}
    with pytest.raises(PipelineError, match="bf16 failed"):
        export_all(tmp_path, ["bf16", "q8_0"], tmp_path / "x", tmp_path / "scratch.gguf")


def test_the_converter_reads_special_tokens_from_a_view_with_transformers_4s_added_tokens_decoder(tmp_path):
    """transformers 5 writes a tokenizer's added tokens only in tokenizer.json; llama.cpp's converter types a
    SentencePiece vocabulary's special tokens from tokenizer_config.json's added_tokens_decoder alone. The converter
    reads a view of the folder with that entry rebuilt; the folder itself is not changed."""
    import json

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "tokenizer.model").write_bytes(b"spm")
    (merged / "config.json").write_text("{}")
    (merged / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    (merged / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 5, "content": "<start_of_turn>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}]}))
    view = export.converter_view(merged, tmp_path / "view" / "merged")
    assert view == tmp_path / "view" / "merged" and (view / "tokenizer.model").resolve() == merged / "tokenizer.model"
    assert json.loads((view / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "GemmaTokenizer", "added_tokens_decoder": {"5": {
            "content": "<start_of_turn>", "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}}}
    assert json.loads((merged / "tokenizer_config.json").read_text()) == {"tokenizer_class": "GemmaTokenizer"}
    # a folder that has the entry (a hub model's, copied byte for byte), or no SentencePiece model, is read as is
    (merged / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    assert export.converter_view(merged, tmp_path / "other") == merged
    (merged / "tokenizer_config.json").write_text("{}")
    (merged / "tokenizer.model").unlink()
    assert export.converter_view(merged, tmp_path / "other") == merged and not (tmp_path / "other").exists()


def test_a_gguf_gets_the_space_prefix_rule_of_the_merged_tokenizer(tmp_path):
    """llama.cpp prefixes a space to the text after a special token in a SentencePiece vocabulary unless
    tokenizer.ggml.add_space_prefix is false; a GGUF is rewritten with the rule transformers' tokenizer has (Phi-3:
    tests/families), metadata only."""
    import gguf

    from tests.families.families import gguf_string_arrays

    assert export.space_prefix_after_special(["\u2581a"]) and export.space_prefix_after_special([" a"])
    assert not export.space_prefix_after_special(["a"]) and not export.space_prefix_after_special([])
    path = tmp_path / "probe.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    export.set_bool_metadata(path, export.SPACE_PREFIX_KEY, False)
    assert gguf_string_arrays(path, ("tokenizer.ggml.model", export.SPACE_PREFIX_KEY)) == {
        "tokenizer.ggml.model": "llama", export.SPACE_PREFIX_KEY: False}
    assert [np.asarray(t.data).tolist() for t in gguf.GGUFReader(str(path)).tensors] == [[[1.0] * 32] * 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.gguf"]
