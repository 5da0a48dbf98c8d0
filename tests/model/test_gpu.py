"""ftpipe.model.gpu: the bf16 peak table, MFU, and the base parameter count from a config alone."""
import pytest

from ftpipe.model.gpu import base_parameter_count, bf16_peak_flops, mfu


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
