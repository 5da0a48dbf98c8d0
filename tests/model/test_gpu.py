"""ftpipe.model.gpu: the bf16 peak table, MFU, and the base parameter count from a config alone."""
import pytest

from ftpipe.model.gpu import base_parameter_count, bf16_peak_flops, mfu
from stages.train import throughput


def test_peak_by_device_name_most_specific_first():
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert bf16_peak_flops("NVIDIA H100 NVL") == 835.0e12
    assert bf16_peak_flops("NVIDIA H200") == 989.4e12
    assert bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert bf16_peak_flops("Some Future GPU") is None


def test_mfu_is_four_n_tokens_per_second_over_peak():
    # 8.03e9 parameters at 10,000 tokens/s on an H100: 4 * 8.03e9 * 1e4 / 989.4e12 = 0.3246
    assert mfu(8_030_261_248, 10_000, 989.4e12) == pytest.approx(0.3246, abs=1e-4)
    assert mfu(8_030_261_248, 10_000, None) is None


def test_base_parameter_count_matches_the_real_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert base_parameter_count(tiny_model_dir) == sum(p.numel() for p in model.parameters())


def test_throughput_leaves_out_the_warm_up_step():
    curve = [{"tokens": 100, "useful_tokens": 50, "seconds": 10.0, "peak_memory_gib": 1.0, "mfu": 0.1},
             {"tokens": 100, "useful_tokens": 80, "seconds": 1.0, "peak_memory_gib": 2.0, "mfu": 0.3},
             {"tokens": 100, "useful_tokens": 90, "seconds": 1.0, "peak_memory_gib": 1.5, "mfu": 0.5}]
    assert throughput(curve) == {"tokens_per_s": 100.0, "useful_tokens_per_s": 85.0, "useful_token_share": 0.85,
                                 "peak_memory_gib": 2.0, "mfu": 0.4}
    cpu = [{"tokens": 10, "useful_tokens": 10, "seconds": 2.0, "peak_memory_gib": None, "mfu": None}]
    assert throughput(cpu) == {"tokens_per_s": 5.0, "useful_tokens_per_s": 5.0, "useful_token_share": 1.0}


def test_throughput_skips_steps_logged_without_counts():
    """A run resumed from a checkpoint of older code carries per-step logs without these counts."""
    old = [{"tokens": 100, "seconds": 1.0, "useful_tokens": None}, {"tokens": None, "seconds": 1.0}]
    assert throughput(old) == {}
    new = old + [{"tokens": 100, "useful_tokens": 100, "seconds": 2.0}]
    assert throughput(new) == {"tokens_per_s": 50.0, "useful_tokens_per_s": 50.0, "useful_token_share": 1.0}
