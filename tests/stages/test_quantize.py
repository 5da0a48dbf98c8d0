"""Stage `quantize`: the merged tiny model exported to GGUF f16 and q8_0 by llama.cpp's converter;
each file loads back with the merged model's validation loss (within tolerance) and tokenizer,
and a tolerance no file can meet fails naming the type and its params key."""
import hashlib
import math

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import atomic_dir
from ftpipe.core.params import QuantizeParams
from ftpipe.data.tokenized import load_tokenized
from stages.quantize import quantize_and_check, tokenizer_mismatches

PARAMS = QuantizeParams(types=["f16", "q8_0"], max_loss_gap={"f16": 0.01, "q8_0": 0.05})   # as in params.yaml
WEIGHT_TYPES = {"f16": "F16", "q8_0": "Q8_0"}


@pytest.fixture(scope="module")
def validation_rows(tiny_data) -> list[dict]:
    return load_tokenized("validation", tiny_data[1])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_merged, validation_rows):
    out_dir = tmp_path_factory.mktemp("gguf")
    return out_dir, quantize_and_check(PARAMS, tiny_merged, validation_rows, out_dir)


def test_each_type_is_written_with_its_size_and_hash(quantized):
    out_dir, metrics = quantized
    assert sorted(path.name for path in out_dir.iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert list(metrics["files"]) == PARAMS.types
    for gguf_type, entry in metrics["files"].items():
        path = out_dir / f"model-{gguf_type}.gguf"
        assert entry["file"] == path.name and entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert metrics["files"]["q8_0"]["bytes"] < metrics["files"]["f16"]["bytes"]


def test_each_gguf_loads_back_with_the_merged_models_loss_and_tokenizer(quantized, tiny_merged, validation_rows):
    from ftpipe.model.modeling import load_model, load_tokenizer, mean_loss

    _, metrics = quantized
    merged = metrics["merged_validation_loss"]
    assert merged == pytest.approx(mean_loss(load_model(tiny_merged, "float32"), validation_rows,
                                             load_tokenizer(tiny_merged).pad_token_id, 16, "merged")["loss"])
    for gguf_type, entry in metrics["files"].items():
        assert math.isfinite(entry["validation_loss"])
        assert entry["loss_gap"] == pytest.approx(entry["validation_loss"] - merged)
        assert abs(entry["loss_gap"]) <= PARAMS.max_loss_gap[gguf_type]
        assert entry["tokenizer_mismatches"] == 0
    assert abs(metrics["files"]["f16"]["loss_gap"]) < 1e-4   # bf16 -> f16 is exact for these weights
    assert metrics["files"]["q8_0"]["loss_gap"] != 0          # 8-bit blocks are lossy: the gap is measured


def test_gguf_files_carry_a_byte_level_bpe_tokenizer_and_the_requested_types(quantized, tiny_merged):
    import json

    from gguf import GGUFReader

    out_dir, _ = quantized
    config = json.loads((tiny_merged / "config.json").read_text())
    for gguf_type, weight_type in WEIGHT_TYPES.items():
        reader = GGUFReader(str(out_dir / f"model-{gguf_type}.gguf"))
        field = {name: reader.fields[name].contents() for name in (
            "general.architecture", "llama.block_count", "llama.embedding_length",
            "tokenizer.ggml.model", "tokenizer.ggml.pre")}
        assert field == {"general.architecture": "llama", "llama.block_count": config["num_hidden_layers"],
                         "llama.embedding_length": config["hidden_size"],
                         # the converter recognised SmolLM2's pre-tokenizer (stages/base.py restores it):
                         "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm"}
        assert len(reader.fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
        assert len(reader.fields["tokenizer.ggml.merges"].data) > 40_000
        matrices = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) == 2}
        assert len(matrices) == 1 + 7 * config["num_hidden_layers"]   # embedding (tied) + 7 per layer
        assert set(matrices.values()) == {weight_type}


def test_a_too_tight_tolerance_fails_naming_the_type_and_the_key(tmp_path, tiny_merged, validation_rows):
    params = QuantizeParams(types=["q8_0"], max_loss_gap={"q8_0": 0.0})   # q8_0 is lossy: its gap is never 0
    final = tmp_path / "gguf"
    with pytest.raises(PipelineError) as error:
        with atomic_dir(final) as out_dir:
            quantize_and_check(params, tiny_merged, validation_rows, out_dir)
    message = str(error.value)
    assert "nothing was published" in message
    assert "q8_0: validation loss " in message and "exceeds quantize.max_loss_gap.q8_0 = 0.0" in message
    assert "tokenizer encodes" not in message
    assert list(tmp_path.iterdir()) == []   # neither the folder nor a temporary one is left


def test_tokenizer_mismatches_counts_texts_encoded_differently(smollm2_tokenizer):
    def candidate(text, add_special_tokens):
        ids = smollm2_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": ids + [0] if "°" in text else ids}

    texts = ["plain text", "20 °C", "x\ny", "−40 °F"]
    assert tokenizer_mismatches(smollm2_tokenizer, smollm2_tokenizer, texts) == 0
    assert tokenizer_mismatches(smollm2_tokenizer, candidate, texts) == 2
