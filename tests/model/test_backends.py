"""train.backend on every kind of machine (a CUDA GPU and Unsloth simulated by monkeypatching: this machine has
neither), and the transformers backend's model, arguments and batches as it would train on a GPU."""
import dataclasses
import importlib.util

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.data.tokenized import load_tokenized
from ftpipe.model import training
from ftpipe.model.training import GPU_EXTRA, build_trainer, load_trainable_model, resolve_backend, training_arguments
from tests.model_fixtures import PACKED_TOKENIZE, TOKENIZE, TRAIN, build_tokenized

REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def machine(monkeypatch):
    """machine(cuda=..., unsloth=...): what resolve_backend sees. Unsloth is never imported, only looked up."""
    def set_machine(cuda: bool, unsloth: bool) -> None:
        monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
            (object() if unsloth else None) if name == "unsloth" else REAL_FIND_SPEC(name, *args)))
    return set_machine


@pytest.mark.parametrize("cuda, unsloth, requested, expected", [
    (True, True, "auto", "unsloth"),
    (True, False, "auto", "transformers"),   # with a warning (below)
    (False, True, "auto", "cpu"),
    (False, False, "auto", "cpu"),
    (True, True, "unsloth", "unsloth"),
    (True, True, "transformers", "transformers"),
    (True, False, "transformers", "transformers"),
    (True, True, "cpu", "cpu"),
    (False, False, "cpu", "cpu"),
])
def test_backend_resolution(machine, capsys, cuda, unsloth, requested, expected):
    machine(cuda, unsloth)
    assert resolve_backend(requested) == expected
    warned = capsys.readouterr().err
    assert bool(warned) is (requested == "auto" and expected == "transformers")


def test_auto_on_a_gpu_without_unsloth_says_how_to_install_it_and_what_it_costs(machine, capsys):
    machine(cuda=True, unsloth=False)
    assert resolve_backend("auto") == "transformers"
    warning = capsys.readouterr().err
    assert 'pip install -e ".[gpu]"' in warning
    assert "~1.7x slower" in warning and "~3x the GPU memory" in warning
    assert "6,607 tokens/s in 24.65 GiB" in warning and "11,188 in 8.05 GiB" in warning


def test_the_gpu_extra_installs_unsloth():
    """The command the warning names exists: pyproject.toml's `gpu` extra holds Unsloth."""
    import tomllib

    from tests.conftest import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert GPU_EXTRA == 'pip install -e ".[gpu]"' and any(pin.startswith("unsloth==") for pin in extras["gpu"])


@pytest.mark.parametrize("cuda, unsloth, requested, message", [
    (False, True, "unsloth", r"train\.backend is 'unsloth', but no CUDA GPU is visible\. Set train\.backend: auto "
                             r"\(or cpu\)"),
    (False, False, "transformers", r"train\.backend is 'transformers', but no CUDA GPU is visible\. Set "
                                   r"train\.backend: auto \(or cpu\)"),
    (True, False, "unsloth", r"train\.backend is 'unsloth', but Unsloth is not installed\. Run "
                             r"`pip install -e \"\.\[gpu\]\"`, or set train\.backend: transformers"),
])
def test_a_backend_the_machine_cannot_run_is_an_error_naming_the_fix(machine, cuda, unsloth, requested, message):
    """A PipelineError: run_stage prints its message alone, without a traceback."""
    machine(cuda, unsloth)
    with pytest.raises(PipelineError, match=message):
        resolve_backend(requested)


@pytest.fixture
def loads_on_the_cpu(monkeypatch):
    """AutoModelForCausalLM.from_pretrained as the transformers backend calls it, recorded, then run on the CPU
    (this machine's only device)."""
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **{**kwargs, "device_map": "cpu"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    return calls


def test_the_transformers_backend_loads_a_4bit_base_on_the_gpu_with_lora(loads_on_the_cpu, tiny_base):
    import bitsandbytes as bnb
    import torch

    params = dataclasses.replace(TRAIN, gradient_checkpointing="on")
    model = load_trainable_model("transformers", params, tiny_base, TOKENIZE.max_seq_length, "bfloat16")
    (kwargs,) = loads_on_the_cpu
    assert kwargs["device_map"] == {"": 0}   # the whole model on the (first visible) GPU
    assert kwargs["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert str(kwargs["quantization_config"].bnb_4bit_compute_dtype) == "torch.bfloat16"
    four_bit = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert four_bit and all(name.endswith("_proj.base_layer") for name in four_bit)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    base = model.get_base_model()
    assert base.is_gradient_checkpointing
    assert base.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    # enable_input_require_grads: the embeddings' output requires grad, though the embeddings are frozen
    assert base.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def test_the_transformers_backend_trains_in_mixed_precision_on_the_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    bf16 = training_arguments(TRAIN, "transformers", "bfloat16", tmp_path)
    assert (bf16.bf16, bf16.fp16, bf16.use_cpu) == (True, False, False)
    fp16 = training_arguments(TRAIN, "transformers", "float16", tmp_path)
    assert (fp16.bf16, fp16.fp16, fp16.use_cpu) == (False, True, False)
    cpu = training_arguments(TRAIN, "cpu", "bfloat16", tmp_path)
    assert (cpu.bf16, cpu.fp16, cpu.use_cpu) == (False, False, True)   # bf16 through bitsandbytes' compute dtype


@pytest.mark.parametrize("backend, padding_free", [("transformers", False), ("cpu", False), ("unsloth", True)])
def test_packed_rows_train_padded_on_transformers_and_padding_free_on_unsloth(monkeypatch, tmp_path_factory,
                                                                            tiny_base, backend, padding_free):
    """Padding-free batches are Unsloth's layout: transformers + peft get right-padded packed rows, whose
    block-diagonal mask transformers builds from the position ids (tests/model/test_training.py)."""
    root = tmp_path_factory.mktemp("packed-backend")
    _, tokenized_dir = build_tokenized(tiny_base, root, PACKED_TOKENIZE)
    rows = load_tokenized("train", tokenized_dir)
    monkeypatch.setattr(training, "load_trainable_model",
                        lambda backend, *args: load_trainable_model("cpu", *args))
    monkeypatch.setattr(training, "training_arguments",
                        lambda params, backend, dtype, out: training_arguments(params, "cpu", dtype, out))
    trainer, _ = build_trainer(TRAIN, backend, "float32", tiny_base, TOKENIZE.max_seq_length, rows, root / "out", [])
    assert trainer.data_collator.padding_free is padding_free
    batch = trainer.data_collator.collate(rows[:2])   # a micro-batch, as the model gets it
    assert ("packed_seq_lengths" in batch) is padding_free and "position_ids" in batch
