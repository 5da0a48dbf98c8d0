"""evaluate.batch_size: auto: the per-sequence memory estimate on a Llama-3.1-8B-shaped config (no weights), the
batch sizes a mocked free-memory figure gives, the CPU's 16, and the loss pass rerun at half the batch after an
out-of-memory error."""
from types import SimpleNamespace

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.model import batch_memory
from ftpipe.model.batch_memory import (
    CPU_AUTO_BATCH,
    batch_sizes,
    fitting_batch,
    fitting_mean_loss,
    generation_bytes,
    kv_cache_bytes_per_token,
    loss_bytes,
)
from ftpipe.model.modeling import load_tokenizer, mean_loss

GIB = 2**30


@pytest.fixture(scope="module")
def llama_8b():
    """Llama 3.1 8B's config (the sizes that matter here), as a bf16 model would carry it: no weights."""
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    return SimpleNamespace(config=config, dtype=torch.bfloat16)


def test_the_estimate_per_sequence_at_8b(llama_8b):
    config = llama_8b.config
    # 2 (keys, values) x 32 layers x 8 kv heads x 128 head dim x 2 bytes (bf16): 128 KiB a position
    assert kv_cache_bytes_per_token(config, 2) == 2 * 32 * 8 * 128 * 2 == 131_072
    activations = (3 * 14336 + 4 * 4096) * 2   # the MLP's peak in one layer, per position
    # a 200-token prompt and 64 new tokens: the KV cache of 264 positions, the prefill's activations of 200, and
    # one position's logits (128,256 x 10 bytes)
    assert generation_bytes(config, 200, 64, 2) == 131_072 * 264 + activations * 200 + 128_256 * 10 == 59_642_368
    # a 264-token row in the loss pass: every position's logits in bf16, and its activations (no KV cache)
    assert loss_bytes(config, 264, 2) == (128_256 * 2 + activations) * 264 == 99_078_144


def test_auto_fills_the_free_gpu_memory_after_the_model(monkeypatch, llama_8b):
    """On an H200 (141 GiB) holding the 8B model in bf16 (~15 GiB), ~125 GiB are free."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    free = 125 * GIB
    # (125 GiB - 1 GiB kept back, and 2 GiB for the loss pass's float32 cross-entropy) / (1.5 x the estimate)
    assert batch_sizes("auto", llama_8b, 200, 64, 264, 5000, free_bytes=free) == {
        "loss": int((free - 3 * GIB) // (1.5 * 99_078_144)), "generation": int((free - GIB) // (1.5 * 59_642_368))
    } == {"loss": 881, "generation": 1488}
    # clamped to the number of prompts: 100 test examples fit in one batch each
    assert batch_sizes("auto", llama_8b, 200, 64, 264, 100, free_bytes=free) == {"loss": 100, "generation": 100}
    # on a 24 GiB card with ~8 GiB left: fewer, but at least 1
    assert batch_sizes("auto", llama_8b, 200, 64, 264, 100, free_bytes=8 * GIB) == {"loss": 36, "generation": 84}
    assert batch_sizes("auto", llama_8b, 2000, 64, 2048, 100, free_bytes=int(1.5 * GIB)) == {"loss": 1,
                                                                                            "generation": 1}
    # a number is taken as it is, on any device
    assert batch_sizes(8, llama_8b, 200, 64, 264, 100, free_bytes=free) == {"loss": 8, "generation": 8}


def test_free_gpu_memory_counts_what_pytorch_holds_cached(monkeypatch, llama_8b):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda: (100 * GIB, 141 * GIB))
    monkeypatch.setattr("torch.cuda.memory_reserved", lambda: 20 * GIB)
    monkeypatch.setattr("torch.cuda.memory_allocated", lambda: 16 * GIB)   # 4 GiB cached, free to reuse
    assert batch_memory.free_gpu_bytes() == 104 * GIB
    assert batch_sizes("auto", llama_8b, 200, 64, 264, 5000)["generation"] == fitting_batch(
        104 * GIB, generation_bytes(llama_8b.config, 200, 64, 2), 5000)


def test_auto_on_the_cpu_is_16(llama_8b):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert CPU_AUTO_BATCH == 16
    assert batch_sizes("auto", llama_8b, 200, 64, 264, 100) == {"loss": 16, "generation": 16}
    assert batch_sizes("auto", llama_8b, 200, 64, 264, 5) == {"loss": 5, "generation": 5}


def test_the_kv_cache_estimate_is_what_the_model_stores(tiny_model_dir):
    """The formula against a real cache: the tiny Llama's keys and values after a forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    with torch.no_grad():
        cache = model(input_ids=torch.arange(10).unsqueeze(0), use_cache=True).past_key_values
    stored = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                 for layer in cache.layers)
    assert stored == 10 * kv_cache_bytes_per_token(model.config, 2)


def test_the_loss_pass_is_rerun_at_half_the_batch_after_out_of_memory(tiny_model_dir, tiny_data, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from ftpipe.data.tokenized import load_tokenized
    from tests.model.test_generation import out_of_memory_above

    rows = load_tokenized("test", tiny_data[1])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    pad_id = load_tokenizer(tiny_model_dir).pad_token_id
    expected = mean_loss(model, rows, pad_id, 2, "reference")
    sizes = out_of_memory_above(model, 2)
    capsys.readouterr()
    loss, batch_size = fitting_mean_loss(model, rows, pad_id, 8, "tuned loss")
    assert batch_size == 2 and max(sizes) == 8 and 4 in sizes
    assert loss == pytest.approx(expected)
    warnings = capsys.readouterr().err
    assert "warning: tuned loss: out of GPU memory at a batch of 8; retrying with 4" in warnings
    assert "retrying with 2" in warnings
    out_of_memory_above(model, 0)
    with pytest.raises(PipelineError, match="one sequence alone does not fit"):
        fitting_mean_loss(model, rows, pad_id, 2, "tuned loss")
