"""The architecture check the train stage runs before training (ftpipe/model/architectures.py): llama.cpp's converter
is read from its source (which architectures it registers, which GGUF architecture each becomes), llama.cpp's
runtime is asked itself, Unsloth's line comes from its table; an architecture a part cannot handle is an error
naming the part and the architecture, raised by the train stage before anything is trained."""
import json
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.model import architectures
from ftpipe.model.architectures import (
    architecture_support,
    converter_registry,
    model_architecture,
    require_supported_architecture,
    runtime_knows,
    unsloth_support,
)


def model_dir(folder: Path, architecture: str, model_type: str, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": model_type,
                                                    **extra}))
    return folder


def fake_converter(folder: Path) -> Path:
    """A converter layout with three registered classes: one writing an architecture llama.cpp implements, one
    writing one it does not, and one inheriting its model_arch from a class of another module."""
    (folder / "conversion").mkdir(parents=True)
    (folder / "gguf-py" / "gguf").mkdir(parents=True)
    (folder / "conversion" / "__init__.py").write_text(
        'TEXT_MODEL_MAP: dict[str, str] = {"KnownForCausalLM": "known", "NovelForCausalLM": "novel",\n'
        '                                  "DerivedForCausalLM": "derived"}\n')
    (folder / "conversion" / "known.py").write_text(
        "from .base import ModelBase, TextModel, gguf\n\n\n"
        '@ModelBase.register("KnownForCausalLM")\nclass KnownModel(TextModel):\n'
        "    model_arch = gguf.MODEL_ARCH.LLAMA\n")
    (folder / "conversion" / "novel.py").write_text(
        "from .base import ModelBase, TextModel, gguf\n\n\n"
        '@ModelBase.register("NovelForCausalLM")\nclass NovelModel(TextModel):\n'
        "    model_arch = gguf.MODEL_ARCH.NOVEL\n")
    (folder / "conversion" / "derived.py").write_text(
        "from .base import ModelBase, gguf\nfrom .known import KnownModel\n\n\n"
        '@ModelBase.register("OtherForCausalLM", "DerivedForCausalLM")\nclass DerivedModel(KnownModel):\n'
        "    pass\n")
    (folder / "gguf-py" / "gguf" / "constants.py").write_text(
        'MODEL_ARCH_NAMES: dict[MODEL_ARCH, str] = {\n    MODEL_ARCH.LLAMA: "llama",\n'
        '    MODEL_ARCH.NOVEL: "novel-arch-ftpipe",\n}\n')
    return folder


def test_the_architecture_is_the_text_models_as_the_converter_reads_it():
    assert model_architecture({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) == \
        ("LlamaForCausalLM", "llama")
    assert model_architecture({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                               "text_config": {"architectures": ["Gemma3ForCausalLM"]}}) == \
        ("Gemma3ForCausalLM", "gemma3")
    with pytest.raises(PipelineError, match="names no architecture"):
        model_architecture({"model_type": "llama"})


def test_the_installed_converter_registry_is_read_without_importing_it():
    from ftpipe.core.provenance import LLAMA_CPP_CONVERTER_DIR

    registry = converter_registry(LLAMA_CPP_CONVERTER_DIR)
    assert registry["Gemma3ForCausalLM"] == "gemma" and registry["GptOssForCausalLM"] == "gpt_oss"
    assert registry["MistralForCausalLM"] == "llama" and len(registry) > 200


def test_a_supported_architecture_passes_with_each_parts_answer(tmp_path):
    folder = model_dir(tmp_path / "m", "KnownForCausalLM", "llama")
    report = require_supported_architecture(folder, fake_converter(tmp_path / "converter"))
    assert (report.architecture, report.model_type, report.gguf_arch) == ("KnownForCausalLM", "llama", "llama")
    assert [(part.part, part.supported) for part in report.parts] == [
        ("llama.cpp's GGUF converter", True), ("llama.cpp's runtime", True), ("Unsloth", True)]
    assert report.lines()[0] == ("llama.cpp's GGUF converter: yes (converted by KnownModel into GGUF architecture "
                                 "'llama')")
    assert report.lines()[1].startswith("llama.cpp's runtime: yes (llama.cpp 0c1e57098 implements GGUF architecture")


def test_a_converter_class_inherits_its_gguf_architecture(tmp_path):
    folder = model_dir(tmp_path / "m", "DerivedForCausalLM", "derived")
    report = architecture_support(folder, fake_converter(tmp_path / "converter"))
    assert report.gguf_arch == "llama" and "DerivedModel" in report.parts[0].detail


def test_an_architecture_the_converter_does_not_know_fails_naming_the_part(tmp_path):
    folder = model_dir(tmp_path / "m", "NoSuchForCausalLM", "nosuch")
    with pytest.raises(PipelineError) as raised:
        require_supported_architecture(folder)   # the installed converter
    message = str(raised.value)
    assert message.startswith("the base model's architecture NoSuchForCausalLM (model type 'nosuch') cannot go "
                              "through this pipeline: llama.cpp's GGUF converter: NoSuchForCausalLM is not among the "
                              "architectures it converts.")
    assert "quantize stage" in message and "base.model" in message


def test_an_architecture_the_runtime_does_not_implement_fails_naming_the_part(tmp_path):
    folder = model_dir(tmp_path / "m", "NovelForCausalLM", "novel")
    with pytest.raises(PipelineError, match="llama.cpp's runtime: llama.cpp 0c1e57098 does not implement GGUF "
                                            "architecture 'novel-arch-ftpipe'"):
        require_supported_architecture(folder, fake_converter(tmp_path / "converter"))


def test_the_runtime_answers_for_itself():
    assert runtime_knows("llama") and runtime_knows("gemma3") and runtime_knows("gpt-oss")
    assert runtime_knows("no-such-arch-ftpipe") is False


def test_unsloth_optimizes_six_model_types_and_falls_back_to_transformers_for_the_others():
    assert set(architectures.UNSLOTH_OPTIMIZED) == {"llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3"}
    assert "its own FastLlamaModel" in unsloth_support("llama").detail
    fallback = unsloth_support("gemma3_text")
    assert fallback.supported and "falls back to transformers" in fallback.detail


def test_the_train_stage_checks_the_architecture_before_anything_else(in_tmp_project):
    from stages import train

    model_dir(in_tmp_project / "models" / "base", "NoSuchForCausalLM", "nosuch")   # no params.yaml, no data
    with pytest.raises(PipelineError, match="llama.cpp's GGUF converter: NoSuchForCausalLM is not among"):
        train.main()


def test_the_base_tokenizer_is_asked_of_llama_cpp_through_a_vocabulary_only_gguf(tiny_model_dir):
    """The tiny Llama with SmolLM2's tokenizer: the converter's vocabulary, in llama.cpp, splits the probe texts and
    a chat in the model's template as transformers does."""
    report = require_supported_architecture(tiny_model_dir)
    assert [(part.part, part.supported) for part in report.parts] == [
        ("llama.cpp's GGUF converter", True), ("llama.cpp's runtime", True), ("llama.cpp's tokenizer", True),
        ("Unsloth", True)]
    assert report.parts[2].detail == "4 probe texts become the same tokens in both"


def test_a_tokenizer_llama_cpp_cannot_take_fails_before_training(tmp_path, smollm2_tokenizer):
    """A Qwen2-architecture model shipped with another family's tokenizer (as DeepSeek-R1-Distill-Qwen is): its
    architecture is fine, but transformers 5 reads the vocabulary with Qwen2's tokenizer class and the converter
    does not recognise the pre-tokenizer. Found before training, naming the part."""
    import copy

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    folder = tmp_path / "qwen2-with-another-tokenizer"
    Qwen2ForCausalLM(config).save_pretrained(folder)
    copy.deepcopy(smollm2_tokenizer).save_pretrained(folder)
    report = architecture_support(folder)
    assert [(part.part, part.supported) for part in report.parts][:2] == [
        ("llama.cpp's GGUF converter", True), ("llama.cpp's runtime", True)]
    tokenizer_part = report.parts[2]
    assert tokenizer_part.part == "llama.cpp's tokenizer" and tokenizer_part.supported is False
    assert "BPE pre-tokenizer was not recognized" in tokenizer_part.detail   # the converter's own words
    with pytest.raises(PipelineError, match=r"cannot go through this pipeline: llama\.cpp's tokenizer: the converter "
                                            r"cannot write its vocabulary"):
        require_supported_architecture(folder)
