"""transformers' GGUF reader against llama.cpp (ftpipe/gguf/reader_check.py): a GGUF read correctly gives next-token
distributions within a hair of llama.cpp's; one misread (the Q/K rows in the wrong RoPE order, the classic reader
bug) is refused with the file, the measured KL, the top-1 agreement and the params key; a GGUF without a chat
template (a base model's) is checked too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.gguf.reader_check import CHECK_TEXTS, check_gguf_reader, next_token_divergence
from tests.base_fixtures import permute_rope_rows


@pytest.fixture(scope="module")
def read_back(tiny_gguf_base):
    """(model, tokenizer) as the base stage reads the GGUF: transformers' reader, float32."""
    from stages.base import load_gguf_tokenizer, read_gguf

    model = read_gguf(tiny_gguf_base)
    return model, load_gguf_tokenizer(tiny_gguf_base, model.generation_config.eos_token_id)


def test_a_gguf_read_correctly_matches_llama_cpp(tiny_gguf_base, read_back):
    model, tokenizer = read_back
    found = check_gguf_reader(model, tokenizer, tiny_gguf_base, max_kl=0.1)
    assert found["texts"] == len(CHECK_TEXTS) and found["positions"] > 50
    # f16 weights in both; llama.cpp rounds activations to f16 in its dot products, transformers computes in float32
    assert 0 <= found["mean_kl_nats"] < 1e-3 and found["max_kl_nats"] < 1e-2
    assert found["top1_agreement"] == 1.0
    assert found["tokenizer_mismatches"] == 0   # the SmolLM2 vocabulary, its byte-level BPE restored
    assert found["max_allowed_kl_nats"] == 0.1 and found["llama_cpp"]["package_version"]


def test_a_misread_gguf_is_refused_naming_the_file_the_kl_and_the_key(tiny_gguf_base, read_back):
    import copy

    model, tokenizer = read_back
    misread = copy.deepcopy(model)
    permute_rope_rows(misread)
    with pytest.raises(PipelineError) as error:
        check_gguf_reader(misread, tokenizer, tiny_gguf_base, max_kl=0.1)
    message = str(error.value)
    assert message.startswith(f"{tiny_gguf_base}: transformers' GGUF reader does not read this file as llama.cpp does")
    measured = next_token_divergence(misread, tokenizer, tiny_gguf_base)
    assert measured["mean_kl_nats"] > 0.1   # measured 0.38
    assert f"is {measured['mean_kl_nats']:.4f} nats over {measured['positions']} positions" in message
    assert f"(top-1 agreement {measured['top1_agreement']:.0%})" in message
    assert "above params.yaml base.gguf_max_kl = 0.1" in message


def test_a_gguf_without_a_chat_template_is_checked_too(tiny_gguf_base, read_back, tmp_path):
    target = tmp_path / "no-template.gguf"
    subprocess.run([str(Path(sys.executable).parent / "gguf-new-metadata"), str(tiny_gguf_base), str(target),
                    "--force", "--remove-metadata", "tokenizer.chat_template"], check=True, capture_output=True)
    model, tokenizer = read_back
    assert check_gguf_reader(model, tokenizer, target, max_kl=0.1)["top1_agreement"] == 1.0


@pytest.mark.slow
def test_the_embedded_default_is_read_as_llama_cpp_reads_it():
    """The number behind params.yaml base.gguf_max_kl: the embedded SmolLM2-135M Q4_1 (transformers dequantizes
    to float32, llama.cpp computes with Q4_1 dot products) measured 0.00465 nats, top-1 agreement 0.92 (with the Q/K
    rows misread: 0.60 nats)."""
    from ftpipe.model.sources import embedded_gguf
    from stages.base import load_gguf_tokenizer, read_gguf

    path, _ = embedded_gguf()
    model = read_gguf(path)
    found = next_token_divergence(model, load_gguf_tokenizer(path, model.generation_config.eos_token_id), path)
    assert found["mean_kl_nats"] < 0.02 and found["top1_agreement"] > 0.8
    assert found["tokenizer_mismatches"] == 0
