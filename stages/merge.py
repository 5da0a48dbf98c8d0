"""Stage `merge`: fold the LoRA adapter into a 16-bit copy of the base, in models/merged/.

    python -m stages.merge

The adapter is merged in float32 into the 16-bit base weights (upcast exactly), and the
result is stored in base.dtype: one rounding step, never a merge into 4-bit weights. The merge goes
shard by shard, one weight in float32 at a time (ftpipe.model.merging), and the check loads one model
at a time: an 8B model merges and is checked within one model's memory. The
stage then checks on the validation split that the merged model's loss matches
(1) the adapter on the same 16-bit base, within merge.max_loss_gap_vs_adapter (rounding
only), and (2) the adapter on the 4-bit base it was trained on: the merged loss may exceed it by at
most merge.max_loss_gap_vs_trained (the NF4 -> 16-bit switch; lower is fine). Either gap over its tolerance
fails the stage and publishes nothing.

It starts only from an adapter the evaluate and audit stages' gates passed (their gate.json, made for this
adapter): a gate that failed stops the release here.
"""
from __future__ import annotations

from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import CONTENT_FILE, file_hashes, read_json, write_content_record
from ftpipe.core.params import MergeParams, Params, QuantizationParams, flatten
from ftpipe.core.paths import (
    ADAPTER_DIR,
    AUDIT_DIR,
    BASE_DIR,
    EVALUATION_DIR,
    MERGED_DIR,
    PROVENANCE_FILE,
    TOKENIZED_DIR,
)
from ftpipe.core.stage import Stage
from ftpipe.data.chat_template import install_chat_template
from ftpipe.evaluation.gates import VERDICT_FILE, adapter_subject, require_passed
from ftpipe.model.merging import merge_lora_shards
from ftpipe.model.modeling import (
    cuda_available,
    inference_dtype,
    load_model,
    load_tokenizer,
    mean_loss,
    resolve_compute_dtype,
)
from ftpipe.model.tokenizer_files import copy_tokenizer_files

LOSS_BATCH = 16


def merge_adapter(base_dir: Path, adapter_dir: Path, dtype: str, out_dir: Path, tokenized_dir: Path) -> None:
    """The adapter folded into the base shard by shard (ftpipe.model.merging: one weight in float32 at a time,
    not the whole model: an 8B base would need 32 GB), written in the base's shard layout; the base's tokenizer
    files as they are (a re-save can drop tokenizer.model, which llama.cpp's converter needs for SentencePiece
    vocabularies), and the chat template the tokenize stage trained with, which the GGUFs then carry."""
    merge_lora_shards(base_dir, adapter_dir, dtype, out_dir)
    copy_tokenizer_files(base_dir, out_dir)
    install_chat_template(out_dir, tokenized_dir)


def check_parity(params: MergeParams, quantization: QuantizationParams, base_dir: Path, adapter_dir: Path,
                 merged_dir: Path, rows: list[dict]) -> dict:
    """Validation losses of the merged model and both adapter settings; raise if a gap is too large."""
    pad_id = load_tokenizer(base_dir).pad_token_id
    dtype = inference_dtype()
    trained_dtype = resolve_compute_dtype(quantization.compute_dtype, cuda_available())
    models = {
        "adapter_16bit": lambda: load_model(base_dir, dtype, adapter_dir=adapter_dir),
        "adapter_as_trained": lambda: load_model(base_dir, trained_dtype, adapter_dir=adapter_dir,
                                                 quantization=quantization),
        "merged": lambda: load_model(merged_dir, dtype),
    }
    losses = {}
    for name, make in models.items():   # one model resident at a time: three 8B models would not fit together
        model = make()
        losses[name] = mean_loss(model, rows, pad_id, LOSS_BATCH, f"{name} validation loss")["loss"]
        del model
        free_memory()
    metrics = {
        "validation_loss": losses,
        "gap_vs_adapter": abs(losses["merged"] - losses["adapter_16bit"]),
        # Signed: the 16-bit merge removes the NF4 rounding the adapter was trained with, so the merged
        # model is often *better* than the 4-bit adapter; only a loss increase is a problem.
        "gap_vs_trained": losses["merged"] - losses["adapter_as_trained"],
    }
    failures = [
        f"{key}: {losses['merged']:.4f} (merged) vs {losses[other]:.4f} ({other}): gap {metrics[key]:.4f} "
        f"> merge.max_{limit_key} "
        f"= {limit}"
        for key, other, limit_key, limit in (
            ("gap_vs_adapter", "adapter_16bit", "loss_gap_vs_adapter", params.max_loss_gap_vs_adapter),
            ("gap_vs_trained", "adapter_as_trained", "loss_gap_vs_trained", params.max_loss_gap_vs_trained))
        if metrics[key] > limit
    ]
    if failures:
        raise PipelineError(
            "the merged model's validation loss does not match the adapter's:\n  " + "\n  ".join(failures)
            + "\nThe merged model was not published. A gap vs the 16-bit adapter means the merge is broken; "
              "a gap vs the 4-bit adapter means the adapter leans on NF4 rounding (train longer or with a "
              "lower learning rate), or raise the tolerance in params.yaml if you accept it."
        )
    return metrics


def free_memory() -> None:
    """Give a dropped model's memory back before the next loads: PEFT wrappers hold reference cycles that only
    the garbage collector breaks, and PyTorch's CUDA allocator keeps freed blocks cached until emptied."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return {**flatten(params.merge, "merge"), "base.dtype": params.base.dtype,
            **flatten(params.train.quantization, "train.quantization")}


def main() -> None:
    from ftpipe.data.tokenized import load_tokenized

    rows = load_tokenized("validation")
    with Stage("merge", tracked_params) as stage:
        params = stage.params
        for verdict_dir in (EVALUATION_DIR, AUDIT_DIR):   # nothing is built from an adapter a gate stopped
            require_passed(verdict_dir / VERDICT_FILE, adapter_subject(ADAPTER_DIR), "merge")
        with stage.output() as out_dir:
            merge_adapter(BASE_DIR, ADAPTER_DIR, params.base.dtype, out_dir, TOKENIZED_DIR)
            metrics = check_parity(params.merge, params.train.quantization, BASE_DIR, ADAPTER_DIR, out_dir, rows)
            content = write_content_record(out_dir)   # what quantize depends on
            stage.record.update(
                metrics=metrics, files_sha256=content["files_sha256"], digest=content["digest"],
                merged_into={"base_digest": read_json(BASE_DIR / CONTENT_FILE)["digest"],
                             "dtype": params.base.dtype, "merge_compute_dtype": "float32"},
                adapter_sha256=file_hashes(ADAPTER_DIR))
        stage.finish(metrics, log={**{f"validation_loss.{k}": v for k, v in metrics["validation_loss"].items()},
                                   **{k: v for k, v in metrics.items() if k.startswith("gap")}})
        stage.tracker.log_artifact(MERGED_DIR / PROVENANCE_FILE)
    losses = metrics["validation_loss"]
    print(f"merge: validation loss merged {losses['merged']:.4f}, adapter 16-bit {losses['adapter_16bit']:.4f}, "
          f"adapter as trained (4-bit) {losses['adapter_as_trained']:.4f} -> {MERGED_DIR}/")


if __name__ == "__main__":
    run_stage(main)
