"""What a GPU can do: its dense bf16 peak, for model FLOPs utilization (MFU).

MFU here is 4 * N * tokens/s / peak, N the base model's parameter count: a QLoRA step runs the
forward pass (2N FLOPs per token) and the backward pass through the frozen weights for the
activation gradients (2N more); the LoRA weights' own gradients and attention are left out, so
this slightly undercounts the work done, as every published LoRA MFU figure does.
"""
from __future__ import annotations

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s. Matched by
# substring of torch.cuda.get_device_name(), most specific first.
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 NVL", 835.0e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),        # SXM5 (the name reads "NVIDIA H100 80GB HBM3")
    ("GH200", 989.4e12),
    ("B200", 2250.0e12),
    ("A100", 312.0e12),
    ("L40S", 362.1e12),
    ("L4", 121.0e12),
    ("A10G", 70.0e12),
    ("RTX 4090", 165.2e12),    # with fp32 accumulation, as PyTorch uses
    ("RTX 3090", 71.0e12),
)


def bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name; None when it is not in the table (MFU unknown)."""
    for key, flops in BF16_PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def mfu(parameters: int, tokens_per_s: float, peak_flops: float | None) -> float | None:
    return round(4 * parameters * tokens_per_s / peak_flops, 4) if peak_flops else None


def base_parameter_count(model_dir) -> int:
    """Parameters of the 16-bit model in `model_dir`, from its config alone (built on the meta device:
    no memory, no weights read). A 4-bit model's own count is no use: bitsandbytes packs two
    weights per stored element."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return sum(parameter.numel() for parameter in model.parameters())
